"""Step metrics averaged over micro-batches and ranks."""

from __future__ import annotations

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
