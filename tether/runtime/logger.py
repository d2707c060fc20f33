"""Run logging: one JSON line per step in metrics.jsonl, TensorBoard (and W&B if asked), a progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from tether.runtime import distributed

log = logging.getLogger("tether")


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else value.detach().float().tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def trim_step_lines(path: Path, last_step: int) -> None:
    """Keep the lines of a one-JSON-object-per-line step log up to `last_step` (on resume). A line that does
    not parse was torn by a crash mid-write, after the checkpoint: dropped. The file is replaced atomically,
    so a crash during the trim loses nothing."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            kept.append(line)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)


class RunLogger:
    """Writes metrics for rank 0 only; every other rank gets a logger that writes nothing."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, report_to=("tensorboard",),
                 progress: bool = True, enabled: bool = True, config: dict | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.tensorboard = self.wandb = self.bar = None
        if not enabled:
            return
        self.metrics_file = open(run_dir / "metrics.jsonl", "a" if start_step else "w")
        if start_step:
            self._truncate_after(start_step)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ImportError("report_to includes wandb but it is not installed: pip install wandb") from None
            self.wandb = wandb.init(dir=str(run_dir), config=config, resume="allow")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 10.0)
        self.start_time = time.time()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop metrics lines written after the checkpoint so the file equals an unbroken run."""
        self.metrics_file.close()
        path = self.run_dir / "metrics.jsonl"
        trim_step_lines(path, step)
        self.metrics_file = open(path, "a")

    def log(self, step: int, metrics: dict) -> dict:
        if not self.enabled:
            return {}
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if self.bar is not None:
            shown = {k: row[k] for k in ("loss", "reward_mean") if isinstance(row.get(k), (int, float))}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        return row

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()


class SampleWriter:
    """Appends every completion of every `every`-th step to samples.jsonl. Every rank calls `write`; the rank
    with `enabled` (the main rank) writes all ranks' completions, in rank order (the global batch's order).
    On resume, lines of steps after the checkpoint are dropped, so the file equals an uninterrupted run's."""

    def __init__(self, run_dir: Path, every: int, *, start_step: int = 0, enabled: bool = True):
        self.path, self.every, self.enabled = Path(run_dir) / "samples.jsonl", every, enabled and every > 0
        if self.enabled and start_step and self.path.exists():
            trim_step_lines(self.path, start_step)
        elif self.enabled and not start_step and self.path.exists():
            self.path.unlink()

    def write(self, step: int, rollout, advantages: Tensor | None = None) -> None:
        if self.every <= 0 or step % self.every:
            return
        rows = []
        for i, prompt in enumerate(rollout.samples.prompt_index):
            row = {"step": step, "prompt": rollout.prompts[prompt].prompt,
                   "completion": rollout.samples.completions[i], "reward": rollout.scores.total[i],
                   "rewards": {name: values[i] for name, values in rollout.scores.per_function.items()},
                   "finish_reason": rollout.samples.finish_reasons[i],
                   "length": len(rollout.samples.completion_ids[i])}
            if advantages is not None:
                row["advantage"] = float(advantages[i])
            if hasattr(rollout.samples, "episode"):  # an EpisodeBatch: turns, tool calls, observations
                row["episode"] = rollout.samples.episode(i)
            rows.append(row)
        rows = distributed.gather_lists(rows)
        if self.enabled:
            with self.path.open("a") as file:
                file.writelines(json.dumps(row) + "\n" for row in rows)
