"""What every recipe needs around its loop, written once: the run folder, device, logging,
checkpoints and exact resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tether.config import save_config, to_dict
from tether.models import save as save_model
from tether.runtime import distributed
from tether.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tether.runtime.device import choose_device, choose_dtype, seed_everything
from tether.runtime.logger import RunLogger
from tether.runtime.optim import StepGuard, build_optimizer, build_scheduler

log = logging.getLogger("tether")


class Run:
    """A training run in `config.output_dir`.

    Typical use in a recipe::

        run = Run(config)
        model = ...; optimizer, scheduler = run.optimizer(model, total_steps)
        start_step, extra = run.start(model, tokenizer, optimizer, scheduler, total_steps)
        for step in range(start_step, total_steps):
            ...  # forward/backward
            grad_norm, applied = run.guard.step(model, optimizer, scheduler, config.max_grad_norm)
            run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, extra=lambda: {...})
        run.finish(model, tokenizer)
    """

    def __init__(self, config):
        distributed.init()
        self.config = config
        self.dir = Path(config.output_dir)
        self.main = distributed.is_main()
        if self.main:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                save_config(config, self.dir / "config.yaml")
            except OSError as err:
                raise OSError(err.errno, f"cannot write the run folder {self.dir}: {err.strerror}") from None
        distributed.barrier()
        self.device = choose_device(config.device)
        self.dtype = choose_dtype(config.dtype, self.device)
        seed_everything(config.seed)
        self.guard = StepGuard()
        self.logger: RunLogger | None = None
        self.optimizer_ = self.scheduler_ = None
        self._step_start = time.perf_counter()

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    def optimizer(self, model, total_steps: int):
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
        if self.config.resume:
            path = latest_checkpoint(self.checkpoint_dir)
            if path is None:
                log.warning("resume=true but no complete checkpoint in %s: starting from step 0", self.checkpoint_dir)
            else:
                start_step, extra = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
                self.guard.load_state_dict(extra.get("guard", self.guard.state_dict()))
                log.info("resumed from %s (step %d)", path, start_step)
        self.logger = RunLogger(self.dir, total_steps=total_steps, start_step=start_step,
                                report_to=self.config.report_to, progress=self.config.progress, enabled=self.main,
                                config=to_dict(self.config))
        self._step_start = time.perf_counter()
        return start_step, extra

    def end_step(self, step: int, metrics: dict, *, model, tokenizer, extra=None, tokens: int = 0) -> dict:
        """Log the step's metrics and write a checkpoint when due. `step` counts completed steps."""
        elapsed = time.perf_counter() - self._step_start
        self._step_start = time.perf_counter()
        metrics = {**metrics, "lr": self.scheduler_.get_last_lr()[0], "step_time": elapsed}
        if tokens:
            metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        if self.guard.skipped:
            metrics["skipped_steps"] = self.guard.skipped
        row = {}
        if step % max(1, self.config.log_steps) == 0:
            row = self.logger.log(step, metrics)
        self.logger.advance()
        if self.config.save_steps and step % self.config.save_steps == 0:
            self.checkpoint(step, model=model, tokenizer=tokenizer, extra=extra)
        return row

    def checkpoint(self, step: int, *, model, tokenizer, extra=None) -> None:
        extra = dict(extra() if callable(extra) else (extra or {}))
        extra["guard"] = self.guard.state_dict()
        if self.main:
            save_checkpoint(self.checkpoint_dir, step, model=model, tokenizer=tokenizer, optimizer=self.optimizer_,
                            scheduler=self.scheduler_, extra=extra, keep_last=self.config.keep_last)
        distributed.barrier()

    def finish(self, model, tokenizer, *, merge_lora: bool = True) -> Path:
        """Save `final/` (a Hugging Face folder; LoRA merged, the adapter also kept in `adapter/`)."""
        final = self.dir / "final"
        if self.main:
            from tether.models import is_peft, unwrap

            if is_peft(unwrap(model)):
                save_model(model, tokenizer, self.dir / "adapter")
            save_model(model, tokenizer, final, merge_lora=merge_lora)
        if self.logger is not None:
            self.logger.close()
        distributed.barrier()
        return final


def autocast(run: Run):
    """bf16/fp16 autocast on CUDA; a no-op context on CPU float32."""
    if run.device.type == "cuda" and run.dtype != torch.float32:
        return torch.autocast("cuda", dtype=run.dtype)
    return torch.autocast("cpu", enabled=False)
