"""Direct preference optimization and its family, chosen by name (`loss=`):

    dpo     −log σ(β h),  h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
    cdpo    −(1−ε) log σ(β h) − ε log σ(−β h)                       (label_smoothing ε)
    robust  [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)
    hinge   max(0, 1 − β h)
    ipo     (h̄ − 1/(2β))²  on length-averaged log-ratios
    simpo   −log σ(β (avg log π(y_w) − avg log π(y_l)) − γ)          reference-free
    orpo    NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l))         reference-free
    kto     unpaired: w_d (1 − σ(β (r − z))) or w_u (1 − σ(β (z − r))),  r = log π − log π_ref

The formulas live in `tether.losses`; this loop only calls `get_preference_loss(name)` / `kto_loss`.
Read top to bottom: load policy and data → set up the reference (adapter-disabled base under LoRA, a
frozen copy otherwise, none for simpo/orpo) → optionally precompute reference log-probs once → for each
step: chosen and rejected in ONE (2B, T) forward, summed completion log-probs, loss over the pairs of the
global batch, backward, optimizer step → log implicit rewards, accuracy, margins → save `final/`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import models
from tether.config.dpo import REFERENCE_FREE, DPOConfig
from tether.data.batching import split_micro_batches
from tether.data.loading import load_rows
from tether.data.splits import split_held_out
from tether.data.preference import build_preference_pairs, build_unpaired_examples, kto_partners
from tether.losses import accepted_kwargs, get_preference_loss, kto_loss
from tether.models.forward import pair_logps, unpaired_logps
from tether.models.reference import Reference, freeze
from tether.runtime import distributed
from tether.runtime.metrics import MetricMeans
from tether.runtime.run import Run, autocast

log = logging.getLogger("tether")


def build_reference(config: DPOConfig, policy, device) -> Reference | None:
    """π_ref: none for reference-free losses, `ref_model` when given, else the starting policy: the policy
    itself when every reference log-prob is precomputed before the first update (and under LoRA)."""
    if config.loss in REFERENCE_FREE:
        return None  # no reference model is loaded at all
    if config.ref_model:
        frozen, _ = models.load(config.ref_model, device=device)
        return Reference(policy, freeze(frozen))
    return Reference.from_policy(policy, frozen_copy=not config.precompute_ref)


def precompute_reference(reference: Reference, examples, partners, pad_id: int, batch_size: int,
                         device, *, packing: bool = True) -> torch.Tensor:
    """Reference log-probs of every example, (n, 2): [chosen, rejected] for pairs, [completion, KL pair]
    for KTO. Each rank computes every world_size-th batch; a sum over ranks assembles the table."""
    table = torch.zeros(len(examples), 2, device=device)
    starts = list(range(0, len(examples), batch_size))
    for start in starts[distributed.rank()::distributed.world_size()]:
        index = list(range(start, min(start + batch_size, len(examples))))
        chunk = [examples[i] for i in index]
        if partners is None:
            logps = reference.logps(pair_logps, chunk, pad_id, device, packing=packing).view(2, -1).T  # (b, 2)
        else:
            kl_completions = [examples[partners[i]].completion_ids for i in index]
            logps = torch.stack([reference.logps(unpaired_logps, chunk, pad_id, device, packing=packing),
                                 reference.logps(unpaired_logps, chunk, pad_id, device, kl_completions,
                                                 packing=packing)], -1)
        table[index] = logps.float()
    return distributed.all_reduce_sum(table)


# ----------------------------------------------------------------------------- losses of a batch


def batch_loss(config: DPOConfig, model, reference, examples, index, cache, partners, pad_id, device,
               kl_ref_point=None, chosen_tokens_per_pair=None):
    """(loss, metrics) of examples[index]: the mean over these examples. ORPO's NLL is a token mean: with
    `chosen_tokens_per_pair` (of the global batch) it divides by this micro-batch's share of the global count."""
    chunk = [examples[i] for i in index]
    knobs = dict(beta=config.beta, label_smoothing=config.label_smoothing, gamma=config.gamma,
                 orpo_lambda=config.orpo_lambda)
    if chosen_tokens_per_pair is not None:
        knobs["nll_tokens"] = chosen_tokens_per_pair * len(chunk)
    packing = config.padding_free
    if config.loss == "kto":
        logps, _, labels = unpaired_logps(model, chunk, pad_id, device, packing=packing)
        ref = cache[index, 0] if cache is not None else reference.logps(unpaired_logps, chunk, pad_id, device,
                                                                        packing=packing)
        return kto_loss(logps, ref, labels, beta=config.beta, kl_ref_point=kl_ref_point,
                        desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight)
    logps, lengths = pair_logps(model, chunk, pad_id, device, packing=packing)  # (2b,)
    b = len(chunk)
    if reference is None and cache is None:
        ref_chosen = ref_rejected = None
    else:
        ref = (cache[index].T.reshape(-1) if cache is not None
               else reference.logps(pair_logps, chunk, pad_id, device, packing=packing))
        ref_chosen, ref_rejected = ref[:b], ref[b:]
    loss_fn = get_preference_loss(config.loss)  # each loss gets the knobs it declares
    return loss_fn(logps[:b], logps[b:], ref_chosen, ref_rejected, chosen_lengths=lengths[:b],
                   rejected_lengths=lengths[b:], **accepted_kwargs(loss_fn, **knobs))


@torch.no_grad()
def kto_kl_terms(model, reference, examples, index, cache, partners, pad_id, device, *,
                 packing: bool = True) -> torch.Tensor:
    """log π(y'|x) − log π_ref(y'|x) (b,) on the mismatched pairs (x_i, y_partner(i)) of examples[index]."""
    chunk = [examples[i] for i in index]
    completions = [examples[partners[i]].completion_ids for i in index]
    logps = unpaired_logps(model, chunk, pad_id, device, completions, packing=packing)[0]
    ref = cache[index, 1] if cache is not None else reference.logps(unpaired_logps, chunk, pad_id, device,
                                                                    completions, packing=packing)
    return logps - ref


def kto_kl_estimate(model, reference, examples, indices, cache, partners, pad_id, micro_size, device, *,
                    packing: bool = True):
    """KTO's reference point z: the mean of `kto_kl_terms` over the global batch (all ranks)."""
    total = torch.zeros((), device=device)
    for micro in split_micro_batches(distributed.shard(indices), micro_size):
        total += kto_kl_terms(model, reference, examples, micro, cache, partners, pad_id, device,
                              packing=packing).sum()
    return distributed.all_reduce_sum(total) / len(indices)


def add_metrics(means: MetricMeans, config, metrics: dict, n: int) -> None:
    if config.loss == "kto":  # per-label reward means are weighted by how many examples carry that label
        counts = {"rewards_chosen": metrics.pop("num_desirable"), "rewards_rejected": metrics.pop("num_undesirable")}
        metrics.pop("kl_ref_point")
        means.add(metrics, n, counts)
    else:
        means.add(metrics, n)


# ----------------------------------------------------------------------------- training loop


def num_tokens(example) -> int:
    """Tokens the policy reads for one example (a pair: prompt twice, both completions)."""
    if hasattr(example, "chosen_ids"):
        return 2 * len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids)
    return len(example.prompt_ids) + len(example.completion_ids)


def load_examples(config: DPOConfig, tokenizer, source: str):
    build = build_unpaired_examples if config.loss == "kto" else build_preference_pairs
    extra = {} if config.loss == "kto" else {"margin_column": ""}
    examples, _ = build(load_rows(source, config.data_split), tokenizer, source=source, max_length=config.max_length,
                        overlong=config.overlong, chat_template=config.chat_template,
                        skip_bad_rows=config.skip_bad_rows, **extra)
    return examples


def train(config: DPOConfig) -> Path:
    """Run DPO (or a family member) as configured; returns the `final/` model folder."""
    run = Run(config)
    model, tokenizer = run.load_model()
    pad_id = tokenizer.pad_token_id

    examples = load_examples(config, tokenizer, config.data)
    if config.eval_data:
        eval_examples = load_examples(config, tokenizer, config.eval_data)
    else:
        examples, eval_examples = split_held_out(examples, config.eval_fraction, config.seed)
    kto = config.loss == "kto"
    partners = kto_partners(len(examples), config.seed) if kto else None
    eval_partners = kto_partners(len(eval_examples), config.seed) if kto and eval_examples else None
    micro_size = (config.micro_batch_size or config.batch_size) // distributed.world_size() or 1

    # The reference is set up (and precomputed) before `run.start`, which may load resumed weights.
    reference = build_reference(config, model, run.device)
    cache = eval_cache = None
    if reference is not None and config.precompute_ref:
        with autocast(run):
            cache = precompute_reference(reference, examples, partners, pad_id, micro_size, run.device,
                                         packing=config.padding_free)
            if eval_examples:
                eval_cache = precompute_reference(reference, eval_examples, eval_partners, pad_id, micro_size,
                                                  run.device, packing=config.padding_free)
        reference = None  # every reference log-prob is cached: the reference model is not needed any more
        log.info("precomputed reference log-probs for %d + %d examples", len(examples), len(eval_examples))

    def evaluate_now() -> dict[str, float]:
        with autocast(run):
            return evaluate(config, model, reference, eval_examples, eval_cache, eval_partners, pad_id, micro_size,
                            run.device)

    model, order, optimizer, scheduler, steps, micro_size = run.setup_offline(model, tokenizer, len(examples))

    for step in steps:
        global_batch = order.batch(step)
        n_global = len(global_batch)
        kl_ref_point = None
        if kto:
            with autocast(run):
                kl_ref_point = kto_kl_estimate(model, reference, examples, global_batch, cache, partners, pad_id,
                                               micro_size, run.device, packing=config.padding_free)
        means = MetricMeans()
        per_pair = None  # ORPO's NLL: the global batch's chosen tokens per pair, as every rank sees the batch
        if config.loss == "orpo":
            per_pair = max(1, sum(len(examples[i].chosen_ids) for i in global_batch)) / n_global
        for micro in split_micro_batches(distributed.shard(global_batch), micro_size):
            with autocast(run):
                loss, metrics = batch_loss(config, model, reference, examples, micro, cache, partners, pad_id,
                                           run.device, kl_ref_point, per_pair)  # loss: mean over `micro`
            # Weight the micro-batch mean to its share of the global-batch mean; DDP averages over ranks.
            (loss * len(micro) / n_global * distributed.world_size()).backward()
            add_metrics(means, config, {"loss": loss.detach(), **metrics}, len(micro))
        grad_norm, _ = run.guard.step(model, optimizer, scheduler, config.max_grad_norm)
        metrics = {**means.reduce(), "grad_norm": grad_norm}
        if kto:
            metrics["kl"] = kl_ref_point
        if eval_examples and config.eval_steps and (step + 1) % config.eval_steps == 0:
            metrics.update({f"eval_{k}": v for k, v in evaluate_now().items()})
        tokens = sum(num_tokens(examples[i]) for i in global_batch)
        run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, tokens=tokens)

    if eval_examples:
        result = evaluate_now()
        log.info("held-out: %s", ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if run.main:
            (run.dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return run.finish(model, tokenizer)


@torch.no_grad()
def evaluate(config: DPOConfig, model, reference, examples, cache, partners, pad_id: int, batch_size: int,
             device) -> dict[str, float]:
    """Loss, implicit rewards, margin and accuracy: means over all held-out examples."""
    was_training = model.training
    model.eval()
    means = MetricMeans()
    batches = [list(range(start, min(start + batch_size, len(examples))))
               for start in range(0, len(examples), batch_size)]
    kl_ref_point = None
    if config.loss == "kto":
        kl_ref_point = torch.cat([kto_kl_terms(model, reference, examples, index, cache, partners, pad_id, device,
                                               packing=config.padding_free) for index in batches]).mean()
    for index in batches:
        loss, metrics = batch_loss(config, model, reference, examples, index, cache, partners, pad_id, device,
                                   kl_ref_point)
        metrics = {k: v.float() for k, v in {"loss": loss, **metrics}.items()}
        add_metrics(means, config, metrics, len(index))
    model.train(was_training)
    return {k: float(v) for k, v in means.reduce().items()}
