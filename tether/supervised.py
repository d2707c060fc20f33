"""The supervised fine-tuning loop, shared by the sft recipe, rft's rounds and distill's trace fine-tuning.

    J_sft(θ) = E_(s,a) [ 1/|a| Σ_k log π_θ(a_k | s, a_<k) ]

Read top to bottom: load model and data → for each step: forward the batch, mean NLL over the
completion tokens of the whole (global) batch, backward, one optimizer step → log, checkpoint → save.
`tether.recipes.sft` is this loop from the command line; rft and distill call it here, so no recipe imports
another.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tether import models
from tether.config.sft import SFTConfig
from tether.data.batching import collate_sft, grouped_micro_batches
from tether.data.loading import load_rows
from tether.data.sft import build_sft_examples
from tether.losses import sft_loss
from tether.models import packed
from tether.models.forward import model_token_logprobs
from tether.runtime import distributed
from tether.runtime.run import Run, autocast

log = logging.getLogger("tether")


def load_examples(config: SFTConfig, tokenizer, source: str, split: str = "train"):
    """(examples, build stats) of the demonstrations in `source`, tokenized as the config says."""
    return build_sft_examples(load_rows(source, split), tokenizer, source=source, max_length=config.max_length,
                              overlong=config.overlong, train_on=config.train_on, chat_template=config.chat_template)


def train(config: SFTConfig) -> Path:
    """Run SFT as configured; returns the `final/` model folder. Also the fine-tuning step of rft's rounds and
    distill's trace fine-tuning, which pass a config of their own with SFT's keys (`config.sft.sft_config`)."""
    run = Run(config)
    model, tokenizer = run.load_model()

    examples, stats = load_examples(config, tokenizer, config.data, config.data_split)
    log.info(stats.summary(config.data))
    eval_examples = []
    if config.eval_data:
        eval_examples, _ = load_examples(config, tokenizer, config.eval_data, config.data_split)

    model, order, optimizer, scheduler, steps, micro_size = run.setup_offline(model, tokenizer, len(examples))
    # Every rank must run as many backward passes as the others (DDP reduces in each): group in one process only.
    # A packed forward has no padding to save (models.packed).
    grouping = (config.length_grouping and distributed.world_size() == 1
                and packed.unsupported_reason(model, config.padding_free) is not None)
    call_cost = models.forward_call_cost(model, run.device) if grouping else float("inf")
    lengths = [len(e.input_ids) for e in examples]

    for step in steps:
        global_batch = order.batch(step)
        # Divide by the completion tokens of the whole global batch, so the result does not depend on
        # how the batch is split into micro-batches or ranks.
        num_tokens = sum(sum(examples[i].loss_mask[1:]) for i in global_batch)
        total_loss = torch.zeros(())
        for micro in grouped_micro_batches(distributed.shard(global_batch), micro_size, lengths, call_cost):
            batch = {k: v.to(run.device) for k, v in collate_sft([examples[i] for i in micro],
                                                                 tokenizer.pad_token_id).items()}
            with autocast(run):
                logprobs, _ = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                                    target_mask=batch["loss_mask"],
                                                    packing=config.padding_free)  # (B, T-1)
            loss, _ = sft_loss(logprobs, batch["loss_mask"], num_tokens=num_tokens)
            # DDP averages gradients over ranks; each rank's loss is already a share of the global mean.
            (loss * distributed.world_size()).backward()
            total_loss += loss.detach().float().cpu()
        grad_norm, _ = run.guard.step(model, optimizer, scheduler, config.max_grad_norm)
        metrics = {"loss": distributed.all_reduce_sum(total_loss), "grad_norm": grad_norm,
                   "num_tokens": num_tokens}
        if eval_examples and config.eval_steps and (step + 1) % config.eval_steps == 0:
            metrics["eval_loss"] = evaluate_loss(model, eval_examples, tokenizer, micro_size, run.device,
                                                  packing=config.padding_free)
        tokens = sum(len(examples[i].input_ids) for i in global_batch)
        run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, tokens=tokens)

    if eval_examples:
        eval_loss = evaluate_loss(model, eval_examples, tokenizer, micro_size, run.device, packing=config.padding_free)
        log.info("eval loss after training: %.4f", eval_loss)
        if run.main:
            (run.dir / "eval.json").write_text(f'{{"eval_loss": {eval_loss}}}\n')
    return run.finish(model, tokenizer)


@torch.no_grad()
def evaluate_loss(model, examples, tokenizer, batch_size: int, device, *, packing: bool = True) -> float:
    """Mean negative log-likelihood per learned token over `examples` (`packing`: config key `padding_free`)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_sft(examples[start: start + batch_size],
                                                         tokenizer.pad_token_id).items()}
        logprobs, _ = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                           target_mask=batch["loss_mask"], packing=packing)
        total += float(-(logprobs * batch["loss_mask"]).sum())
        count += int(batch["loss_mask"].sum())
    model.train(was_training)
    return total / max(count, 1)
