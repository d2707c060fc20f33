"""tether.losses against values worked out by hand (derivations in each docstring), plus
gradient checks where a loss must cut the gradient (PPO clipping), a micro-batch test, the
registries (each name a named function; unknown keywords a TypeError) and tether.kl_control."""

import math

import pytest
import torch

from tether.kl_control import AdaptiveKLController, FixedKLController
from tether.losses import (
    IMPORTANCE_LEVELS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    accepted_kwargs,
    bradley_terry_loss,
    cdpo_loss,
    clipped_policy_loss,
    distill_loss,
    dpo_loss,
    entropy_bonus,
    get_policy_loss,
    get_preference_loss,
    gspo_policy_loss,
    hinge_loss,
    ipo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    ppo_policy_loss,
    robust_dpo_loss,
    sequence_kl,
    sft_loss,
    simpo_loss,
    value_loss,
)
from tether.ops import token_logprobs


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(actual, expected, tol=1e-5):
    actual = actual.detach() if isinstance(actual, torch.Tensor) else actual
    assert float(actual) == pytest.approx(expected, abs=tol)


# --------------------------------------------------------------------------- SFT / reward model


def test_sft_loss_hand_value():
    """Token 0: logits (0, ln 3) -> p = (1/4, 3/4), label 1 -> ln 0.75.
    Token 1: logits (0, 0) -> p = (1/2, 1/2), label 0 -> ln 0.5. Token 2 is masked out.
    loss = -(ln 0.75 + ln 0.5) / 2 = (0.287682 + 0.693147) / 2 = 0.490415."""
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [5.0, -5.0]]])  # (1, 3, 2)
    logprobs = token_logprobs(logits, torch.tensor([[1, 0, 1]]))
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = sft_loss(logprobs, mask)
    close(loss, 0.490415)
    close(metrics["nll"], 0.490415)
    assert metrics["num_tokens"].item() == 2
    # with a global count of 4 tokens (another micro-batch holds 2 more) this batch adds 0.980830 / 4
    close(sft_loss(logprobs, mask, num_tokens=4)[0], 0.980830 / 4)


def test_bradley_terry_seeds_example():
    """Seeds: r_w = 2.5, r_l = -1.0 -> r_w - r_l = 3.5, P = sigma(3.5) = 0.970688,
    loss = -ln 0.970688 = 0.029750. With margin 1: -ln sigma(2.5) = 0.078890.
    Centering adds 0.01 * (2.5 - 1.0)^2 = 0.0225."""
    chosen, rejected = t(2.5), t(-1.0)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    close(loss, 0.029750)
    close(math.exp(-loss.item()), 0.970688)
    assert metrics["accuracy"].item() == 1.0 and metrics["margin"].item() == 3.5
    close(bradley_terry_loss(chosen, rejected, margin=1.0)[0], 0.078890)
    close(bradley_terry_loss(chosen, rejected, center_coef=0.01)[0], 0.029750 + 0.0225)
    # a misordered pair: accuracy counts pairs with r_w > r_l only
    _, metrics = bradley_terry_loss(t(2.5, 0.0), t(-1.0, 1.0))
    assert metrics["accuracy"].item() == 0.5
    close(metrics["rewards_chosen"], 1.25)


# --------------------------------------------------------------------------- DPO family

# Seeds' DPO step: log pi(y_w) = -1.0, log pi_ref(y_w) = -1.2, log pi(y_l) = -2.0, log pi_ref(y_l) = -1.5.
SEEDS_PAIR = dict(chosen_logps=t(-1.0), rejected_logps=t(-2.0), ref_chosen_logps=t(-1.2),
                  ref_rejected_logps=t(-1.5), chosen_lengths=t(4), rejected_lengths=t(5))


def test_dpo_seeds_example():
    """log-ratios +0.2 (chosen) and -0.5 (rejected), beta = 0.1: beta * h = 0.1 * 0.7 = 0.07,
    sigma(0.07) = 0.517493, loss = -ln 0.517493 = 0.658760 (seeds: 0.66).
    Implicit rewards beta (log pi - log pi_ref): 0.02 and -0.05, margin 0.07."""
    loss, metrics = get_preference_loss("dpo")(**SEEDS_PAIR, beta=0.1)
    close(loss, 0.658760)
    close(math.exp(-loss.item()), 0.517493)
    close(metrics["rewards_chosen"], 0.02)
    close(metrics["rewards_rejected"], -0.05)
    close(metrics["rewards_margin"], 0.07)
    assert metrics["rewards_accuracy"].item() == 1.0
    assert metrics["logps_chosen"].item() == -1.0 and metrics["logps_rejected"].item() == -2.0


def test_label_smoothed_dpo_variants():
    """x = beta h = 0.07, a = -ln sigma(x) = 0.658760, and -ln sigma(-x) = a + x = 0.728760.
    cDPO (eps 0.1): 0.9 a + 0.1 (a + x) = a + 0.1 x = 0.665760.
    robust (eps 0.1): (0.9 a - 0.1 (a + x)) / 0.8 = a - x / 8 = 0.650010."""
    close(get_preference_loss("cdpo")(**SEEDS_PAIR, beta=0.1, label_smoothing=0.1)[0], 0.665760)
    close(get_preference_loss("dpo")(**SEEDS_PAIR, beta=0.1, label_smoothing=0.1)[0], 0.665760)
    close(get_preference_loss("robust")(**SEEDS_PAIR, beta=0.1, label_smoothing=0.1)[0], 0.650010)
    close(get_preference_loss("robust")(**SEEDS_PAIR, beta=0.1)[0], 0.658760)  # eps 0 is DPO
    with pytest.raises(ValueError, match="label_smoothing"):
        get_preference_loss("robust")(**SEEDS_PAIR, beta=0.1, label_smoothing=0.5)


def test_hinge_and_ipo():
    """hinge: relu(1 - 0.07) = 0.93; with beta = 2, beta h = 1.4 > 1 -> 0.
    IPO on length-averaged ratios: h = 0.2 / 4 - (-0.5) / 5 = 0.15;
    beta = 1: (0.15 - 1/2)^2 = 0.1225; beta = 0.1: (0.15 - 5)^2 = 23.5225."""
    hinge, ipo = get_preference_loss("hinge"), get_preference_loss("ipo")
    close(hinge(**SEEDS_PAIR, beta=0.1)[0], 0.93)
    close(hinge(**SEEDS_PAIR, beta=2.0)[0], 0.0)
    close(ipo(**SEEDS_PAIR, beta=1.0)[0], 0.1225)
    close(ipo(**SEEDS_PAIR, beta=0.1)[0], 23.5225, tol=1e-4)
    close(ipo(**SEEDS_PAIR, beta=1.0)[1]["rewards_chosen"], 0.2)  # implicit reward uses summed log-ratios


def test_simpo_hand_value():
    """avg_w = -4 / 4 = -1, avg_l = -10 / 5 = -2; beta = 2, gamma = 0.5:
    2 * (-1 - (-2)) - 0.5 = 1.5, loss = ln(1 + e^-1.5) = 0.201413; rewards beta * avg = -2, -4."""
    loss, metrics = get_preference_loss("simpo")(
        t(-4.0), t(-10.0), None, None, beta=2.0, chosen_lengths=t(4), rejected_lengths=t(5), gamma=0.5)
    close(loss, 0.201413)
    close(metrics["rewards_chosen"], -2.0)
    close(metrics["rewards_rejected"], -4.0)


def test_orpo_hand_value():
    """avg_w = -2 / 4 = -0.5, avg_l = -6 / 3 = -2.
    log odds_w = -0.5 - ln(1 - e^-0.5) = -0.5 + 0.932752 = 0.432752
    log odds_l = -2 - ln(1 - e^-2) = -2 + 0.145413 = -1.854587; difference 2.287339
    -ln sigma(2.287339) = 0.096706; NLL = 2 / 4 = 0.5; lambda = beta = 0.1:
    loss = 0.5 + 0.1 * 0.096706 = 0.509671."""
    orpo = get_preference_loss("orpo")
    args = (t(-2.0), t(-6.0), None, None)
    loss, metrics = orpo(*args, beta=0.1, chosen_lengths=t(4), rejected_lengths=t(3))
    close(loss, 0.509671)
    close(metrics["log_odds_ratio"], 2.287339)
    close(metrics["nll_loss"], 0.5)
    close(orpo(*args, beta=0.1, chosen_lengths=t(4), rejected_lengths=t(3), orpo_lambda=1.0)[0], 0.596706)
    # an average log-prob of exactly 0 (p = 1) stays finite
    assert torch.isfinite(orpo(t(0.0), t(-1.0), None, None, beta=0.1, chosen_lengths=t(2),
                               rejected_lengths=t(2))[0])


def test_preference_registry_errors():
    with pytest.raises(ValueError, match="dpo"):
        get_preference_loss("dpo2")
    with pytest.raises(ValueError, match="reference"):
        get_preference_loss("dpo")(t(-1.0), t(-2.0), None, None, beta=0.1,
                                   chosen_lengths=t(1), rejected_lengths=t(1))
    assert {"dpo", "ipo", "cdpo", "robust", "hinge", "simpo", "orpo"} <= set(PREFERENCE_LOSSES)


def test_each_preference_loss_is_a_named_function():
    """The registry maps each name to its function; the same call through either gives the same value
    (the seeds' pair: DPO 0.658760, cDPO/robust at eps 0.1: 0.665760 / 0.650010, hinge 0.93, IPO 0.1225)."""
    assert PREFERENCE_LOSSES == {"dpo": dpo_loss, "cdpo": cdpo_loss, "robust": robust_dpo_loss, "hinge": hinge_loss,
                                 "ipo": ipo_loss, "simpo": simpo_loss, "orpo": orpo_loss}
    close(dpo_loss(**SEEDS_PAIR, beta=0.1)[0], 0.658760)
    close(cdpo_loss(**SEEDS_PAIR, beta=0.1, label_smoothing=0.1)[0], 0.665760)
    close(cdpo_loss(**SEEDS_PAIR, beta=0.1)[0], 0.658760)  # eps 0 is DPO
    close(robust_dpo_loss(**SEEDS_PAIR, beta=0.1, label_smoothing=0.1)[0], 0.650010)
    close(hinge_loss(**SEEDS_PAIR, beta=0.1)[0], 0.93)
    close(ipo_loss(**SEEDS_PAIR, beta=1.0)[0], 0.1225)
    # DPO ignores the lengths, which every member accepts so that one call serves the family
    pair = {k: v for k, v in SEEDS_PAIR.items() if not k.endswith("lengths")}
    close(dpo_loss(**pair, beta=0.1)[0], 0.658760)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_preference_losses_reject_unknown_keywords(name):
    """A misspelt knob is a TypeError naming it, never silently ignored; so is a knob the loss does not read
    (IPO has no label smoothing). `accepted_kwargs` hands a loss only the knobs it declares."""
    loss_fn = get_preference_loss(name)
    with pytest.raises(TypeError, match="label_smothing"):
        loss_fn(**SEEDS_PAIR, beta=0.1, label_smothing=0.1)
    knobs = dict(beta=0.1, label_smoothing=0.0, gamma=0.5, orpo_lambda=None)
    expected = {"dpo": {"beta", "label_smoothing"}, "cdpo": {"beta", "label_smoothing"},
                "robust": {"beta", "label_smoothing"}, "hinge": {"beta"}, "ipo": {"beta"},
                "simpo": {"beta", "gamma"}, "orpo": {"beta", "orpo_lambda"}}[name]
    assert set(accepted_kwargs(loss_fn, **knobs)) == expected
    loss_fn(**SEEDS_PAIR, **accepted_kwargs(loss_fn, **knobs))  # the recipe's call works for every member
    if name in ("hinge", "ipo"):
        with pytest.raises(TypeError, match="label_smoothing"):
            loss_fn(**SEEDS_PAIR, beta=0.1, label_smoothing=0.1)


def test_kto_hand_value():
    """beta = 0.1, z = 0.5, r = (-1 - -2, -3 - -2) = (1, -1), labels (desirable, undesirable),
    w_d = 1, w_u = 2:
      desirable   1 - sigma(0.1 (1 - 0.5)) = 1 - sigma(0.05) = 0.487503
      undesirable 2 (1 - sigma(0.1 (0.5 + 1))) = 2 (1 - sigma(0.15)) = 0.925140
    mean = 0.706321. z is detached; a negative z is clamped to 0."""
    z = torch.tensor(0.5, requires_grad=True)
    policy = t(-1.0, -3.0).requires_grad_(True)
    loss, metrics = kto_loss(policy, t(-2.0, -2.0), torch.tensor([True, False]), beta=0.1,
                             kl_ref_point=z, undesirable_weight=2.0)
    close(loss, 0.706321)
    close(metrics["rewards_chosen"], 0.1)
    close(metrics["rewards_rejected"], -0.1)
    loss.backward()
    assert z.grad is None and policy.grad is not None
    # z = -3 acts as 0: desirable 1 - sigma(0.1), undesirable 1 - sigma(0.1)
    loss, _ = kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), beta=0.1, kl_ref_point=t(-3.0))
    close(loss, 1 - sigmoid(0.1))


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_values_and_exact_expectations():
    """Single token, log p = ln 0.5, log q = ln 0.2: k1 = ln 2.5 = 0.916291,
    k2 = 0.916291^2 / 2 = 0.419794, k3 = 0.4 - ln 0.4 - 1 = 0.316291.
    Over the categorical p = (.5, .3, .2), q = (.2, .5, .3), tokens drawn from p:
    KL(p||q) = .5 ln 2.5 + .3 ln .6 + .2 ln(2/3) = 0.223804; E_p[k1] = E_p[k3] = KL exactly
    (E_p[q/p] = 1); E_p[k2] = 1/2 sum p (ln p/q)^2 = 0.265479 (biased); k3 >= 0 everywhere."""
    lp, lq = torch.log(t(0.5)), torch.log(t(0.2))
    close(kl_estimate(lp, lq, "k1"), 0.916291)
    close(kl_estimate(lp, lq, "k2"), 0.419794)
    close(kl_estimate(lp, lq, "k3"), 0.316291)

    p, q = t(0.5, 0.3, 0.2), t(0.2, 0.5, 0.3)
    exact = (p * (p / q).log()).sum().item()
    close(exact, 0.223804)
    expect = {kind: (p * kl_estimate(p.log(), q.log(), kind)).sum().item() for kind in ("k1", "k2", "k3")}
    close(expect["k1"], exact)
    close(expect["k3"], exact)
    close(expect["k2"], 0.265479)
    assert (kl_estimate(p.log(), q.log(), "k3") >= 0).all()
    assert (kl_estimate(p.log(), q.log(), "k1") < 0).any()  # k1 can be negative per token
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(p, q, "k4")


def test_sequence_kl_hand_value():
    """k1 summed over each completion's tokens: row 0, log pi = (-1, -2, pad) and log pi_ref = (-1.5, -1, pad):
    0.5 + (-1) = -0.5 (the padding, even a NaN there, is left out); row 1 (-0.2, -0.3, -0.4) against
    (-0.7, -0.5, -0.6): 0.5 + 0.2 + 0.2 = 0.9; a row with no tokens: 0."""
    logprobs = torch.tensor([[-1.0, -2.0, math.nan], [-0.2, -0.3, -0.4], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, 0.0], [-0.7, -0.5, -0.6], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    torch.testing.assert_close(sequence_kl(logprobs, ref_logprobs, mask), t(-0.5, 0.9, 0.0))
    # it is the token k1 estimate summed: the same number kl_estimate(.., "k1") gives token by token
    torch.testing.assert_close(sequence_kl(logprobs[1:2], ref_logprobs[1:2], mask[1:2]),
                               kl_estimate(logprobs[1:2], ref_logprobs[1:2], "k1").sum(-1))


# --------------------------------------------------------------------------- PPO policy loss


def test_clipped_objective_seeds_example():
    """Seeds: pi = 0.65, pi_old = 0.4 -> ratio 1.625; A = 1.8, eps = 0.2:
    objective min(1.625 * 1.8, 1.2 * 1.8) = min(2.925, 2.16) = 2.16, loss = -2.16.
    approx_kl = (r - 1) - ln r = 0.625 - 0.485508 = 0.139492."""
    loss, metrics = clipped_policy_loss(torch.log(t(0.65)).view(1, 1), torch.log(t(0.4)).view(1, 1), t(1.8),
                                        torch.ones(1, 1))
    close(loss, -2.16)
    close(metrics["approx_kl"], 0.139492)
    close(metrics["ratio_mean"], 1.625)
    assert metrics["clip_frac_high"].item() == 1.0 and metrics["clip_frac_low"].item() == 0.0


def test_clipping_values_and_zero_gradient():
    """ratios (0.5, 1, 2.5) with A = +1 (row 0) and A = -1 (row 1), eps = 0.2, token mean of 6:
      A = +1: min(r, clip(r)) = (0.5, 1, 1.2) -> losses (-0.5, -1, -1.2); 2.5 clipped
      A = -1: min(-r, -clip(r)) = (-0.8, -1, -2.5) -> losses (0.8, 1, 2.5); 0.5 clipped
    loss = 1.6 / 6. d loss / d logp = -A r / 6 where unclipped, exactly 0 where clipped."""
    ratio = t(0.5, 1.0, 2.5).repeat(2, 1)  # (2, 3)
    logprobs = ratio.log().clone().requires_grad_(True)
    loss, metrics = clipped_policy_loss(logprobs, torch.zeros(2, 3), t(1.0, -1.0), torch.ones(2, 3))
    close(loss, 1.6 / 6)
    loss.backward()
    expected_grad = torch.tensor([[-0.5, -1.0, 0.0], [0.0, 1.0, 2.5]]) / 6
    torch.testing.assert_close(logprobs.grad, expected_grad)
    close(metrics["clip_frac_low"], 1 / 6)
    close(metrics["clip_frac_high"], 1 / 6)


def test_clip_higher_and_dual_clip():
    """Clip-higher: A = +1, ratio 1.25 < 1 + 0.28 -> unclipped, loss -1.25 (eps 0.2 would give -1.2).
    Dual clip c = 3, A = -1: ratio 4 -> PPO loss max(4, 1.2) = 4, capped at -c A = 3 with zero
    gradient; ratio 2.5 -> 2.5 < 3 unchanged. A = +1, ratio 4 -> -1.2, untouched by the dual clip."""
    one = torch.ones(1, 1)
    close(clipped_policy_loss(t(1.25).log().view(1, 1), torch.zeros(1, 1), t(1.0), one, clip_high=0.28)[0], -1.25)
    close(clipped_policy_loss(t(1.25).log().view(1, 1), torch.zeros(1, 1), t(1.0), one)[0], -1.2)

    logprobs = t(4.0, 2.5, 4.0).log().view(1, 3).clone().requires_grad_(True)
    advantages = t(-1.0, -1.0, 1.0).view(1, 3)  # per-token advantages
    loss, metrics = clipped_policy_loss(logprobs, torch.zeros(1, 3), advantages, torch.ones(1, 3), dual_clip=3.0)
    close(loss, (3.0 + 2.5 - 1.2) / 3)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.5 / 3, 0.0]]))
    close(metrics["clip_frac_dual"], 1 / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(logprobs, torch.zeros(1, 3), advantages, torch.ones(1, 3), dual_clip=0.5)


def test_gspo_sequence_ratio():
    """Sequence 0: log-ratios (0.1, 0.3, pad) -> mean 0.2 -> s = e^0.2 = 1.221403 > 1.2, A = 1:
    clipped to 1.2, loss -1.2, no gradient. Sequence 1: log-ratios (-0.1, 0, 0.1) -> s = 1, A = 2:
    loss -2. seq_mean_token_mean: (-1.2 - 2) / 2 = -1.6. Gradient on each token of sequence 1:
    d/d logp_t [-A exp(mean) / 2] = -2 * 1 * (1/3) / 2 = -1/3."""
    logprobs = torch.tensor([[0.1, 0.3, 9.0], [-0.1, 0.0, 0.1]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, metrics = clipped_policy_loss(logprobs, torch.zeros(2, 3), t(1.0, 2.0), mask,
                                        importance_level="sequence", agg_mode="seq_mean_token_mean")
    close(loss, -1.6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [-1 / 3, -1 / 3, -1 / 3]]))
    close(metrics["ratio_mean"], (2 * math.exp(0.2) + 3) / 5)


def test_policy_loss_microbatches_sum_to_full_batch():
    g = torch.Generator().manual_seed(0)
    logprobs, old = torch.randn(4, 5, generator=g) * 0.3, torch.randn(4, 5, generator=g) * 0.3
    advantages = torch.randn(4, generator=g)
    mask = (torch.arange(5) < torch.tensor([[5], [3], [1], [4]])).long()
    for mode in ("token_mean", "seq_mean_token_mean", "token_sum_norm"):
        counts = dict(agg_mode=mode, num_tokens=mask.sum(), num_seqs=4, max_len=5)
        full, _ = clipped_policy_loss(logprobs, old, advantages, mask, **counts)
        halves = sum(clipped_policy_loss(logprobs[s], old[s], advantages[s], mask[s], **counts)[0]
                     for s in (slice(0, 2), slice(2, 4)))
        torch.testing.assert_close(halves, full)


def test_ppo_and_gspo_are_registered_policy_losses():
    """One sequence, log-ratios (0.3, -0.1), A = 1, eps = 0.2, token mean.
    PPO, a ratio per token: e^0.3 = 1.349859 is clipped to 1.2; e^-0.1 = 0.904837 is not:
    loss = -(1.2 + 0.904837) / 2 = -1.052419.
    GSPO, one ratio per sequence: s = exp(mean(0.3, -0.1)) = e^0.1 = 1.105171, inside the clip range:
    loss = -1.105171 on both tokens, mean -1.105171.
    clipped_policy_loss(importance_level=...) is a lookup of the same two functions."""
    assert POLICY_LOSSES == {"ppo": ppo_policy_loss, "gspo": gspo_policy_loss}
    assert {level: get_policy_loss(name) for level, name in IMPORTANCE_LEVELS.items()} == {
        "token": ppo_policy_loss, "sequence": gspo_policy_loss}
    logprobs, old, mask = t(0.3, -0.1).view(1, 2), torch.zeros(1, 2), torch.ones(1, 2)
    ppo, ppo_metrics = get_policy_loss("ppo")(logprobs, old, t(1.0), mask)
    gspo, gspo_metrics = get_policy_loss("gspo")(logprobs, old, t(1.0), mask)
    close(ppo, -1.052419)
    close(gspo, -1.105171)
    close(ppo_metrics["clip_frac_high"], 0.5)
    assert gspo_metrics["clip_frac_high"].item() == 0.0
    close(clipped_policy_loss(logprobs, old, t(1.0), mask)[0], -1.052419)
    close(clipped_policy_loss(logprobs, old, t(1.0), mask, importance_level="sequence")[0], -1.105171)
    # dual clip is an explicit keyword of either: A = -1, GSPO ratio e^1.5 = 4.481689 > c = 3 -> capped at 3
    close(gspo_policy_loss(t(1.0, 2.0).view(1, 2), old, t(-1.0), mask, dual_clip=3.0)[0], 3.0)
    with pytest.raises(ValueError, match="gspo"):
        get_policy_loss("grpo")
    with pytest.raises(ValueError, match="sequence"):
        clipped_policy_loss(logprobs, old, t(1.0), mask, importance_level="segment")


@pytest.mark.parametrize("loss_fn", [ppo_policy_loss, gspo_policy_loss, clipped_policy_loss, value_loss,
                                     sft_loss, entropy_bonus])
def test_ppo_family_rejects_unknown_keywords(loss_fn):
    """A misspelt keyword (here `dual_clips`) is a TypeError naming it, also through the clipped_policy_loss lookup."""
    x = torch.zeros(1, 2)
    args = {ppo_policy_loss: (x, x, t(1.0), x), gspo_policy_loss: (x, x, t(1.0), x),
            clipped_policy_loss: (x, x, t(1.0), x), value_loss: (x, x, x, x), sft_loss: (x, x),
            entropy_bonus: (x, x)}[loss_fn]
    extra = {"coef": 0.1} if loss_fn is entropy_bonus else {}
    with pytest.raises(TypeError, match="dual_clips"):
        loss_fn(*args, dual_clips=3.0, **extra)


# --------------------------------------------------------------------------- value, entropy, distill


def test_value_loss_hand_value():
    """v = (1, 2), v_old = (0.5, 2), R = (2, 1), eps = 0.2:
      token 0: (v - R)^2 = 1; clipped v = 0.5 + 0.2 = 0.7, (0.7 - 2)^2 = 1.69 -> 1/2 * 1.69 = 0.845
      token 1: v = v_old, both 1 -> 0.5
    loss = (0.845 + 0.5) / 2 = 0.6725; token 0 takes the clipped branch (no gradient there).
    Without clipping: 1/2 (1 + 1) / 2 = 0.5. Explained variance: Var(R) = 0.25,
    Var(R - v) = Var(1, -1) = 1 -> 1 - 1 / 0.25 = -3."""
    values = t(1.0, 2.0).view(1, 2).requires_grad_(True)
    old, returns, mask = t(0.5, 2.0).view(1, 2), t(2.0, 1.0).view(1, 2), torch.ones(1, 2)
    loss, metrics = value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.6725)
    close(metrics["value_clip_frac"], 0.5)
    close(metrics["explained_variance"], -3.0)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5]]))
    close(value_loss(values, old, returns, mask, clip=None)[0], 0.5)
    close(value_loss(returns, old, returns, mask)[1]["explained_variance"], 1.0)  # perfect critic


def test_value_clip_frac_ignores_rounding():
    """|v − v_old| = 0.187 < ε = 0.2, so v is not clipped; but in float32 v_old + (v − v_old) is one rounding
    step below v here (they have opposite signs), which made the clipped branch look larger."""
    values, old, returns = t(-0.13765870034694672), t(0.04933277517557144), t(0.4152115285396576)
    assert old + (values - old) != values  # the rounding the metric must not count
    assert value_loss(values, old, returns, torch.ones(1), clip=0.2)[1]["value_clip_frac"].item() == 0.0


def test_entropy_bonus_hand_value():
    """entropy (1, 2, masked 3), coef 0.01 -> -0.01 * 1.5 = -0.015."""
    loss, metrics = entropy_bonus(t(1.0, 2.0, 3.0).view(1, 3), torch.tensor([[1, 1, 0]]), coef=0.01)
    close(loss, -0.015)
    close(metrics["entropy"], 1.5)


def test_distill_forward_and_reverse_kl():
    """teacher p = (1/2, 1/2), student q = (1/4, 3/4); the second token is masked out.
    forward KL(p||q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841
    reverse KL(q||p) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.173287 + 0.304099 = 0.130812.
    Logits 2x as large with temperature 2 give the same values. The teacher gets no gradient."""
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])).requires_grad_(True)  # (1, 2, 2)
    student = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]])).requires_grad_(True)
    mask = torch.tensor([[1, 0]])
    loss, metrics = distill_loss(student, teacher, mask, kind="forward")
    close(loss, 0.143841)
    close(metrics["kl"], 0.143841)
    close(distill_loss(student, teacher, mask, kind="reverse")[0], 0.130812)
    close(distill_loss(2 * student, 2 * teacher, mask, kind="reverse", temperature=2.0)[0], 0.130812)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="forward"):
        distill_loss(student, teacher, mask, kind="jsd")


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_simple_rule():
    """target 6: KL 10 > 9 doubles beta, KL 3 < 4 halves it, KL 5 leaves it."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000, mode="simple")
    assert ctl.update(10.0, 1) == pytest.approx(0.2)
    assert ctl.update(3.0, 1) == pytest.approx(0.1)
    assert ctl.update(5.0, 1) == pytest.approx(0.1)
    assert ctl.update(torch.tensor(3.0), 1) == pytest.approx(0.05)  # a tensor KL works too


def test_adaptive_kl_controller_proportional_and_resume():
    """init 0.2, target 6, horizon 10000, 256 steps:
    KL 9: error = clip(9/6 - 1, +-0.2) = 0.2 -> 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    KL 5.4: error = -0.1 -> 0.201024 * (1 - 0.1 * 256 / 10000) = 0.200509."""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(9.0, 256) == pytest.approx(0.201024)
    assert ctl.update(5.4, 256) == pytest.approx(0.201024 * (1 - 0.00256))
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.beta == ctl.beta
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    with pytest.raises(ValueError, match="mode"):
        AdaptiveKLController(0.2, target=6.0, horizon=10000, mode="pid")
