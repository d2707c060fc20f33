"""How noisy is the policy gradient? The variance of the per-completion gradient estimate (seed 003, ex. 15).

A step's policy gradient is a mean over N completions of one-sample estimates (REINFORCE, Williams 1992):

    g_i = ∇_θ [ −Σ_t A_{i,t} · log π_θ(o_{i,t} | q_i, o_{i,<t}) ]            (A_{i,t} = A_i for GRPO's family)
    ĝ   = (1/N) Σ_i g_i

At θ = θ_old (the start of a step's update, ratio 1, nothing clipped) this is the gradient of the clipped
surrogate, so it is the gradient the update follows. The estimator here uses per-sample gradients of the
step's own completions, one backward each on a shared forward, and reports

    grad_var          tr Cov(g_i)   = (Σ_i ‖g_i‖² − N ‖ḡ‖²) / (N − 1)   (unbiased: honest for small N)
    grad_var_of_mean  tr Cov(ĝ)     = grad_var / N                      (the noise of the step's gradient)
    grad_mean_norm_sq ‖ḡ‖²                                                 (the signal, biased up by grad_var_of_mean)

Per-sample gradients (rather than the spread across a step's few minibatches) give N − 1 degrees of freedom
instead of M − 1 for M minibatches, and the same number whatever `num_minibatches` is. Their cost is one
backward per completion. Sums are kept in float64 (Σ‖g‖² − N‖ḡ‖² cancels when the variance is small next to
the mean) and summed over ranks, so N is the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tether.runtime import distributed


def reinforce_losses(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """(N,) per-completion REINFORCE surrogate −Σ_t A_t · log π(o_t) (Williams 1992, eq. 6 summed over the
    completion's tokens); `advantages` is (N,) per completion or (N, C) per token, `mask` (N, C)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (N, 1): one advantage for every token of a completion
    advantages = torch.nan_to_num(advantages.float())  # an unjudged completion carries no gradient
    return -(advantages * logprobs * mask).sum(-1)  # (N,)


def trainable_parameters(model) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class GradientMoments:
    """Σ g_i, Σ ‖g_i‖² and N over per-sample gradients g_i = ∇ loss_i of `params`, then `metrics()`."""

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.sum = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=params[0].device)
        self.sum_sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
        self.count = 0

    def add(self, losses: Tensor) -> None:
        """One backward per entry of `losses` (N,) on their shared graph; .grad is left untouched."""
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[i], self.params, retain_graph=i + 1 < losses.shape[0],
                                        allow_unused=True)
            g = torch.cat([(torch.zeros_like(p) if d is None else d).reshape(-1)
                           for p, d in zip(self.params, grads)]).double()  # (P,)
            self.sum += g
            self.sum_sq += g @ g
            self.count += 1

    def metrics(self) -> dict[str, Tensor]:
        """grad_var (tr Cov of one sample's gradient), grad_var_of_mean and grad_mean_norm_sq over all ranks."""
        total = distributed.all_reduce_sum(torch.cat([self.sum, self.sum_sq[None],
                                                      self.sum.new_tensor([float(self.count)])]))
        n, mean, sum_sq = total[-1], total[:-2] / total[-1].clamp(min=1), total[-2]
        if n < 2:
            raise ValueError(f"the gradient variance needs at least 2 samples, got {int(n)}")
        var = ((sum_sq - n * (mean @ mean)) / (n - 1)).clamp(min=0)  # tr Cov(g_i), unbiased
        return {"grad_var": var.float(), "grad_var_of_mean": (var / n).float(),
                "grad_mean_norm_sq": (mean @ mean).float()}


def policy_gradient_variance(model, logprob_fn: Callable[[slice], Tensor], advantages: Tensor, mask: Tensor,
                             micro_size: int) -> dict[str, Tensor]:
    """The variance metrics of the per-completion policy gradient (module docstring) over a rollout's N
    completions: `advantages` (N,) or (N, C), `mask` (N, C) (the loss mask), and `logprob_fn(rows)` returning
    log π of the completion tokens of those rows (n, C) with gradient through `model`'s trainable weights.
    One forward per `micro_size` rows, one backward per completion."""
    moments = GradientMoments(trainable_parameters(model))
    for start in range(0, advantages.shape[0], micro_size):
        rows = slice(start, start + micro_size)
        moments.add(reinforce_losses(logprob_fn(rows), advantages[rows], mask[rows]))
    return moments.metrics()
