"""Reward model: a transformer body with a scalar head, trained on preference pairs (Bradley-Terry).

    P(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l))
    L(φ) = −E [ log σ(r_φ(x, y_w) − r_φ(x, y_l) − m) ] + c · E [ (r_φ(x, y_w) + r_φ(x, y_l))² ]

m is the row's optional `margin` (Llama 2), c the optional centering coefficient (Eisenstein et al. 2023).
The reward is read at the last non-padding token. Read top to bottom: load model and pairs → for each
step: chosen and rejected in ONE forward, loss over the pairs of the global batch, backward, optimizer
step → log (accuracy, margin, reward means), evaluate held-out pairs → save `final/`, an
`AutoModelForSequenceClassification` folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tether.config.reward_model import RewardModelConfig
from tether.data.batching import split_micro_batches
from tether.data.preference import collate_pairs, load_pairs
from tether.data.splits import split_held_out
from tether.losses import bradley_terry_loss
from tether.models.value import load_reward_model, sequence_rewards
from tether.runtime import distributed
from tether.runtime.run import Run, autocast

log = logging.getLogger("tether")

PAIR_METRICS = ("accuracy", "margin", "rewards_chosen", "rewards_rejected")


def pair_rewards(model, pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen_rewards (B,), rejected_rewards (B,), margin (B,)) from one concatenated (2B, T) forward."""
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    n = len(pairs)
    return rewards[:n], rewards[n:], batch["margin"]


def train(config: RewardModelConfig) -> Path:
    """Train a reward model as configured; returns the `final/` model folder."""
    run = Run(config)
    model, tokenizer = run.load_model(load_reward_model)

    pairs = load_pairs(config, tokenizer, config.data)
    if config.eval_data:
        eval_pairs = load_pairs(config, tokenizer, config.eval_data)
    else:
        pairs, eval_pairs = split_held_out(pairs, config.eval_fraction, config.seed)
    use_margin = any(p.margin for p in pairs)
    log.info("reward model: %d training pairs, %d held-out pairs%s", len(pairs), len(eval_pairs),
             ", with margins" if use_margin else "")

    model, order, optimizer, scheduler, steps, micro_size = run.setup_offline(model, tokenizer, len(pairs))

    def held_out() -> dict[str, float]:
        with autocast(run):
            return evaluate_pairs(model, eval_pairs, tokenizer.pad_token_id, micro_size, run.device)

    for step in steps:
        global_batch = order.batch(step)

        def loss_fn(micro):  # Bradley-Terry on this micro-batch of pairs, a mean over `micro`
            chosen, rejected, margin = pair_rewards(model, [pairs[i] for i in micro], tokenizer.pad_token_id,
                                                    run.device)
            return bradley_terry_loss(chosen, rejected, margin=margin if use_margin else None,
                                      center_coef=config.center_rewards_coef)

        metrics = run.accumulate_step(model, optimizer, scheduler,
                                      split_micro_batches(distributed.shard(global_batch), micro_size), loss_fn,
                                      len(global_batch), PAIR_METRICS)
        if eval_pairs and run.eval_due(step + 1):
            metrics.update({f"eval_{k}": v for k, v in held_out().items() if k != "num_pairs"})
        tokens = sum(2 * len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids)
                     for i in global_batch)
        run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, tokens=tokens)

    if eval_pairs:
        result = held_out()
        log.info("held-out pairs: accuracy %.4f, mean margin %.4f", result["accuracy"], result["margin"])
        if run.main:
            (run.dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return run.finish(model, tokenizer)


@torch.no_grad()
def evaluate_pairs(model, pairs, pad_id: int, batch_size: int, device) -> dict[str, float]:
    """Pairwise accuracy (r_w > r_l), mean margin (r_w − r_l) and reward means over `pairs`."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r, _ = pair_rewards(model, pairs[start: start + batch_size], pad_id, device)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    model.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)  # (N,), (N,)
    return {"accuracy": float((chosen > rejected).float().mean()), "margin": float((chosen - rejected).mean()),
            "rewards_chosen": float(chosen.mean()), "rewards_rejected": float(rejected.mean()),
            "num_pairs": len(pairs)}
