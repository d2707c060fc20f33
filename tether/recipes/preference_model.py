"""Pairwise preference model on preference pairs (Munos et al. 2024, "Nash Learning from Human Feedback", §4).

    P(a ≻ b | x) = σ(d(x, a, b)),   d(x, a, b) = g_φ(x, a, b) − g_φ(x, b, a)    (so P(a≻b) + P(b≻a) = 1)
    L(φ) = −E [ log σ(d(x, y_w, y_l)) ]

g_φ is a transformer with a scalar head reading `prompt + first + second`; unlike a Bradley-Terry reward
model it sees both answers, so it can represent non-transitive preferences (a ≻ b ≻ c ≻ a). Same data as
`tether rm` ({prompt, chosen, rejected} or HH-style rows). Read top to bottom: load model and pairs → for each
step: both orders of the pairs in ONE forward, loss, backward, optimizer step → log, evaluate held-out
pairs → save `final/`: an `AutoModelForSequenceClassification` folder plus `preference_model.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tether.config.preference_model import PreferenceModelConfig
from tether.data.batching import split_micro_batches
from tether.data.loading import DataError
from tether.data.preference import load_pairs
from tether.data.splits import split_held_out
from tether.models.preference import (collate_pair_orders, load_preference_model, preference_logits,
                                      save_preference_marker)
from tether.preference_game import preference_model_loss
from tether.runtime import distributed
from tether.runtime.run import Run, autocast

log = logging.getLogger("tether")

PAIR_METRICS = ("accuracy", "prob_chosen")


def check_pair_lengths(pairs, max_length: int, source: str) -> None:
    """The model reads prompt + chosen + rejected in one sequence: it must fit in max_length."""
    for pair in pairs:
        length = len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
        if length > max_length:
            raise DataError(source, f"row {pair.row}: prompt + chosen + rejected is {length} tokens, over "
                                    f"max_length={max_length} (a preference model reads both answers); "
                                    f"raise max_length")


def pair_logits(model, pairs, pad_id: int, device) -> torch.Tensor:
    """d(x, chosen, rejected) (B,) from one (2B, T) forward over both orders."""
    batch = collate_pair_orders([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs],
                                [p.rejected_ids for p in pairs], pad_id)
    return preference_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))


def train(config: PreferenceModelConfig) -> Path:
    """Train a pairwise preference model as configured; returns the `final/` model folder."""
    run = Run(config)
    model, tokenizer = run.load_model(load_preference_model)

    pairs = load_pairs(config, tokenizer, config.data)
    check_pair_lengths(pairs, config.max_length, config.data)
    if config.eval_data:
        eval_pairs = load_pairs(config, tokenizer, config.eval_data)
        check_pair_lengths(eval_pairs, config.max_length, config.eval_data)
    else:
        pairs, eval_pairs = split_held_out(pairs, config.eval_fraction, config.seed)
    log.info("preference model: %d training pairs, %d held-out pairs", len(pairs), len(eval_pairs))

    def held_out() -> dict[str, float]:  # accuracy and calibration on the held-out pairs (the trained, wrapped model)
        with autocast(run):
            return evaluate_pairs(model, eval_pairs, tokenizer.pad_token_id, micro_size, run.device)

    model, order, optimizer, scheduler, steps, micro_size = run.setup_offline(model, tokenizer, len(pairs))
    for step in steps:
        global_batch = order.batch(step)

        def loss_fn(micro):  # the pairwise preference loss on this micro-batch, a mean over `micro`
            return preference_model_loss(pair_logits(model, [pairs[i] for i in micro], tokenizer.pad_token_id,
                                                     run.device))

        metrics = run.accumulate_step(model, optimizer, scheduler,
                                      split_micro_batches(distributed.shard(global_batch), micro_size), loss_fn,
                                      len(global_batch), PAIR_METRICS)
        if eval_pairs and run.eval_due(step + 1):
            metrics.update({f"eval_{k}": v for k, v in held_out().items() if k != "num_pairs"})
        tokens = sum(2 * (len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids))
                     for i in global_batch)
        run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, tokens=tokens)

    if eval_pairs:
        result = held_out()
        log.info("held-out pairs: accuracy %.4f, mean P(chosen ≻ rejected) %.4f", result["accuracy"],
                 result["prob_chosen"])
        if run.main:
            (run.dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    final = run.finish(model, tokenizer)
    if run.main:
        save_preference_marker(final)
    return final


@torch.no_grad()
def evaluate_pairs(model, pairs, pad_id: int, batch_size: int, device) -> dict[str, float]:
    """Pairwise accuracy (d > 0), mean logit d and mean P(chosen ≻ rejected) over `pairs`."""
    was_training = model.training
    model.eval()
    logits = torch.cat([pair_logits(model, pairs[s: s + batch_size], pad_id, device).cpu()
                        for s in range(0, len(pairs), batch_size)])  # (N,)
    model.train(was_training)
    return {"accuracy": float((logits > 0).float().mean()), "logit": float(logits.mean()),
            "prob_chosen": float(torch.sigmoid(logits).mean()), "num_pairs": len(pairs)}
