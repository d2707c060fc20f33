"""What every recipe needs around its loop, written once: the run folder, device, logging,
distributed wrapping (DDP / FSDP2), checkpoints and exact resume."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from typing import NamedTuple
from pathlib import Path

import torch

from tether.config import ConfigError, save_config, to_dict
from tether import models
from tether.data.batching import BatchOrder
from tether.runtime import distributed
from tether.runtime.checkpoint import (gather_model_state, gather_optimizer_state, latest_checkpoint,
                                       load_checkpoint, save_checkpoint, save_model_folder)
from tether.runtime.device import choose_device, choose_dtype, rng_state, seed_everything
from tether.runtime.logger import RunLogger
from tether.runtime.memory import peak_memory
from tether.runtime.optim import StepGuard, build_optimizer, build_scheduler

log = logging.getLogger("tether")


class OfflineSetup(NamedTuple):
    """What `Run.setup_offline` returns: the wrapped model in train mode, the loop's order and sizes."""

    model: torch.nn.Module
    order: BatchOrder
    """Seeded batches of example indices: `order.batch(step)` is a step's global batch."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps: range
    """The steps to run: from 0 (or the step after the resumed checkpoint) to max_steps or `epochs` passes."""
    micro_size: int
    """Examples per forward/backward on this rank."""


class Run:
    """A training run in `config.output_dir`.

    Typical use in a recipe::

        run = Run(config)
        model = run.wrap(model)  # DDP / FSDP2 under torchrun; unchanged in one process
        optimizer, scheduler = run.optimizer(model, total_steps)
        start_step, extra = run.start(model, tokenizer, optimizer, scheduler, total_steps)
        for step in range(start_step, total_steps):
            ...  # forward/backward
            grad_norm, applied = run.guard.step(model, optimizer, scheduler, config.max_grad_norm)
            run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, extra=lambda: {...})
        run.finish(model, tokenizer)

    Under torchrun every rank runs this same code: each takes its `distributed.shard` of the global batch,
    only rank 0 writes logs and checkpoints, and the methods that save (`end_step`, `checkpoint`, `finish`)
    must be called by every rank (they gather FSDP shards).
    """

    def __init__(self, config):
        distributed.init(config.distributed.timeout_s)
        self.config = config
        self.dir = Path(config.output_dir)
        self.main = distributed.is_main()
        if self.main:  # config.yaml is written by `start`, once the run is accepted: a refused run changes nothing
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OSError(err.errno, f"cannot write the run folder {self.dir}: {err.strerror}") from None
            if not os.access(self.dir, os.W_OK):
                raise OSError(errno.EACCES, f"cannot write the run folder {self.dir}: permission denied")
        distributed.barrier()
        self.device = choose_device(config.device)
        self.dtype = choose_dtype(config.dtype, self.device)
        seed_everything(config.seed)
        self.guard = StepGuard()
        self.logger: RunLogger | None = None
        self.optimizer_ = self.scheduler_ = None
        self._step_start = time.perf_counter()
        self._first_step = 0
        self.start_time, self.steps_done = time.time(), 0

    def load_model(self, load=None):
        """The trainable model of `config.model` (with `config.lora`, seeded) on the run's device, with
        gradient checkpointing if asked: `(model, tokenizer)`. `load` defaults to `tether.models.load`.

        Under gradient checkpointing HF's `use_cache` is switched off for the training forwards (a cache
        kept through a recomputed forward is wasted memory); the samplers ask for their cache explicitly."""
        config = self.config
        model, tokenizer = (load or models.load)(config.model, lora=config.lora, seed=config.seed)
        model.to(self.device)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        return model, tokenizer

    def setup_offline(self, model, tokenizer, num_examples: int) -> OfflineSetup:
        """The set-up every offline recipe (sft, rm, dpo, distill) shares once its data is loaded: a seeded
        order over `num_examples`, the step count (max_steps, or `epochs` passes), the model wrapped for
        DDP/FSDP, optimizer and scheduler, resume from the latest checkpoint, and this rank's micro-batch size."""
        config = self.config
        order = BatchOrder(num_examples, config.batch_size, config.seed)
        total_steps = config.max_steps if config.max_steps > 0 else order.steps_for(config.epochs)
        model = self.wrap(model)  # DDP / FSDP2 under torchrun; unchanged in one process
        optimizer, scheduler = self.optimizer(model, total_steps)
        start_step, _ = self.start(model, tokenizer, optimizer, scheduler, total_steps)
        micro_size = (config.micro_batch_size or config.batch_size) // distributed.world_size() or 1
        model.train()
        return OfflineSetup(model, order, optimizer, scheduler, range(start_step, total_steps), micro_size)

    def accumulate_step(self, model, optimizer, scheduler, micro_batches, loss_fn, total: int,
                        metric_names: tuple[str, ...]) -> dict:
        """One optimizer step over this rank's micro-batches of a global batch of `total` examples (rm, pm):
        `loss_fn(micro) -> (loss, metrics)`, each a mean over `micro`, is weighted to its share of the global mean
        (DDP averages gradients over ranks). Returns the global-batch means of the loss and of `metric_names`,
        and the gradient norm."""
        sums = torch.zeros(1 + len(metric_names), device=self.device)  # loss, then each metric, summed over examples
        for micro in micro_batches:
            with autocast(self):
                loss, metrics = loss_fn(micro)  # means over `micro`
            (loss * len(micro) / total * distributed.world_size()).backward()
            sums += torch.stack([loss.detach()] + [metrics[k] for k in metric_names]).float() * len(micro)
        grad_norm, _ = self.guard.step(model, optimizer, scheduler, self.config.max_grad_norm)
        means = distributed.all_reduce_sum(sums) / total
        return {"loss": means[0], **dict(zip(metric_names, means[1:])), "grad_norm": grad_norm}

    def eval_due(self, step: int) -> bool:
        """Whether step `step` (1-based, just finished) ends with an evaluation: every `eval_steps` steps."""
        return bool(self.config.eval_steps) and step % self.config.eval_steps == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    def wrap(self, model):
        """The trainable `model` ready for data-parallel training: DDP, or FSDP2 with
        `distributed.strategy=fsdp`; unchanged in a single process. Call it before `optimizer`, and
        backpropagate each rank's share of the global-batch loss times `distributed.world_size()`
        (both strategies average gradients over ranks)."""
        strategy = self.config.distributed.strategy
        if strategy == "fsdp" and distributed.world_size() > 1:
            from tether.models import is_peft, unwrap

            if is_peft(unwrap(model)):
                raise ConfigError("config key 'distributed.strategy': fsdp does not support LoRA yet; use ddp "
                                  "(the LoRA weights and their optimizer state are small)")
        return distributed.wrap(model, strategy, self.device)

    def optimizer(self, model, total_steps: int):
        if distributed.world_size() > 1 and not distributed.is_wrapped(model):
            raise RuntimeError("under torchrun the trained model must be wrapped before its optimizer is built: "
                               "model = run.wrap(model) (otherwise the ranks' gradients are never averaged)")
        c = self.config
        optimizer = build_optimizer(model.parameters(), learning_rate=c.learning_rate, weight_decay=c.weight_decay,
                                    betas=c.adam_betas)
        scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=c.warmup_steps,
                                    schedule=c.lr_scheduler)
        return optimizer, scheduler

    def start(self, model, tokenizer, optimizer, scheduler, total_steps: int) -> tuple[int, dict]:
        """Resume from the latest complete checkpoint when `resume=true`; returns (start_step, extra)."""
        self.optimizer_, self.scheduler_ = optimizer, scheduler
        start_step, extra = 0, {}
        stale = None if self.config.resume else latest_checkpoint(self.checkpoint_dir)
        if stale is not None:  # a fresh run would mix its checkpoints with the old run's; a later resume could
            raise ConfigError(  # pick up the old run's higher step
                f"config key 'resume': {self.checkpoint_dir} holds a checkpoint of an earlier run ({stale.name}). "
                "Pass resume=true to continue that run, or choose a new output_dir (or delete that folder) to "
                "start over")
        if self.config.resume:
            path = latest_checkpoint(self.checkpoint_dir)
            if path is None:
                log.warning("resume=true but no complete checkpoint in %s: starting from step 0", self.checkpoint_dir)
            else:
                start_step, extra = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
                self.guard.load_state_dict(extra.get("guard", self.guard.state_dict()))
                log.info("resumed from %s (step %d)", path, start_step)
        self._first_step = self.steps_done = start_step
        if self.main:
            write_config(self.config, self.dir / "config.yaml")
        self.logger = RunLogger(self.dir, total_steps=total_steps, start_step=start_step,
                                report_to=self.config.report_to, progress=self.config.progress, enabled=self.main,
                                config=to_dict(self.config))
        self._step_start = time.perf_counter()
        return start_step, extra

    def end_step(self, step: int, metrics: dict, *, model, tokenizer, extra=None, tokens: int = 0) -> dict:
        """Log the step's metrics and write a checkpoint when due. `step` counts completed steps."""
        elapsed = time.perf_counter() - self._step_start
        self._step_start = time.perf_counter()
        metrics = {k: _whole(v) for k, v in metrics.items()}
        metrics.update({"lr": self.scheduler_.get_last_lr()[0], "step_time": elapsed, **peak_memory(self.device)})
        self.steps_done = step
        if tokens:
            metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        if self.guard.skipped:
            metrics["skipped_steps"] = self.guard.skipped
        if step == self._first_step + 1 or (self.config.save_steps and step % self.config.save_steps == 0):
            self.check_replicas(model, step)
        row = {}
        if step % max(1, self.config.log_steps) == 0:
            row = self.logger.log(step, metrics)
        self.logger.advance()
        if self.config.save_steps and step % self.config.save_steps == 0:
            self.checkpoint(step, model=model, tokenizer=tokenizer, extra=extra)
        return row

    def check_replicas(self, model, step: int) -> None:
        """Stop when the DDP ranks' weights have drifted apart (after the first step and before each checkpoint):
        a recipe whose gradients are not averaged must not go on training N different models."""
        if distributed.replicas_differ(model):
            raise RuntimeError(f"rank {distributed.rank()}: after step {step} the model's weights differ between "
                               "ranks, so their gradients are not being averaged. Train through the model returned "
                               "by run.wrap(model): DDP averages gradients only for forwards through the wrapper.")

    def checkpoint(self, step: int, *, model, tokenizer, extra=None) -> None:
        """Write `checkpoints/step-N/` (rank 0 writes; every rank must call it)."""
        extra = dict(extra() if callable(extra) else (extra or {}))
        extra["guard"] = self.guard.state_dict()
        model_state = gather_model_state(model)  # whole weights from FSDP shards; None otherwise
        optimizer_state = gather_optimizer_state(model, self.optimizer_)
        rng_ranks = distributed.all_gather_object(rng_state())
        if self.main:
            save_checkpoint(self.checkpoint_dir, step, model=model, tokenizer=tokenizer, optimizer=self.optimizer_,
                            scheduler=self.scheduler_, extra=extra, keep_last=self.config.keep_last,
                            model_state=model_state, optimizer_state=optimizer_state, rng_ranks=rng_ranks)
        distributed.barrier()

    def finish(self, model, tokenizer, *, merge_lora: bool = True) -> Path:
        """Save `final/` (a Hugging Face folder; LoRA merged, the adapter also kept in `adapter/`)."""
        final = self.dir / "final"
        model_state = gather_model_state(model)  # whole weights from FSDP shards; None otherwise
        if self.main:  # summary.json: the run's peak memory, wall time and steps
            (self.dir / "summary.json").write_text(json.dumps({
                "steps": self.steps_done, "wall_time_s": round(time.time() - self.start_time, 2),
                **peak_memory(self.device)}, indent=2) + "\n")
            from tether.models import is_peft, unwrap

            if is_peft(unwrap(model)):
                save_model_folder(model, tokenizer, self.dir / "adapter")
            save_model_folder(model, tokenizer, final, state=model_state, merge_lora=merge_lora)
        if self.logger is not None:
            self.logger.close()
        distributed.barrier()
        return final


def write_config(config, path: Path) -> None:
    """Write the resolved config to `path` atomically (a temporary file renamed over it): a reader sees the old
    file or the new one, never a half-written one."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        save_config(config, temporary)
        os.replace(temporary, path)
    except OSError as err:
        raise OSError(err.errno, f"cannot write the run folder {path.parent}: {err.strerror}") from None


def _whole(value):
    """A metric as a plain tensor: FSDP returns some (e.g. the gradient norm) as replicated DTensors."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def open_run_dir(config) -> Path:
    """The run folder of a recipe that trains no model itself (best-of-n, rft): join the process group,
    create `output_dir` and write config.yaml there (on the main rank)."""
    distributed.init(config.distributed.timeout_s)
    out = Path(config.output_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    return out


def autocast(run: Run):
    """bf16/fp16 autocast on CUDA; a no-op context on CPU float32."""
    if run.device.type == "cuda" and run.dtype != torch.float32:
        return torch.autocast("cuda", dtype=run.dtype)
    return torch.autocast("cpu", enabled=False)
