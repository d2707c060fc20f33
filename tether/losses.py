"""Pure loss functions: SFT, Bradley-Terry, the DPO family, KTO, KL estimators,
PPO policy (PPO, GSPO) / value / entropy terms, and distillation.

Every loss returns `(loss, metrics)`; metrics are detached tensors (local to the
batch given, never `.item()`-ed here). Hyperparameters are keyword arguments, and
one a function does not declare is a TypeError. Families with one signature are
looked up by name: `get_preference_loss`, `get_policy_loss`, `get_kl_estimator`.
Imports only torch (and tether.ops, which imports only torch). The stateful KL
coefficient controllers live in `tether.kl_control`.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.ops import Count, aggregate, kl_from_logits, masked_mean, masked_sum, masked_var

Metrics = dict[str, Tensor]


def _detached(**values: Tensor) -> Metrics:
    return {name: value.detach() for name, value in values.items()}


class Registry(dict):
    """One family of functions with one signature, by name: `@family.register(name)` above a function adds
    it, `family.lookup(name)` returns it or raises ValueError listing the valid names."""

    def __init__(self, family: str):
        super().__init__()
        self.family = family

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            self[name] = fn
            return fn

        return add

    def lookup(self, name: str) -> Callable[..., tuple[Tensor, Metrics]]:
        if name not in self:
            raise ValueError(f"unknown {self.family} {name!r}; valid: {', '.join(sorted(self))}")
        return self[name]


# --------------------------------------------------------------------------- SFT and reward model


def sft_loss(
    logprobs: Tensor, mask: Tensor, *, num_tokens: Count = None, agg_mode: str = "token_mean",
    num_seqs: Count = None,
) -> tuple[Tensor, Metrics]:
    """Negative log-likelihood of the completion tokens: -J_sft = -mean_t log pi(a_t | s, a_<t).

    logprobs, mask (B, T). Default token_mean over all completion tokens (pass the global
    `num_tokens` under gradient accumulation); agg_mode="seq_mean_token_mean" gives the
    seeds' per-sequence 1/|a| form. metrics: nll (mean over this batch's tokens), num_tokens.
    """
    loss = -aggregate(logprobs, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)
    return loss, _detached(nll=-masked_mean(logprobs, mask), num_tokens=mask.sum())


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, *, margin: Optional[Tensor | float] = None,
    center_coef: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Reward-model loss -log sigma(r_w - r_l - m), mean over pairs; rewards (B,).

    Optional margin m (B,) or scalar (Llama 2). center_coef adds c * mean((r_w + r_l)^2)
    to pin rewards near zero (Eisenstein et al. 2023; TRL's center_rewards_coefficient).
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()  # Bradley-Terry: P(y_w > y_l) = sigma(r_w - r_l)
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss, _detached(
        accuracy=(diff > 0).float().mean(), margin=diff.mean(),
        rewards_chosen=chosen_rewards.mean(), rewards_rejected=rejected_rewards.mean(),
    )


# --------------------------------------------------------------------------- DPO family
# One signature, looked up by name with `get_preference_loss`:
#   fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
#      chosen_lengths=None, rejected_lengths=None, <its own knobs>) -> (loss, metrics)
# *_logps are (B,) SUMMED completion log-probs, *_lengths (B,) completion token counts; every member
# accepts the lengths, the length-normalised ones need them. A knob a loss does not declare is a
# TypeError: a recipe holding one set of knobs for the family passes `accepted_kwargs(fn, **knobs)`.
# The reference-based losses are functions of one number per pair,
#   h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))   (B,)
# and log the implicit rewards beta * (log pi - log pi_ref) of the summed log-probs
# (Rafailov et al. 2023, eq. 5) whatever the loss.

PREFERENCE_LOSSES = Registry("preference loss")
register_preference_loss = PREFERENCE_LOSSES.register
get_preference_loss = PREFERENCE_LOSSES.lookup


def accepted_kwargs(fn: Callable, **candidates: object) -> dict[str, object]:
    """The keyword arguments among `candidates` that `fn` declares.

    For a recipe that holds one set of knobs for a whole family (dpo's beta, label_smoothing, gamma, ...;
    grpo's std= and baseline= for any estimator): each member gets only what it reads, while a direct call
    with a keyword the function does not declare stays a TypeError naming it.
    """
    declared = inspect.signature(fn).parameters
    return {name: value for name, value in candidates.items() if name in declared}


def _log_ratios(name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"preference loss {name!r} needs reference log-probs: "
                         "pass ref_chosen_logps and ref_rejected_logps")
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps  # (B,), (B,)


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> Metrics:
    return _detached(
        rewards_chosen=chosen_rewards.mean(), rewards_rejected=rejected_rewards.mean(),
        rewards_margin=(chosen_rewards - rejected_rewards).mean(),
        rewards_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
        logps_chosen=chosen_logps.mean(), logps_rejected=rejected_logps.mean(),
    )


@register_preference_loss("dpo")
def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
             label_smoothing: float = 0.0, chosen_lengths=None, rejected_lengths=None):
    """DPO, Rafailov et al. 2023, eq. 7: -log sigma(beta h), mean over pairs.

    label_smoothing eps > 0 gives conservative DPO (`cdpo_loss`), as TRL's loss_type="sigmoid" does.
    Lengths are not used.
    """
    ratio_w, ratio_l = _log_ratios("dpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = ratio_w - ratio_l  # (B,)
    eps = label_smoothing  # eps = 0: DPO eq. 7; eps > 0: cDPO (Mitchell 2023)
    losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)  # (B,)
    return losses.mean(), _preference_metrics(beta * ratio_w, beta * ratio_l, chosen_logps, rejected_logps)


@register_preference_loss("cdpo")
def cdpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
              label_smoothing: float = 0.0, chosen_lengths=None, rejected_lengths=None):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), eps = label_smoothing the chance a label is flipped.

    The cross-entropy of DPO's sigma(beta h) against the soft label (1 - eps, eps); it is `dpo_loss` with
    label_smoothing, registered under its own name. eps = 0 is DPO.
    """
    return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                    label_smoothing=label_smoothing)


@register_preference_loss("robust")
def robust_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
                    label_smoothing: float = 0.0, chosen_lengths=None, rejected_lengths=None):
    """Robust DPO, Chowdhury et al. 2024: [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps).

    Unbiased under a label-flip rate eps = label_smoothing, 0 <= eps < 1/2; eps = 0 is DPO.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    ratio_w, ratio_l = _log_ratios("robust", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = ratio_w - ratio_l  # (B,)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)  # (B,)
    return losses.mean(), _preference_metrics(beta * ratio_w, beta * ratio_l, chosen_logps, rejected_logps)


@register_preference_loss("hinge")
def hinge_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
               chosen_lengths=None, rejected_lengths=None):
    """SLiC-style hinge on the DPO log-ratio (Zhao et al. 2023; the log-ratio against the reference, as TRL):
    max(0, 1 - beta h), mean over pairs."""
    ratio_w, ratio_l = _log_ratios("hinge", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * (ratio_w - ratio_l))  # (B,)
    return losses.mean(), _preference_metrics(beta * ratio_w, beta * ratio_l, chosen_logps, rejected_logps)


@register_preference_loss("ipo")
def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
             chosen_lengths, rejected_lengths):
    """IPO, Azar et al. 2023 (the sampled IPO loss): (h_bar - 1/(2 tau))^2, mean over pairs; beta is their tau.

    h_bar uses LENGTH-AVERAGED log-ratios, as TRL does (its loss_type="ipo" divides the policy and reference
    log-probs by the completion length): with summed log-probs the 1/(2 beta) target would be a per-sequence
    margin that grows with length. The implicit rewards in the metrics still use the summed log-ratios.
    """
    ratio_w, ratio_l = _log_ratios("ipo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h_bar = ratio_w / chosen_lengths.clamp(min=1) - ratio_l / rejected_lengths.clamp(min=1)  # (B,)
    losses = (h_bar - 1 / (2 * beta)) ** 2  # (B,)
    return losses.mean(), _preference_metrics(beta * ratio_w, beta * ratio_l, chosen_logps, rejected_logps)


@register_preference_loss("simpo")
def simpo_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta,
               chosen_lengths, rejected_lengths, gamma: float = 0.5):
    """SimPO, Meng et al. 2024, eq. 6: -log sigma(beta (avg_w - avg_l) - gamma), reference-free.

    `gamma` is the plain target margin gamma of the paper (TRL's CPO `simpo_gamma`, default 0.5),
    NOT gamma/beta. avg = summed log-prob / length. References are ignored.
    """
    avg_w = chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
    avg_l = rejected_logps / rejected_lengths.clamp(min=1)  # (B,)
    loss = -F.logsigmoid(beta * (avg_w - avg_l) - gamma).mean()
    return loss, _preference_metrics(beta * avg_w, beta * avg_l, chosen_logps, rejected_logps)


# log(1 - p) is -inf at p = 1; an average log-prob of exactly 0 is clamped just below it.
_MAX_AVG_LOGP = -1e-6


@register_preference_loss("orpo")
def orpo_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta,
              chosen_lengths, rejected_lengths, orpo_lambda: Optional[float] = None,
              nll_tokens: Optional[torch.Tensor | float] = None):
    """ORPO, Hong et al. 2024, eq. 6: L = NLL(chosen) + lambda * -log sigma(log odds_w - log odds_l).

    lambda is `beta`, as in TRL's ORPOTrainer (`orpo_lambda`, if given, overrides it).
    log odds(y) = log(p / (1 - p)) with log p the length-averaged log-prob (eq. 4):
    avg - log(1 - exp(avg)). NLL is the token mean over the chosen completions:
    -sum(chosen_logps) / sum(chosen_lengths). Reference-free.

    nll_tokens replaces sum(chosen_lengths) when this batch is a micro-batch of a larger one: its share of the
    large batch's chosen-token count, so that micro-batch losses weighted by their share of the pairs add up to
    the large batch's token mean, whatever the split (gradient accumulation, data parallelism).
    """
    lam = beta if orpo_lambda is None else orpo_lambda
    avg_w = (chosen_logps / chosen_lengths.clamp(min=1)).clamp(max=_MAX_AVG_LOGP)  # (B,)
    avg_l = (rejected_logps / rejected_lengths.clamp(min=1)).clamp(max=_MAX_AVG_LOGP)  # (B,)
    log_odds_w = avg_w - torch.log(-torch.expm1(avg_w))  # log(p/(1-p)); -expm1(a) = 1 - e^a
    log_odds_l = avg_l - torch.log(-torch.expm1(avg_l))
    ratio_loss = -F.logsigmoid(log_odds_w - log_odds_l).mean()  # eq. 7
    denominator = chosen_lengths.sum().clamp(min=1) if nll_tokens is None else nll_tokens
    nll = -chosen_logps.sum() / denominator
    metrics = _preference_metrics(beta * avg_w, beta * avg_l, chosen_logps, rejected_logps)
    metrics.update(_detached(nll_loss=nll, log_odds_ratio=(log_odds_w - log_odds_l).mean()))
    return nll + lam * ratio_loss, metrics


def kto_loss(
    policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, *, beta: float, kl_ref_point: Tensor,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """KTO, Ethayarajh et al. 2024 (their loss with lambda_D / lambda_U weights), mean over the batch.

    policy_logps, ref_logps (B,) summed; labels (B,) bool (True = desirable). kl_ref_point z
    is the caller's estimate of KL(pi || pi_ref) from mismatched pairs; it is detached and
    clamped >= 0 here. r = log pi - log pi_ref;
    desirable: w_d (1 - sigma(beta (r - z))), undesirable: w_u (1 - sigma(beta (z - r))).
    """
    z = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps  # (B,)
    labels = labels.bool()
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))  # (B,)
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))  # (B,)
    loss = torch.where(labels, desirable, undesirable).mean()
    return loss, _detached(
        rewards_chosen=masked_mean(beta * r, labels), rewards_rejected=masked_mean(beta * r, ~labels),
        kl_ref_point=z, num_desirable=labels.sum(), num_undesirable=(~labels).sum(),
    )


# --------------------------------------------------------------------------- KL estimators
# Schulman 2020, "Approximating KL Divergence": per-token estimators of KL(pi || pi_ref) from
# tokens sampled from pi. With log_ratio = ref - logp: k1 = -log_ratio (unbiased, can be < 0),
# k2 = log_ratio^2 / 2 (biased, low variance), k3 = (e^log_ratio - 1) - log_ratio (unbiased, >= 0).

# exp() of a log-ratio beyond this overflows in fp16/bf16 rollouts; verl clamps the same way.
_MAX_KL_LOG_RATIO = 20.0


def _k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def _k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def _k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_ratio = (ref_logprobs - logprobs).clamp(-_MAX_KL_LOG_RATIO, _MAX_KL_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def get_kl_estimator(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind]


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref); (B, T), (B, T) -> (B, T)."""
    return get_kl_estimator(kind)(logprobs, ref_logprobs)


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL of each completion from the reference: k1 summed over its tokens, sum_t (log pi - log pi_ref).

    (B, T), (B, T), mask (B, T) -> (B,). The sequence KL of Ziegler et al. 2019 (their KL term is on whole
    samples), which the adaptive KL controllers steer toward a target.
    """
    return masked_sum(_k1(logprobs, ref_logprobs), mask, dim=-1)  # (B,)


# --------------------------------------------------------------------------- PPO family
# Policy losses share one signature, looked up by name with `get_policy_loss` ("ppo", "gspo"):
#   fn(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip, agg_mode,
#      num_tokens, num_seqs, max_len) -> (loss, metrics)
# logprobs, old_logprobs, mask (B, T); advantages (B,) per sequence or (B, T) per token. They differ only in
# the importance ratio; the clipped objective on that ratio, and its keywords, are `clipped_surrogate`'s.

POLICY_LOSSES = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.lookup


def clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
    dual_clip: Optional[float] = None, agg_mode: str = "token_mean", num_tokens: Count = None,
    num_seqs: Count = None, max_len: Optional[int] = None,
) -> tuple[Tensor, Metrics]:
    """The clipped objective (Schulman et al. 2017, eq. 7) on given log-ratios log r (B, T), as a loss.

    The policy losses differ only in the ratio they hand it; they pass their keyword options through, so
    a keyword not declared here is a TypeError naming it. agg_mode and the GLOBAL counts num_tokens,
    num_seqs, max_len go to `ops.aggregate`.

    clip_low / clip_high: separate epsilons (DAPO clip-higher, Yu et al. 2025, eq. 10).
    dual_clip c > 1: for A < 0 the loss is also capped at -c * A (Ye et al. 2020); None = off.
    metrics: clip_frac_low / clip_frac_high (fraction of tokens whose gradient the clip removes:
    r < 1 - eps_low with A < 0 / r > 1 + eps_high with A > 0), clip_frac_dual, approx_kl (k3 of
    KL(old || new): mean((r - 1) - log r), as CleanRL), ratio_mean.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1), broadcasts over T
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg_losses = torch.max(pg_loss1, pg_loss2)  # (B, T)
    dual_active = torch.zeros_like(ratio, dtype=torch.bool)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        pg_loss3 = -advantages * dual_clip  # dual clip, Ye et al. 2020: cap the loss at -c A when A < 0
        dual_active = (advantages < 0) & (pg_losses > pg_loss3)
        pg_losses = torch.where(advantages < 0, torch.min(pg_losses, pg_loss3), pg_losses)
    loss = aggregate(pg_losses, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)

    return loss, _detached(
        clip_frac_low=masked_mean(((ratio < 1 - clip_low) & (advantages < 0)).float(), mask),
        clip_frac_high=masked_mean(((ratio > 1 + clip_high) & (advantages > 0)).float(), mask),
        clip_frac_dual=masked_mean(dual_active.float(), mask),
        approx_kl=masked_mean((ratio - 1) - log_ratio, mask),
        ratio_mean=masked_mean(ratio, mask),
    )


@register_policy_loss("ppo")
def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    **options: object) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate with one ratio per token (Schulman et al. 2017, eq. 7), as a loss to minimise:
    max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)), r_t = pi(a_t | s_t) / pi_old(a_t | s_t).
    options: those of `clipped_surrogate` (clip_low, clip_high, dual_clip, agg_mode, counts)."""
    log_ratio = logprobs - old_logprobs  # (B, T) log r_t
    return clipped_surrogate(log_ratio, advantages, mask, **options)


@register_policy_loss("gspo")
def gspo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                     **options: object) -> tuple[Tensor, Metrics]:
    """GSPO (Zheng et al. 2025): one ratio per sequence, s_i = (pi(y_i | x) / pi_old(y_i | x))^(1/|y_i|)
    = exp(mean_t (log pi - log pi_old)), broadcast to its tokens and clipped as in PPO. With
    agg_mode="seq_mean_token_mean" this is exactly the paper's sequence objective.
    options: those of `clipped_surrogate`."""
    log_s = masked_mean(logprobs - old_logprobs, mask, dim=-1)  # (B,) log s_i, GSPO (Zheng et al. 2025)
    log_ratio = log_s.unsqueeze(-1).expand_as(logprobs)  # (B, T)
    return clipped_surrogate(log_ratio, advantages, mask, **options)


# The online configs' `importance_level` names the policy loss: one ratio per token or per sequence.
IMPORTANCE_LEVELS = {"token": "ppo", "sequence": "gspo"}


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, importance_level: str = "token",
    **options: object,
) -> tuple[Tensor, Metrics]:
    """The policy loss of `importance_level` ("token": `ppo_policy_loss`, "sequence": `gspo_policy_loss`).

    A lookup, not a branch: `options` go to that loss unchanged, so a keyword it does not declare is a
    TypeError naming it.
    """
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance_level {importance_level!r}; valid: {', '.join(IMPORTANCE_LEVELS)}")
    return get_policy_loss(IMPORTANCE_LEVELS[importance_level])(logprobs, old_logprobs, advantages, mask, **options)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: Optional[float] = 0.2,
    agg_mode: str = "token_mean", num_tokens: Count = None, num_seqs: Count = None,
    max_len: Optional[int] = None,
) -> tuple[Tensor, Metrics]:
    """Clipped value loss 1/2 max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2), (B, T).

    PPO value clipping as in OpenAI baselines ppo2 / CleanRL; clip=None gives 1/2 (v - R)^2.
    metrics: value_clip_frac (v is clipped and the clipped branch is the larger), explained_variance
    1 - Var(R - v) / Var(R) over masked tokens (1 if both are 0, 0 if only Var(R) is,
    as sklearn's force_finite), value_mean.
    """
    unclipped = (values - returns) ** 2  # (B, T)
    if clip is None:
        per_token, clip_frac = 0.5 * unclipped, torch.zeros((), device=values.device)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped = (clipped_values - returns) ** 2
        per_token = 0.5 * torch.max(unclipped, clipped)
        # Only where the clamp acts: elsewhere old + (v - old) may still differ from v by one rounding step.
        clip_active = (values - old_values).abs() > clip
        clip_frac = masked_mean((clip_active & (clipped > unclipped)).float(), mask)
    loss = aggregate(per_token, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)

    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    explained = torch.where(
        var_returns > 0, 1 - var_residual / var_returns.clamp(min=1e-30),
        (var_residual == 0).to(var_returns.dtype),
    )
    return loss, _detached(value_clip_frac=clip_frac, explained_variance=explained,
                           value_mean=masked_mean(values, mask))


def entropy_bonus(
    entropy: Tensor, mask: Tensor, *, coef: float, agg_mode: str = "token_mean",
    num_tokens: Count = None, num_seqs: Count = None, max_len: Optional[int] = None,
) -> tuple[Tensor, Metrics]:
    """Loss term -coef * aggregate(entropy): adding it to the loss rewards higher entropy."""
    mean_entropy = aggregate(entropy, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return -coef * mean_entropy, _detached(entropy=masked_mean(entropy, mask))


def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, kind: str = "forward",
    temperature: float = 1.0, num_tokens: Count = None, chunk_size: int = 1024,
) -> tuple[Tensor, Metrics]:
    """Token-level knowledge distillation, token mean over masked positions; logits (B, T, V).

    forward: KL(p_teacher || p_student) (Hinton et al. 2015, mode-covering);
    reverse: KL(p_student || p_teacher) (MiniLLM, Gu et al. 2024, mode-seeking).
    Both softmaxes use `temperature`; no T^2 rescaling (as TRL's GKD). The teacher is detached.
    """
    teacher_logits = teacher_logits.detach()
    if kind == "forward":
        per_token = kl_from_logits(teacher_logits, student_logits, chunk_size=chunk_size, temperature=temperature)
    elif kind == "reverse":
        per_token = kl_from_logits(student_logits, teacher_logits, chunk_size=chunk_size, temperature=temperature)
    else:
        raise ValueError(f"unknown distillation kind {kind!r}; valid: forward, reverse")
    loss = aggregate(per_token, mask, "token_mean", num_tokens=num_tokens)
    return loss, _detached(kl=masked_mean(per_token, mask))


# --------------------------------------------------------------------------- engine/trainer importance correction


def _engine_gap_metrics(log_ratio: Tensor, ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Trainer-vs-engine log-prob gap of the sampled tokens: mean |Δ log p|, KL(engine ‖ trainer) by k3 (the
    tokens were drawn from the engine), the mean ratio."""
    return dict(logprob_gap=masked_mean(log_ratio.abs(), mask),
                engine_kl=masked_mean((ratio - 1) - log_ratio, mask),
                is_ratio_mean=masked_mean(ratio, mask))


def truncated_importance_weights(
    old_logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, *, cap: float = 2.0,
) -> tuple[Tensor, Metrics]:
    """Truncated importance sampling (TIS) weights for tokens drawn by an inference engine.

    old_logprobs (B, T): the trainer's log π_old of the sampled tokens; sampling_logprobs (B, T): the engine's
    (vLLM's numerics, or weights k steps old under async rollouts). Per token
        w = min(π_old / π_engine, C)          # truncated IS, Ionides 2008; as used for RL by Yao et al. 2025
    multiplies the policy-gradient loss so its expectation is over π_old, not the engine's distribution; the
    cap C bounds the variance. Weights are detached (a constant of the loss) and 0 on padding.
    Returns (weights (B, T), metrics: is_clip_frac (share of tokens capped), logprob_gap, engine_kl, is_ratio_mean).
    """
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    log_ratio = (old_logprobs - sampling_logprobs).detach()  # (B, T)
    ratio = torch.exp(log_ratio)
    weights = torch.clamp(ratio, max=cap) * mask  # (B, T)
    return weights, _detached(is_clip_frac=masked_mean((ratio > cap).float(), mask),
                              **_engine_gap_metrics(log_ratio, ratio, mask))


def masked_importance_weights(
    old_logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, *, low: float = 0.5, high: float = 2.0,
    level: str = "token",
) -> tuple[Tensor, Metrics]:
    """Masked importance sampling (MIS): the IS weight where the ratio π_old / π_engine stays inside [low, high],
    0 (the token drops out of the loss) where it leaves the band.

    level="token": one ratio per token. level="sequence": the sequence's geometric-mean ratio
    exp(mean_t log r_t) decides for all its tokens (a whole sample is dropped or kept), and each kept token
    is weighted by that sequence ratio. Shapes and metrics as `truncated_importance_weights`, with
    is_mask_frac (share of tokens dropped) in place of is_clip_frac.
    """
    if not 0 <= low < 1 < high:
        raise ValueError(f"masked IS band must satisfy 0 <= low < 1 < high, got [{low}, {high}]")
    log_ratio = (old_logprobs - sampling_logprobs).detach()  # (B, T)
    ratio = torch.exp(log_ratio)
    if level == "sequence":
        decide = torch.exp(masked_mean(log_ratio, mask, dim=-1)).unsqueeze(-1).expand_as(ratio)  # (B, T)
    elif level == "token":
        decide = ratio
    else:
        raise ValueError(f"unknown masked IS level {level!r}; valid: token, sequence")
    inside = (decide >= low) & (decide <= high)  # (B, T)
    weights = torch.where(inside, decide, torch.zeros_like(decide)) * mask
    return weights, _detached(is_mask_frac=masked_mean((~inside).float(), mask),
                              **_engine_gap_metrics(log_ratio, ratio, mask))
