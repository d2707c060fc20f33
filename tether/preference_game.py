"""The math of Nash learning from human feedback (Munos et al. 2024, "Nash Learning from Human Feedback").

Alignment as a two-player game: a preference function P(y ≻ y' | x) (not a scalar reward, so it may be
non-transitive) and the policy no other policy beats, π* = argmax_π min_π' P(π ≻ π').

    preference_model_loss(logits)                    −log σ(d(y_w, y_l)) of the pairwise model's logits (B,)
    geometric_mixture(logits, ref_logits, beta)      log of π^{1−β} π_ref^{β} / Z over the last dim
    nash_md_step(log_policy, log_reference, preference, eta, tau)
                                                     one Nash-MD step on a K-action matrix game
    preference_against(log_policy, preference)       P(y ≻ π) = Σ_y' π(y') P(y ≻ y')  for every action y
    exploitability(log_policy, preference)           max_y P(y ≻ π) − 1/2 (0 exactly at a Nash equilibrium)
    preference_advantages(win_probs)                 P(y ≻ y') − 1/2, the policy-gradient advantage

Pure functions of tensors; torch only, like losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]


def preference_model_loss(logits: Tensor) -> tuple[Tensor, Metrics]:
    """Pairwise preference model loss on the logits d(x, y_w, y_l) (B,) of the preferred-first order.

    P(y_w ≻ y_l) = σ(d) with d antisymmetric (d(a, b) = −d(b, a)), so the loss −log σ(d) of a pair equals the
    loss −log(1 − σ(d(y_l, y_w))) of its swapped order: training on one order trains on both.
    metrics: accuracy (d > 0), prob_chosen (mean σ(d)).
    """
    loss = -F.logsigmoid(logits).mean()  # maximum likelihood of P(y_w ≻ y_l | x), Munos et al. 2024, §4
    return loss, {"accuracy": (logits > 0).float().mean().detach(),
                  "prob_chosen": torch.sigmoid(logits).mean().detach()}


def geometric_mixture(logits: Tensor, ref_logits: Tensor, beta: float) -> Tensor:
    """Log-probs of the geometric mixture π^{1−β} π_ref^{β} / Z over the last dim (..., V).

    Munos et al. 2024, eq. 6: π_t^β(y) ∝ π_t(y)^{1−β} μ(y)^β. Applied token by token (their §7
    approximation for sequences), it is a softmax of the mixed log-probs at every position.
    """
    mixed = (1 - beta) * torch.log_softmax(logits.float(), -1) + beta * torch.log_softmax(ref_logits.float(), -1)
    return torch.log_softmax(mixed, -1)  # (..., V)


def preference_against(log_policy: Tensor, preference: Tensor) -> Tensor:
    """P(y ≻ π) = Σ_y' π(y') P(y ≻ y') for each action y (K,); preference[i, j] = P(i ≻ j) (K, K)."""
    return preference @ log_policy.exp()  # (K,)


def nash_md_step(log_policy: Tensor, log_reference: Tensor, preference: Tensor, *, eta: float,
                 tau: float = 0.0) -> tuple[Tensor, Metrics]:
    """One Nash-MD iterate on a K-action game; log-probs (K,) in, log-probs (K,) out.

        π_t^μ(y)   ∝ π_t(y)^{1−ητ} μ(y)^{ητ}                      (Munos et al. 2024, eq. 6)
        π_{t+1}(y) ∝ π_t^μ(y) exp(η P(y ≻ π_t^μ))                  (Munos et al. 2024, eq. 7)

    eta η is the learning rate, tau τ the strength of the regulariser toward μ = exp(log_reference). With
    τ = 0 it is mirror descent (multiplicative weights) on the game. metrics: exploitability of the new π.
    """
    log_mixture = torch.log_softmax((1 - eta * tau) * log_policy + eta * tau * log_reference, -1)  # (K,)
    log_next = torch.log_softmax(log_mixture + eta * preference_against(log_mixture, preference), -1)  # (K,)
    return log_next, {"exploitability": exploitability(log_next, preference).detach()}


def exploitability(log_policy: Tensor, preference: Tensor) -> Tensor:
    """max_y P(y ≻ π) − 1/2: how much the best response beats π. 0 at a Nash equilibrium, never below 0."""
    return preference_against(log_policy, preference).max() - 0.5


def preference_advantages(win_probs: Tensor) -> Tensor:
    """Advantage P(y ≻ y') − 1/2 of each sample (N,); 1/2 = P(π ≻ π) is the exact baseline of a symmetric game
    (the Nash-MD policy gradient, Munos et al. 2024, §7:
    ∇ E_{y∼π, y'∼π^β}[P(y ≻ y') − 1/2] − τ ∇ KL(π‖μ))."""
    return win_probs - 0.5
