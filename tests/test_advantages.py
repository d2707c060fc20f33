"""tether.advantages: hand values for every estimator (derivations in the docstrings), the
None/NaN and degenerate-group rules, and batched GAE against a plain Python double loop."""

import pytest
import torch

from tether.advantages import (
    ADVANTAGE_ESTIMATORS,
    RunningMeanBaseline,
    gae,
    get_advantage_estimator,
    kl_shaped_token_rewards,
)
from tether.losses import accepted_kwargs

NAN = float("nan")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def assert_values(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=atol)


# --------------------------------------------------------------------------- group estimators


def test_grpo_binary_group():
    """rewards (1, 1, 0): mean 2/3, deviations (1/3, 1/3, -2/3).
    population var = (1/9 + 1/9 + 4/9) / 3 = 2/9, std = 0.471405 -> A = (0.707107, 0.707107, -1.414214).
    sample var = (6/9) / 2 = 1/3, std = 0.577350 -> A = (0.577350, 0.577350, -1.154701)."""
    grpo = get_advantage_estimator("grpo")
    advantages, metrics = grpo(t(1, 1, 0), 3)
    assert_values(advantages, [0.707107, 0.707107, -1.414214])
    assert_values(grpo(t(1, 1, 0), 3, std="sample")[0], [0.577350, 0.577350, -1.154701])
    assert metrics["zero_variance_groups"].item() == 0.0
    assert abs(metrics["adv_mean"].item()) < 1e-6
    with pytest.raises(ValueError, match="population"):
        grpo(t(1, 1, 0), 3, std="unbiased")


def test_grpo_seeds_creative_writing_group():
    """Seeds: r = (4.2, 4.8, 2.1, 3.5), mean 3.65 (as printed). Squared deviations
    0.3025 + 1.3225 + 2.4025 + 0.0225 = 4.05; population std = sqrt(4.05 / 4) = 1.006231
    (the seeds print 1.02, an arithmetic slip; the sample std would be 1.161895).
    A = (0.55, 1.15, -1.55, -0.15) / 1.006231 = (0.546594, 1.142879, -1.540399, -0.149071)."""
    advantages, _ = get_advantage_estimator("grpo")(t(4.2, 4.8, 2.1, 3.5), 4)
    assert_values(advantages, [0.546594, 1.142879, -1.540399, -0.149071], atol=2e-5)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_degenerate_groups_give_zero_never_nan(name):
    """Groups of size 3: all equal (2, 2, 2); one valid reward (NaN, 5, NaN); no valid reward;
    and an informative group (1, 0, NaN). Group estimators give 0 to the first three and to
    every NaN reward; nothing is NaN. (reinforce / reinforce_pp have no per-group baseline:
    they only promise finite values and 0 for NaN rewards.)"""
    rewards = t(2, 2, 2, NAN, 5, NAN, NAN, NAN, NAN, 1, 0, NAN)
    advantages, metrics = get_advantage_estimator(name)(rewards, 3)
    assert advantages.shape == (12,) and torch.isfinite(advantages).all()
    assert (advantages[torch.isnan(rewards)] == 0).all()
    assert metrics["zero_variance_groups"].item() == pytest.approx(0.75)
    assert metrics["none_rewards"].item() == 6
    if name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        assert (advantages[:9] == 0).all()
        assert advantages[9] > 0 > advantages[10]
    # groups of one: nothing to compare against
    singles, _ = get_advantage_estimator(name)(t(0.3, 0.9), 1)
    if name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        assert (singles == 0).all()


def test_nan_rewards_excluded_from_group_stats():
    """(1, NaN, 1, 0) has the same statistics as (1, 1, 0): A = (0.707107, 0, 0.707107, -1.414214)."""
    advantages, _ = get_advantage_estimator("grpo")(t(1, NAN, 1, 0), 4)
    assert_values(advantages, [0.707107, 0.0, 0.707107, -1.414214])


def test_rloo_hand_values():
    """(3, 1, 2): leave-one-out means (1 + 2)/2 = 1.5, (3 + 2)/2 = 2.5, (3 + 1)/2 = 2
    -> A = (1.5, -1.5, 0). A NaN member is left out: (3, NaN, 1, 2) -> (1.5, 0, -1.5, 0).
    Second group (0, 4): baselines 4 and 0 -> (-4, 4)."""
    rloo = get_advantage_estimator("rloo")
    assert_values(rloo(t(3, 1, 2), 3)[0], [1.5, -1.5, 0.0])
    assert_values(rloo(t(3, NAN, 1, 2, 0, 4, NAN, NAN), 4)[0], [1.5, 0.0, -1.5, 0.0, -4.0, 4.0, 0.0, 0.0])


def test_dr_grpo_hand_values():
    """(3, 1, 2) - mean 2 = (1, -1, 0); second group (0, 4, 5): mean 3 -> (-3, 1, 2); no std division."""
    assert_values(get_advantage_estimator("dr_grpo")(t(3, 1, 2, 0, 4, 5), 3)[0], [1, -1, 0, -3, 1, 2])


def test_reinforce_pp_batch_normalisation():
    """Batch (1, 1 | 0, 0): batch mean 0.5, population std 0.5 -> (1, 1, -1, -1) (up to eps),
    even though each group is all-equal: REINFORCE++ has no per-prompt baseline.
    An all-equal batch gives 0."""
    reinforce_pp = get_advantage_estimator("reinforce_pp")
    assert_values(reinforce_pp(t(1, 1, 0, 0), 2)[0], [1, 1, -1, -1], atol=1e-5)
    assert (reinforce_pp(t(3, 3, 3, 3), 2)[0] == 0).all()


def test_reinforce_pp_baseline_hand_values():
    """Groups (1, 0) and (3, 3): minus group means -> (0.5, -0.5, 0, 0); batch std of those
    four = sqrt((0.25 + 0.25) / 4) = 0.353553 -> (1.414214, -1.414214, 0, 0)."""
    advantages, _ = get_advantage_estimator("reinforce_pp_baseline")(t(1, 0, 3, 3), 2)
    assert_values(advantages, [1.414214, -1.414214, 0, 0], atol=1e-5)


def test_reinforce_with_running_baseline():
    """Baseline 0.25: (1, 0, NaN) -> (0.75, -0.25, 0). The tracker: first batch mean of (1, 0) = 0.5;
    then (1, 1) with decay 0.9 -> 0.9 * 0.5 + 0.1 * 1 = 0.55; state_dict restores it."""
    advantages, metrics = get_advantage_estimator("reinforce")(t(1, 0, NAN), 3, baseline=0.25)
    assert_values(advantages, [0.75, -0.25, 0.0])
    assert metrics["baseline"].item() == 0.25
    tracker = RunningMeanBaseline(decay=0.9)
    assert tracker.update(t(1, 0, NAN)) == pytest.approx(0.5)
    assert tracker.update(t(1, 1)) == pytest.approx(0.55)
    resumed = RunningMeanBaseline(decay=0.9)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.value == pytest.approx(0.55) and resumed.num_updates == 2


def test_estimator_errors():
    with pytest.raises(ValueError, match="group_size"):
        get_advantage_estimator("grpo")(t(1, 2, 3), 2)
    with pytest.raises(ValueError, match="rloo"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="tether.advantages.gae"):
        get_advantage_estimator("gae")


# Each estimator declares the keywords it reads; grpo's recipe holds one set (std, baseline) and passes
# each estimator `accepted_kwargs(estimator, std=..., baseline=...)`.
DECLARED_KEYWORDS = {"grpo": {"eps", "std"}, "dr_grpo": set(), "rloo": set(), "reinforce_pp": {"eps", "std"},
                     "reinforce_pp_baseline": {"eps", "std"}, "reinforce": {"baseline"}}


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_estimators_reject_unknown_keywords(name):
    """A misspelt keyword is a TypeError naming it; so is one the estimator does not read (rloo has no std).
    The recipe's uniform call, filtered by accepted_kwargs, works for every estimator: on (1, 1, 0) grpo with
    the sample std gives (0.577350, 0.577350, -1.154701), reinforce with baseline 0.5 gives (0.5, 0.5, -0.5)."""
    estimator = get_advantage_estimator(name)
    with pytest.raises(TypeError, match="baselin"):
        estimator(t(1, 1, 0), 3, baselin=0.5)
    knobs = accepted_kwargs(estimator, std="sample", baseline=0.5, eps=1e-6)
    assert set(knobs) == DECLARED_KEYWORDS[name]
    advantages, _ = estimator(t(1, 1, 0), 3, **accepted_kwargs(estimator, std="sample", baseline=0.5))
    if name == "grpo":
        assert_values(advantages, [0.577350, 0.577350, -1.154701])
    if name == "reinforce":
        assert_values(advantages, [0.5, 0.5, -0.5])
    if "std" not in DECLARED_KEYWORDS[name]:
        with pytest.raises(TypeError, match="std"):
            estimator(t(1, 1, 0), 3, std="sample")


# --------------------------------------------------------------------------- GAE


def test_gae_seeds_example():
    """Seeds, gamma = 0.99, lam = 0.95, rewards (0.5, 1.2, 2.1), values (0.8, 1.5, 1.9), V_3 = 0:
      delta_0 = 0.5 + 0.99 * 1.5 - 0.8 = 1.185
      delta_1 = 1.2 + 0.99 * 1.9 - 1.5 = 1.581
      delta_2 = 2.1 + 0.99 * 0 - 1.9 = 0.2
      A_2 = 0.2
      A_1 = 1.581 + 0.9405 * 0.2 = 1.7691
      A_0 = 1.185 + 0.9405 * 1.7691 = 2.848838 (the seeds print 2.836, an arithmetic slip)
    returns = A + V = (3.648838, 3.2691, 2.1)."""
    advantages, returns = gae(t(0.5, 1.2, 2.1).view(1, 3), t(0.8, 1.5, 1.9).view(1, 3), torch.ones(1, 3),
                              gamma=0.99, lam=0.95)
    assert_values(advantages, [[2.848838, 1.7691, 0.2]])
    assert_values(returns, [[3.648838, 3.2691, 2.1]])


def gae_reference(rewards, values, mask, gamma, lam):
    """The obvious version: for each sequence, take its valid tokens and run the recursion
    backwards in plain Python, with V = 0 after the last token."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        idx = [t for t in range(len(rewards[b])) if mask[b][t]]
        running = 0.0
        for k in reversed(range(len(idx))):
            t_now = idx[k]
            next_value = values[b][idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = rewards[b][t_now] + gamma * next_value - values[b][t_now]
            running = delta + gamma * lam * running
            advantages[b][t_now] = running
    return torch.tensor(advantages)


@pytest.mark.parametrize("side", ["right", "left", "holes"])
def test_gae_matches_reference_loop_on_padded_batch(side):
    """Right/left padding, and episodes (holes: observation tokens between model turns, which the reference
    skips: the token before a hole bootstraps from the next valid one)."""
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    lengths = torch.tensor([7, 3, 1, 5, 0])
    positions = torch.arange(T)
    mask = positions < lengths[:, None] if side == "right" else positions >= (T - lengths)[:, None]
    if side == "holes":
        mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 1],
                             [1, 1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]]).bool()
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    values[~mask] = NAN  # garbage at padding must not leak
    advantages, returns = gae(rewards, values, mask.long(), gamma=0.9, lam=0.8)
    expected = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), 0.9, 0.8)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns[mask], (expected + values)[mask])
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_gae_lambda_one_is_discounted_return_minus_value():
    """lam = 1: A_t = sum_k gamma^k r_{t+k} - V_t. Rewards (0, 0, 1), gamma 0.5, V = 0 ->
    A = (0.25, 0.5, 1); lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t = (0, 0, 1)."""
    rewards, values, mask = t(0, 0, 1).view(1, 3), torch.zeros(1, 3), torch.ones(1, 3)
    assert_values(gae(rewards, values, mask, gamma=0.5, lam=1.0)[0], [[0.25, 0.5, 1.0]])
    assert_values(gae(rewards, values, mask, gamma=0.5, lam=0.0)[0], [[0.0, 0.0, 1.0]])


def test_kl_shaped_token_rewards():
    """beta = 0.1. Row 0 (3 tokens, score 2): (-0.01, -0.02, -0.03 + 2) = (-0.01, -0.02, 1.97).
    Row 1 (right-padded, 2 tokens, score -1): (-0.05, -0.04 - 1, 0) = (-0.05, -1.04, 0).
    Row 2 (left-padded, score 3): (0, -0.01, -0.01 + 3). Row 3 (no tokens): zeros."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.4, 9.9], [9.9, 0.1, 0.1], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]])
    rewards = kl_shaped_token_rewards(t(2.0, -1.0, 3.0, 5.0), kl, mask, beta=0.1)
    assert_values(rewards, [[-0.01, -0.02, 1.97], [-0.05, -1.04, 0.0], [0.0, -0.01, 2.99], [0.0, 0.0, 0.0]])


def test_kl_in_the_reward_is_the_shaped_rewards_summed():
    """GRPO's kl_penalty=reward: each completion's reward r - beta * sum_t KL_t is the sum of its InstructGPT
    token rewards. beta = 0.1: row 0, r = 2, KL (0.1, 0.2, 0.3) -> 2 - 0.06 = 1.94; row 1, r = -1, KL (0.5, 0.4)
    with a padded 9.9 -> -1 - 0.09 = -1.09; row 2, r = NaN (cannot judge) stays NaN, so it is still left out
    of the group baseline."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.4, 9.9], [0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    rewards = kl_shaped_token_rewards(t(2.0, -1.0, NAN), kl, mask, beta=0.1).sum(-1)
    assert_values(rewards[:2], [1.94, -1.09])
    assert torch.isnan(rewards[2])
