"""Distillation: a teacher writes traces, the student learns them; optionally the teacher's token distributions too.

    traces   = teacher samples on `data` prompts (or a `traces` file of {prompt, completion})
    J(θ)     = NLL_θ(traces) + kd_coef · KD(p_teacher, p_θ)      KD per completion token, token mean

kd_coef = 0 is sequence-level distillation (Kim & Rush 2016; how DeepSeek-R1's distilled models were made):
plain SFT on the traces, run by the SFT recipe. kd_coef > 0 adds token-level distillation on the teacher's
full next-token distributions (Hinton et al. 2015), which needs teacher and student to share a tokenizer:
`kd_kind: forward` is KL(teacher ‖ student), mode covering; `reverse` is KL(student ‖ teacher), mode seeking
(MiniLLM, Gu et al. 2024); both at `kd_temperature` (`tether.losses.distill_loss`).

Read top to bottom: traces → student and teacher → for each step: student forward (grad) and teacher
forward (no grad) on the batch, NLL + kd_coef · KD over the completion tokens of the global batch, backward,
one optimizer step → log, checkpoint → save.

Run folder: `traces.jsonl` (generated traces), `student/` (the training run: config.yaml, metrics.jsonl,
checkpoints/, final/), `final` → student/final.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from tether import models
from tether.config import ConfigError, save_config
from tether.config.distill import DistillConfig
from tether.config.sft import sft_config
from tether.eval.sampling import load_sampling_model
from tether.data.batching import collate_sft, split_micro_batches
from tether.data.loading import load_rows
from tether.eval.generation import sample_share, write_jsonl
from tether.losses import distill_loss, sft_loss
from tether.ops import token_logprobs
from tether.recipes import sft
from tether.runtime import distributed
from tether.runtime.checkpoint import link_final
from tether.runtime.run import Run, autocast

log = logging.getLogger("tether")


def train(config: DistillConfig) -> Path:
    """Run distillation as configured; returns the student's final model folder (`output_dir/final`).
    Under torchrun every rank samples a share of the traces (rank 0 writes them) and the student trains
    data-parallel."""
    distributed.init(config.distributed.timeout_s)
    out = Path(config.output_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    if config.kd_coef > 0:  # before any sampling: a mismatch is a config error
        check_shared_vocab(models.load_tokenizer(config.model), models.load_tokenizer(config.teacher))
    traces = config.traces or write_traces(config, out / "traces.jsonl")
    student = dataclasses.replace(config, data=str(traces), traces="", output_dir=str(out / "student"))
    if config.kd_coef == 0:
        final = sft.train(sft_config(student))
    else:
        final = train_with_kd(student)
    return link_final(out, final)


def write_traces(config: DistillConfig, path: Path) -> Path:
    """The teacher's completions of the `data` prompts, as {prompt, completion, ...input columns} rows.
    Reused when resuming and the file is complete. Under torchrun each rank samples its share of the prompts
    (`sample_share`: the same traces as one process) and rank 0 writes the file."""
    if config.resume and path.exists():
        log.info("reusing the teacher traces in %s", path)
        return path
    rows = load_rows(config.data, config.data_split)
    teacher, tokenizer = load_sampling_model(config.teacher, config.device, config.dtype, config.seed)
    share, batch = sample_share(teacher, tokenizer, rows, config.sampling.params(config.seed),
                                batch_size=config.sampling.batch_size, chat_template=config.chat_template,
                                engine=config.rollout_engine, source=config.data)
    del teacher
    traces = distributed.gather_lists([
        {**rows[share.start + p], "completion": text, "finish_reason": reason}
        for p, text, reason in zip(batch.prompt_index, batch.completions, batch.finish_reasons)])
    empty = sum(not t["completion"].strip() for t in traces)
    if empty:
        log.warning("distill: %d of %d teacher traces are empty and are left out", empty, len(traces))
    if distributed.is_main():
        write_jsonl(path, [t for t in traces if t["completion"].strip()])
    distributed.barrier()  # every rank reads the file next
    log.info("distill: wrote %d teacher traces to %s", len(traces) - empty, path)
    return path


def check_shared_vocab(student_tokenizer, teacher_tokenizer) -> None:
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError("config key 'kd_coef': token-level distillation compares distributions token by token, so "
                          "teacher and student must share a tokenizer (same vocabulary); these differ. "
                          "Use kd_coef=0 (SFT on the teacher's traces) instead.")


def train_with_kd(config: DistillConfig) -> Path:
    """SFT NLL + kd_coef · token-level KD against the teacher, on config.data (the traces)."""
    run = Run(config)
    model, tokenizer = run.load_model()
    teacher, _ = models.load(config.teacher, dtype=run.dtype, device=run.device, seed=config.seed)
    teacher.eval().requires_grad_(False)
    vocab = len(tokenizer)  # models may pad their logits past the tokenizer's vocabulary; compare the real tokens

    examples, stats = sft.load_examples(config, tokenizer, config.data)
    log.info(stats.summary(config.data))
    eval_examples = []
    if config.eval_data:
        eval_examples, _ = sft.load_examples(config, tokenizer, config.eval_data, config.data_split)
    model, order, optimizer, scheduler, steps, micro_size = run.setup_offline(model, tokenizer, len(examples))

    for step in steps:
        global_batch = order.batch(step)
        num_tokens = sum(sum(examples[i].loss_mask[1:]) for i in global_batch)  # completion tokens, whole batch
        totals = torch.zeros(3)  # loss, nll, kd
        for micro in split_micro_batches(distributed.shard(global_batch), micro_size):
            batch = {k: v.to(run.device) for k, v in collate_sft([examples[i] for i in micro],
                                                                 tokenizer.pad_token_id).items()}
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
            # Position t predicts token t+1: the (B, T-1) loss mask, padded to (B, T), marks positions to learn.
            mask = torch.nn.functional.pad(batch["loss_mask"], (0, 1))  # (B, T)
            labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100).masked_fill(mask == 0, -100)
            with autocast(run):
                student_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[..., :vocab]
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[..., :vocab]
            logprobs = token_logprobs(student_logits, labels)  # (B, T)
            nll, _ = sft_loss(logprobs, mask, num_tokens=num_tokens)
            kd, _ = distill_loss(student_logits, teacher_logits, mask, kind=config.kd_kind,
                                 temperature=config.kd_temperature, num_tokens=num_tokens)
            loss = nll + config.kd_coef * kd
            (loss * distributed.world_size()).backward()
            totals += torch.stack([loss, nll, kd]).detach().float().cpu()
        totals = distributed.all_reduce_sum(totals)
        grad_norm, _ = run.guard.step(model, optimizer, scheduler, config.max_grad_norm)
        metrics = {"loss": totals[0], "nll": totals[1], "kd_loss": totals[2], "grad_norm": grad_norm,
                   "num_tokens": num_tokens}
        if eval_examples and config.eval_steps and (step + 1) % config.eval_steps == 0:
            metrics["eval_loss"] = sft.evaluate_loss(model, eval_examples, tokenizer, micro_size, run.device)
        tokens = sum(len(examples[i].input_ids) for i in global_batch)
        run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, tokens=tokens)

    if eval_examples:
        eval_loss = sft.evaluate_loss(model, eval_examples, tokenizer, micro_size, run.device)
        log.info("eval loss (NLL) after training: %.4f", eval_loss)
        if run.main:
            (run.dir / "eval.json").write_text(f'{{"eval_loss": {eval_loss}}}\n')
    return run.finish(model, tokenizer)
