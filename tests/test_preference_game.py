"""tether.preference_game against hand-worked values and the known equilibrium of rock-paper-scissors.

Rock-paper-scissors as a preference game: actions (rock, paper, scissors), P[i, j] = P(i ≻ j) with 1 for a
win, 0 for a loss and 1/2 for a tie. Its only Nash equilibrium is (1/3, 1/3, 1/3).
"""

import math
import itertools

import pytest
import torch

from tether.preference_game import (exploitability, geometric_mixture, nash_md_step, preference_advantages,
                                    preference_against, preference_model_loss)

RPS = torch.tensor([[0.5, 0.0, 1.0],    # rock: loses to paper, beats scissors
                    [1.0, 0.5, 0.0],    # paper
                    [0.0, 1.0, 0.5]],   # scissors
                   dtype=torch.float64)
UNIFORM = torch.full((3,), 1 / 3, dtype=torch.float64)


def log(*p):
    return torch.tensor(p, dtype=torch.float64).log()


def test_preference_model_loss_by_hand():
    """d = (2, −1): loss = (log(1+e^−2) + log(1+e^1)) / 2 = (0.126928 + 1.313262) / 2 = 0.720095;
    accuracy 1/2; prob_chosen = (σ(2) + σ(−1)) / 2 = (0.880797 + 0.268941) / 2 = 0.574869."""
    loss, metrics = preference_model_loss(torch.tensor([2.0, -1.0]))
    assert float(loss) == pytest.approx(0.720095, abs=1e-6)
    assert float(metrics["accuracy"]) == 0.5
    assert float(metrics["prob_chosen"]) == pytest.approx(0.574869, abs=1e-6)


def test_geometric_mixture_by_hand():
    """π = (1/2, 1/2), π_ref = (0.9, 0.1), β = 1/2: ∝ (√0.45, √0.05) = (0.670820, 0.223607)
    → (0.75, 0.25)."""
    logits, ref_logits = torch.log(torch.tensor([0.5, 0.5])) + 3.0, torch.log(torch.tensor([0.9, 0.1])) - 1.0
    mixed = geometric_mixture(logits, ref_logits, 0.5).exp()
    assert mixed.tolist() == pytest.approx([0.75, 0.25], abs=1e-6)
    assert geometric_mixture(logits, ref_logits, 0.0).exp().tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    assert geometric_mixture(logits, ref_logits, 1.0).exp().tolist() == pytest.approx([0.9, 0.1], abs=1e-6)


def test_nash_md_one_step_by_hand_without_regulariser():
    """π = (1/2, 1/4, 1/4), η = 1, τ = 0 (so π^μ = π). P(y ≻ π) = P @ π:
    rock 0.5·0.5 + 1·0.25 = 0.5; paper 1·0.5 + 0.5·0.25 = 0.625; scissors 1·0.25 + 0.5·0.25 = 0.375.
    π' ∝ (0.5 e^0.5, 0.25 e^0.625, 0.25 e^0.375) = (0.824361, 0.467061, 0.363748) / 1.655170
       = (0.498052, 0.282183, 0.219765)."""
    policy = log(0.5, 0.25, 0.25)
    assert preference_against(policy, RPS).tolist() == pytest.approx([0.5, 0.625, 0.375])
    new, metrics = nash_md_step(policy, UNIFORM.log(), RPS, eta=1.0, tau=0.0)
    assert new.exp().tolist() == pytest.approx([0.498052, 0.282183, 0.219765], abs=1e-6)
    # exploitability of π' = max P(y ≻ π') − 1/2 = paper: 0.498052 + 0.5·0.282183 − 0.5 = 0.139144
    assert float(metrics["exploitability"]) == pytest.approx(0.139144, abs=1e-6)


def test_nash_md_one_step_by_hand_with_regulariser():
    """π = (1/2, 1/4, 1/4), μ uniform, η = 1, τ = 1/2: π^μ ∝ π^{1/2} μ^{1/2} ∝ (0.707107, 0.5, 0.5)
    → (0.414214, 0.292893, 0.292893). P(y ≻ π^μ): rock 0.207107 + 0.292893 = 0.5;
    paper 0.414214 + 0.146447 = 0.560660; scissors 0.292893 + 0.146447 = 0.439340.
    π' ∝ (0.414214 e^0.5, 0.292893 e^0.560660, 0.292893 e^0.439340) = (0.682923, 0.513099, 0.454477) / 1.650499
       = (0.413767, 0.310875, 0.275358)."""
    new, _ = nash_md_step(log(0.5, 0.25, 0.25), UNIFORM.log(), RPS, eta=1.0, tau=0.5)
    assert new.exp().tolist() == pytest.approx([0.413767, 0.310875, 0.275358], abs=1e-6)


def test_nash_md_converges_to_the_mixed_equilibrium_with_the_regulariser():
    """With τ > 0 the last iterate converges (Munos et al. 2024, Thm 1) to the regularised equilibrium, which
    for a uniform μ is the game's own: (1/3, 1/3, 1/3)."""
    policy = log(0.8, 0.15, 0.05)
    for _ in range(300):
        policy, metrics = nash_md_step(policy, UNIFORM.log(), RPS, eta=0.5, tau=0.5)
    assert policy.exp().tolist() == pytest.approx([1 / 3] * 3, abs=1e-4)
    assert float(metrics["exploitability"]) < 1e-4


def test_mirror_descent_without_the_regulariser_averages_to_the_equilibrium():
    """τ = 0 is multiplicative weights: on rock-paper-scissors the last iterate circles the equilibrium (it does
    not converge), while the average iterate does (the classical no-regret result): within 0.01 after 10 000
    steps at η = 0.1 (measured 0.006), exploitability 0.003."""
    policy, total, steps = log(0.8, 0.15, 0.05), torch.zeros(3, dtype=torch.float64), 10_000
    for _ in range(steps):
        policy, _ = nash_md_step(policy, UNIFORM.log(), RPS, eta=0.1, tau=0.0)
        total += policy.exp()
    average = total / steps
    assert average.tolist() == pytest.approx([1 / 3] * 3, abs=0.01)
    assert float(exploitability(average.log(), RPS)) < 0.01
    assert float(exploitability(policy, RPS)) > 0.1  # the last iterate is still far from it


def test_nash_md_with_a_non_uniform_reference_converges_to_a_fixed_point_near_the_equilibrium():
    """A skewed μ = (0.6, 0.2, 0.2) pulls the regularised equilibrium off (1/3, 1/3, 1/3) by O(τ). At η = 0.2,
    τ = 0.05 the last iterate converges (one more step moves it < 1e-9) to (0.338, 0.367, 0.295), whose
    exploitability is 0.022 < τ/2; it is what the test bounds."""
    policy, reference = log(0.8, 0.15, 0.05), log(0.6, 0.2, 0.2)
    for _ in range(3000):
        policy, metrics = nash_md_step(policy, reference, RPS, eta=0.2, tau=0.05)
    again, _ = nash_md_step(policy, reference, RPS, eta=0.2, tau=0.05)
    assert float((again - policy).abs().max()) < 1e-9
    assert policy.exp().tolist() == pytest.approx([1 / 3] * 3, abs=0.04)
    assert 0 < float(metrics["exploitability"]) < 0.05 / 2


def test_uniform_is_unexploitable_and_pure_strategies_are_maximally_exploitable():
    assert float(exploitability(UNIFORM.log(), RPS)) == pytest.approx(0.0, abs=1e-12)
    for pure in torch.eye(3, dtype=torch.float64):
        assert float(exploitability((pure + 1e-300).log(), RPS)) == pytest.approx(0.5)


def test_preference_advantages():
    assert preference_advantages(torch.tensor([1.0, 0.5, 0.25])).tolist() == [0.5, 0.0, -0.25]


def test_no_scalar_ranking_fits_more_than_two_thirds_of_a_cycle():
    """A ≻ B, B ≻ C, C ≻ A: every ordering of three scores (ties count as wrong) gets at most 2 of 3 right —
    the Bradley-Terry ceiling the preference-model test compares against."""
    cycle = [(0, 1), (1, 2), (2, 0)]
    best = max(sum(r[w] > r[l] for w, l in cycle) / 3 for r in itertools.permutations(range(3)))
    assert best == pytest.approx(2 / 3)
    assert math.isclose(best, 2 / 3)
