"""Advantage estimators: outcome-reward estimators by name (grpo, dr_grpo, rloo, reinforce,
reinforce_pp, reinforce_pp_baseline), GAE for a learned critic, and InstructGPT's
KL-shaped per-token rewards.

Outcome estimators share one signature, looked up with `get_advantage_estimator`:

    fn(rewards, group_size, *, <the keywords it reads>) -> (advantages (N,), metrics)

rewards (N,) = (B * G,) laid out group by group: rows [g*G : (g+1)*G] are the G completions
of prompt g. A reward of None ("cannot judge") is NaN here: it is left out of every baseline
and statistic and its advantage is 0. A group of one, or a group whose remaining rewards
are all equal, gets advantage 0 (never NaN). Each estimator declares the keywords it reads
(eps, std for the normalising ones, baseline for reinforce); any other is a TypeError naming it.
A recipe that holds one set of knobs for every estimator passes
`tether.losses.accepted_kwargs(estimator, std=..., baseline=...)`.
Imports only torch and tether.ops (which imports only torch).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tether.ops import masked_mean, masked_sum, masked_var

Metrics = dict[str, Tensor]

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {}


def register_advantage_estimator(name: str):
    def add(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


def get_advantage_estimator(name: str) -> Callable[..., tuple[Tensor, Metrics]]:
    if name == "gae":
        raise ValueError("'gae' needs a critic's values and token rewards: call tether.advantages.gae directly")
    if name not in ADVANTAGE_ESTIMATORS:
        valid = ", ".join(sorted(ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {valid} (and gae, called directly)")
    return ADVANTAGE_ESTIMATORS[name]


# --------------------------------------------------------------------------- group helpers


def _grouped(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(N,) rewards -> (rewards (B, G) with NaN replaced by 0, valid mask (B, G), valid count (B,))."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    grouped = rewards.float().view(-1, group_size)  # (B, G)
    valid = ~torch.isnan(grouped)  # (B, G)
    return torch.where(valid, grouped, torch.zeros_like(grouped)), valid, valid.sum(-1)  # ..., (B,)


def _group_std(r: Tensor, valid: Tensor, std: str) -> Tensor:
    if std not in ("population", "sample"):
        raise ValueError(f"std must be 'population' or 'sample', got {std!r}")
    return masked_var(r, valid, unbiased=(std == "sample"), dim=-1).sqrt()  # (B,)


def _degenerate_groups(r: Tensor, valid: Tensor) -> Tensor:
    """(B,) True where a group has <= 1 valid reward or all its valid rewards are equal."""
    highest = torch.where(valid, r, torch.full_like(r, -torch.inf)).amax(-1)
    lowest = torch.where(valid, r, torch.full_like(r, torch.inf)).amin(-1)
    return (valid.sum(-1) <= 1) | (highest == lowest)


def _finish(advantages: Tensor, r: Tensor, valid: Tensor, zero_groups: Tensor) -> tuple[Tensor, Metrics]:
    """Zero the advantages of NaN rewards and degenerate groups; flatten to (N,); metrics."""
    keep = valid & ~zero_groups.unsqueeze(-1)  # (B, G)
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages)).reshape(-1)  # (N,)
    flat_valid = valid.reshape(-1)
    metrics = {
        "zero_variance_groups": zero_groups.float().mean(),
        "adv_mean": masked_mean(advantages, flat_valid),
        "adv_std": masked_var(advantages, flat_valid, unbiased=False).sqrt(),
        "reward_mean": masked_mean(r, valid),
        "none_rewards": (~valid).sum(),
    }
    return advantages, {k: v.detach() for k, v in metrics.items()}


# --------------------------------------------------------------------------- outcome estimators


@register_advantage_estimator("grpo")
def grpo_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6, std: str = "population"
) -> tuple[Tensor, Metrics]:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each group (Shao et al. 2024, eq. 3).

    std="population" divides by G (torch unbiased=False; TRL and verl use the sample std,
    G - 1: pass std="sample" to match them).
    """
    r, valid, _count = _grouped(rewards, group_size)  # (B, G)
    mean = masked_mean(r, valid, dim=-1).unsqueeze(-1)  # (B, 1)
    sigma = _group_std(r, valid, std).unsqueeze(-1)  # (B, 1)
    advantages = (r - mean) / (sigma + eps)  # GRPO advantage, Shao et al. 2024, eq. 3
    return _finish(advantages, r, valid, _degenerate_groups(r, valid))


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_size: int) -> tuple[Tensor, Metrics]:
    """A_i = r_i - mean(r): GRPO without the std division (Dr. GRPO, Liu et al. 2025)."""
    r, valid, _count = _grouped(rewards, group_size)
    mean = masked_mean(r, valid, dim=-1).unsqueeze(-1)  # (B, 1)
    return _finish(r - mean, r, valid, _degenerate_groups(r, valid))


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> tuple[Tensor, Metrics]:
    """A_i = r_i - mean_{j != i} r_j, leave-one-out baseline (Ahmadian et al. 2024)."""
    r, valid, count = _grouped(rewards, group_size)
    others_sum = masked_sum(r, valid, dim=-1).unsqueeze(-1) - r  # (B, G) sum of the other valid rewards
    others = others_sum / (count.unsqueeze(-1) - 1).clamp(min=1)  # (B, G) leave-one-out mean
    return _finish(r - others, r, valid, _degenerate_groups(r, valid))


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6, std: str = "population"
) -> tuple[Tensor, Metrics]:
    """REINFORCE++ (Hu 2025): no per-prompt baseline; rewards normalised over the whole batch,
    (r - mean_batch) / (std_batch + eps). The zero rule applies to the batch: if every valid
    reward in the batch is equal, all advantages are 0. group_size only shapes the metrics.
    """
    r, valid, _count = _grouped(rewards, group_size)
    flat_r, flat_valid = r.reshape(1, -1), valid.reshape(1, -1)  # the batch as one group
    mean = masked_mean(flat_r, flat_valid)
    sigma = _group_std(flat_r, flat_valid, std)
    advantages = (r - mean) / (sigma + eps)  # (B, G) REINFORCE++ batch normalisation, Hu 2025
    batch_degenerate = _degenerate_groups(flat_r, flat_valid).expand(r.shape[0])  # (B,)
    advantages, metrics = _finish(advantages, r, valid, batch_degenerate)
    metrics["zero_variance_groups"] = _degenerate_groups(r, valid).float().mean()
    return advantages, metrics


@register_advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6, std: str = "population"
) -> tuple[Tensor, Metrics]:
    """REINFORCE++-baseline (Hu 2025; OpenRLHF `reinforce_baseline`): subtract the group mean,
    then normalise by the std of those differences over the whole batch."""
    r, valid, _count = _grouped(rewards, group_size)
    zero_groups = _degenerate_groups(r, valid)
    centred = r - masked_mean(r, valid, dim=-1).unsqueeze(-1)  # (B, G)
    keep = valid & ~zero_groups.unsqueeze(-1)
    centred = torch.where(keep, centred, torch.zeros_like(centred))
    sigma = _group_std(centred.reshape(1, -1), valid.reshape(1, -1), std)
    return _finish(centred / (sigma + eps), r, valid, zero_groups)


@register_advantage_estimator("reinforce")
def reinforce_advantages(
    rewards: Tensor, group_size: int, *, baseline: float | Tensor = 0.0
) -> tuple[Tensor, Metrics]:
    """A_i = r_i - b with a baseline b from earlier batches (Williams 1992).

    The recipe keeps a `RunningMeanBaseline` and calls
        adv, metrics = estimator(rewards, G, baseline=tracker.value); tracker.update(rewards)
    so the baseline never includes the rewards it is subtracted from. Only NaN rewards get 0.
    """
    r, valid, _count = _grouped(rewards, group_size)
    no_degenerate = torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)  # (B,) no group rule
    advantages, metrics = _finish(r - baseline, r, valid, no_degenerate)
    metrics["zero_variance_groups"] = _degenerate_groups(r, valid).float().mean()
    metrics["baseline"] = torch.as_tensor(baseline, dtype=torch.float32).detach()
    return advantages, metrics


class RunningMeanBaseline:
    """Exponential moving average of batch-mean rewards for the `reinforce` estimator.

    value starts at 0.0; the first update sets it to that batch's mean, later ones to
    decay * value + (1 - decay) * batch mean. NaN rewards are ignored.
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"baseline decay must be in [0, 1), got {decay}")
        self.decay, self.value, self.num_updates = decay, 0.0, 0

    def update(self, rewards: Tensor) -> float:
        valid = ~torch.isnan(rewards)
        if not bool(valid.any()):
            return self.value
        batch_mean = float(masked_mean(torch.nan_to_num(rewards.float()), valid))
        first = self.num_updates == 0
        self.value = batch_mean if first else self.decay * self.value + (1 - self.decay) * batch_mean
        self.num_updates += 1
        return self.value

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": self.value, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.num_updates = float(state["value"]), int(state["num_updates"])


# --------------------------------------------------------------------------- token-level


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16), batched over B.

    token_rewards, values, mask (B, T); the step after the last unmasked token is terminal
    (value 0). Masked positions between valid tokens (an episode's observation tokens, written by the
    environment) are skipped: the token before them bootstraps from the next valid token, as one step.
      delta_t = r_t + gamma * V_{t+1} - V_t
      A_t     = delta_t + gamma * lam * A_{t+1}
    Returns (advantages, returns = advantages + values), both (B, T) and 0 at masked positions.
    """
    valid = mask.bool()
    rewards = torch.where(valid, token_rewards, torch.zeros_like(token_rewards)).float()
    values = torch.where(valid, values, torch.zeros_like(values)).float()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros(B, device=rewards.device)  # (B,) V_{t+1}, 0 past the end
    next_advantage = torch.zeros(B, device=rewards.device)  # (B,) A_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,) TD error
        advantage = delta + gamma * lam * next_advantage  # (B,) GAE recursion
        advantage = torch.where(valid[:, t], advantage, torch.zeros_like(advantage))
        advantages[:, t] = advantage
        next_value = torch.where(valid[:, t], values[:, t], next_value)  # masked positions are skipped
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def kl_shaped_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, *, beta: float) -> Tensor:
    """InstructGPT per-token reward (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019):
    -beta * kl_t at every completion token, plus the sequence score at its last token.

    scores (B,), kl (B, T) per-token KL estimate, mask (B, T) -> (B, T), 0 where masked.
    """
    valid = mask.bool()
    rewards = torch.where(valid, -beta * kl, torch.zeros_like(kl)).float()  # (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)  # (B, T)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(-1)  # (B,) -1 if empty
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores.float()[has_tokens]
    return rewards
