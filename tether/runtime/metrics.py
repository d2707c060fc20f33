"""Step metrics averaged over micro-batches and ranks."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor

from tether.runtime import distributed


class MetricMeans:
    """Weighted means of per-micro-batch metrics, reduced over ranks into global means.

    Each `add` puts value × weight into a key's sum and weight into its total (e.g. a micro-batch's mean
    weighted by its examples or its tokens); `reduce` sums both over ranks and divides."""

    def __init__(self):
        self.sums: dict[str, list[Tensor]] = {}  # key → [Σ value·w, Σ w]

    def add(self, metrics: dict[str, Tensor], weight: float | Tensor, weights: dict | None = None) -> None:
        """Add each scalar metric with `weight`, or with `weights[key]` for the keys `weights` names."""
        for key, value in metrics.items():
            w = torch.as_tensor((weights or {}).get(key, weight), dtype=torch.float32, device=value.device)
            value_sum, weight_sum = self.sums.get(key, (0.0, 0.0))
            self.sums[key] = [value_sum + value.detach().float() * w, weight_sum + w]

    def reduce(self) -> dict[str, Tensor]:
        """{key: Σ value·w / Σ w} over every rank, in one all-reduce; {} when nothing was added."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        stacked = distributed.all_reduce_sum(torch.stack([torch.stack(self.sums[k]) for k in keys]))  # (K, 2)
        return {k: stacked[i, 0] / stacked[i, 1].clamp(min=1e-12) for i, k in enumerate(keys)}


class UpdateStats:
    """Metrics of one step's update. Loss terms add up over micro-batches (each is its share of the
    minibatch loss) and are averaged over optimizer steps; other metrics are token-weighted means."""

    def __init__(self):
        self.losses: dict[str, Tensor] = {}
        self.means = MetricMeans()
        self.grad_norms: list[Tensor] = []

    def add(self, losses: dict, metrics: dict, tokens: float | Tensor) -> None:
        for key, value in losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + value.detach().float()
        self.means.add(metrics, tokens)

    def optimizer_step(self, grad_norm: Tensor) -> None:
        self.grad_norms.append(grad_norm.detach().float().cpu())

    def reduce(self) -> dict[str, Tensor]:
        updates = max(len(self.grad_norms), 1)
        out = self.means.reduce()
        out.update({key: distributed.all_reduce_sum(value) / updates for key, value in self.losses.items()})
        if self.grad_norms:
            out["grad_norm"] = torch.stack(self.grad_norms).mean()
        return out


class Timer:
    """Wall-clock seconds per section of a step (generation, scoring, reference, update, ...)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}": seconds for name, seconds in self.seconds.items()}
