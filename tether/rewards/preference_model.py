"""`preference_model`: a completion's win probability against an opponent, by a pairwise preference model.

    rewards:
      - {name: preference_model, path: runs/pm/final, opponent: group}               # self-play
      - {name: preference_model, path: runs/pm/final, opponent: "column:reference"}  # vs a data column

The model is the `final/` folder of `tether pm`; P(y ≻ y' | x) is read as it was trained. `opponent`:
- `group`: each completion against the other completions of the same prompt in the call (the G samples of a
  GRPO group): reward = mean_{j≠i} P(y_i ≻ y_j), self-play as in online IPO / SPPO. A prompt with a single
  completion cannot be judged (None).
- `column:NAME`: against the row's NAME column (a reference answer, or the samples of an opponent policy that
  `tether nash` puts there): reward = P(y ≻ row[NAME]).
"""

from __future__ import annotations

from collections import defaultdict


def make_preference_model_reward(path: str, opponent: str = "group", batch_size: int = 16, device: str = "auto",
                                 chat_template: str = "auto"):
    """A reward function `reward(prompts, completions, **columns) -> list[float | None]` (see module doc)."""
    if opponent != "group" and not (opponent.startswith("column:") and len(opponent) > len("column:")):
        raise ValueError(f"preference_model: opponent must be 'group' or 'column:NAME', got {opponent!r}")
    from tether.models.preference import PreferenceScorer

    scorer = PreferenceScorer(path, device=device, batch_size=batch_size, chat_template=chat_template)

    def preference_model(prompts: list, completions: list, **columns) -> list[float | None]:
        if opponent != "group":
            name = opponent.removeprefix("column:")
            if name not in columns:
                raise ValueError(f"preference_model: opponent {opponent!r} but the rows have no column {name!r} "
                                 f"(columns: {sorted(columns)})")
            return scorer.probabilities(prompts, completions, columns[name])
        groups = defaultdict(list)  # the same prompt → one group
        for i, prompt in enumerate(prompts):
            groups[repr(prompt)].append(i)
        pairs = [(i, j) for members in groups.values() for i in members for j in members if i != j]
        wins = scorer.probabilities([prompts[i] for i, _ in pairs], [completions[i] for i, _ in pairs],
                                    [completions[j] for _, j in pairs])
        total, count = [0.0] * len(completions), [0] * len(completions)
        for (i, _), p in zip(pairs, wins):
            total[i] += p
            count[i] += 1
        return [t / c if c else None for t, c in zip(total, count)]

    preference_model.scorer = scorer
    return preference_model
