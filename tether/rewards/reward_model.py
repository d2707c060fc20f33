"""`reward_model`: the scalar score of a trained reward model (the `final/` folder of `tether rm`).

    rewards:
      - {name: reward_model, path: runs/rm/final, batch_size: 16}

Prompts and completions (strings or message lists) are tokenized exactly as `tether rm` tokenized its
training pairs, scored in batches without gradients, on the trainer's device (`device: auto`).
"""

from __future__ import annotations


def make_reward_model_reward(path: str, batch_size: int = 16, device: str = "auto", chat_template: str = "auto",
                             max_length: int | None = None):
    """A reward function `reward(prompts, completions, **columns) -> list[float]` scoring with the model at `path`.

    `chat_template` must match the one the reward model was trained with; sequences longer than
    `max_length` keep their last `max_length` tokens.
    """
    from tether.models.value import RewardScorer

    scorer = RewardScorer(path, device=device, batch_size=batch_size, chat_template=chat_template,
                          max_length=max_length)

    def reward_model(prompts: list, completions: list, **columns) -> list[float | None]:
        return scorer.score(prompts, completions)

    reward_model.scorer = scorer
    return reward_model
