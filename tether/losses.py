"""Pure loss functions: SFT, Bradley-Terry, the DPO family, KTO, KL estimators,
PPO policy / value / entropy terms, distillation, and KL-coefficient controllers.

Every loss returns `(loss, metrics)`; metrics are detached tensors (local to the
batch given, never `.item()`-ed here). Hyperparameters are keyword arguments.
Families with one signature are looked up by name: `get_preference_loss`,
`get_kl_estimator`. Imports only torch (and tether.ops, which imports only torch).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.ops import Count, aggregate, kl_from_logits, masked_mean, masked_var

Metrics = dict[str, Tensor]


def _detached(**values: Tensor) -> Metrics:
    return {name: value.detach() for name, value in values.items()}


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
# One signature: fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
#   chosen_lengths, rejected_lengths, **knobs) -> (loss, metrics). *_logps are (B,) SUMMED
#   completion log-probs, lengths (B,) token counts. Each loss reads the knobs it knows and
#   ignores the rest, so a recipe can pass its whole set of knobs to any of them.

PREFERENCE_LOSSES: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {}


def register_preference_loss(name: str):
    def add(fn):
        PREFERENCE_LOSSES[name] = fn
        return fn

    return add


def get_preference_loss(name: str) -> Callable[..., tuple[Tensor, Metrics]]:
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid: {', '.join(sorted(PREFERENCE_LOSSES))}")
    return PREFERENCE_LOSSES[name]


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


def _reference_loss(name: str, per_pair: Callable[..., Tensor], *, length_normalised: bool = False):
    """Build a reference-based loss from per_pair(h) where h = chosen - rejected log-ratio (B,).

    Implicit rewards in the metrics are always beta * (log pi - log pi_ref) of the summed
    log-probs (Rafailov et al. 2023, eq. 5), whatever the loss.
    """

    def loss_fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
                chosen_lengths, rejected_lengths, **knobs):
        ratio_w, ratio_l = _log_ratios(name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        if length_normalised:
            h = ratio_w / chosen_lengths.clamp(min=1) - ratio_l / rejected_lengths.clamp(min=1)  # (B,)
        else:
            h = ratio_w - ratio_l  # (B,)
        loss = per_pair(h, beta=beta, **knobs).mean()
        return loss, _preference_metrics(beta * ratio_w, beta * ratio_l, chosen_logps, rejected_logps)

    loss_fn.__name__ = name
    return register_preference_loss(name)(loss_fn)


def _sigmoid(h: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    # DPO, Rafailov et al. 2023, eq. 7: -log sigma(beta h). With label noise eps > 0 this is
    # conservative DPO (cDPO, Mitchell 2023): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _robust(h: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    eps = label_smoothing  # unbiased loss under flip rate eps, Chowdhury et al. 2024
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _hinge(h: Tensor, *, beta: float, **_: object) -> Tensor:
    return torch.relu(1 - beta * h)  # SLiC-style hinge on the DPO log-ratio (Zhao et al. 2023)


def _ipo(h: Tensor, *, beta: float, **_: object) -> Tensor:
    return (h - 1 / (2 * beta)) ** 2  # IPO, Azar et al. 2023: (h - 1/(2 tau))^2, beta is their tau


_reference_loss("dpo", _sigmoid)  # honours label_smoothing like TRL's "sigmoid"
_reference_loss("cdpo", _sigmoid)
_reference_loss("robust", _robust)
_reference_loss("hinge", _hinge)
# IPO uses LENGTH-AVERAGED log-ratios, as TRL does (its loss_type="ipo" divides the policy and
# reference log-probs by the completion length); with summed log-probs the 1/(2 beta) target
# would be a per-sequence margin that grows with length.
_reference_loss("ipo", _ipo, length_normalised=True)


@register_preference_loss("simpo")
def simpo_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta,
               chosen_lengths, rejected_lengths, gamma: float = 0.5, **_: object):
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
              nll_tokens: Optional[torch.Tensor | float] = None, **_: object):
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


# --------------------------------------------------------------------------- PPO family


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: Optional[float] = None,
    importance_level: str = "token", agg_mode: str = "token_mean",
    num_tokens: Count = None, num_seqs: Count = None, max_len: Optional[int] = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    logprobs, old_logprobs, mask (B, T); advantages (B,) per sequence or (B, T) per token.
    clip_low / clip_high: separate epsilons (DAPO clip-higher, Yu et al. 2025).
    dual_clip c > 1: for A < 0 the loss is also capped at -c * A (Ye et al. 2020).
    importance_level="sequence": GSPO (Zheng et al. 2025), one ratio per sequence,
    exp(mean_t(logp - old)), broadcast to its tokens; with agg_mode="seq_mean_token_mean"
    this is exactly the paper's sequence objective.
    metrics: clip_frac_low / clip_frac_high (fraction of tokens whose gradient the clip
    removes: ratio < 1 - eps_low with A < 0 / ratio > 1 + eps_high with A > 0),
    clip_frac_dual, approx_kl (k3 of KL(old || new): mean((r - 1) - log r), as CleanRL),
    ratio_mean.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1), broadcasts over T
    log_ratio = logprobs - old_logprobs  # (B, T)
    if importance_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1).expand_as(logprobs)  # (B, T)
    elif importance_level != "token":
        raise ValueError(f"unknown importance_level {importance_level!r}; valid: token, sequence")
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


# --------------------------------------------------------------------------- KL-penalty controllers


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT's fixed penalty)."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """KL coefficient steered toward a target KL (Ziegler et al. 2019, section 2.2).

    mode="proportional" (Ziegler et al.): error = clip(KL / target - 1, -0.2, 0.2),
        beta <- beta * (1 + error * n_steps / horizon).
    mode="simple" (Schulman et al. 2017, section 4): beta <- 2 beta if KL > 1.5 target,
        beta / 2 if KL < target / 1.5, else unchanged.
    """

    MODES = ("proportional", "simple")
    MAX_ERROR = 0.2  # Ziegler et al. 2019 clip the proportional error to +-0.2

    def __init__(self, init_beta: float, target: float, horizon: int, mode: str = "proportional"):
        if mode not in self.MODES:
            raise ValueError(f"unknown KL controller mode {mode!r}; valid: {', '.join(self.MODES)}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"KL target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.beta, self.target, self.horizon, self.mode = float(init_beta), float(target), horizon, mode

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        kl = float(current_kl)
        if self.mode == "proportional":
            error = min(max(kl / self.target - 1, -self.MAX_ERROR), self.MAX_ERROR)
            self.beta *= 1 + error * n_steps / self.horizon
        elif kl > 1.5 * self.target:
            self.beta *= 2
        elif kl < self.target / 1.5:
            self.beta /= 2
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])  # target/horizon/mode come from the run's config



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
