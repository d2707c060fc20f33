"""Truncated (TIS) and masked (MIS) importance weights for engine-sampled tokens, against hand-worked values.

Row 0 has two tokens and a pad: π_old = (0.5, 0.2), π_engine = (0.25, 0.4), so the ratios are r = (2, 0.5).
  TIS, C = 1.5: w = (min(2, 1.5), min(0.5, 1.5), pad) = (1.5, 0.5, 0); one token of two is capped.
  mean |Δ log p| = (ln 2 + ln 2) / 2 = ln 2;  mean r = 1.25;
  KL k3 = mean((r − 1) − ln r) = ((1 − ln 2) + (−0.5 + ln 2)) / 2 = 0.25.
  MIS token band [0.6, 2]: r = 2 stays (weight 2), r = 0.5 leaves (weight 0): half the tokens dropped.
  MIS sequence: the geometric mean exp((ln 2 − ln 2) / 2) = 1 is inside, both tokens weighted 1.
Row 1 (sequence level): π_old = (0.9, 0.9), π_engine = (0.3, 0.3): r = 3 per token, the sequence ratio 3 > 2,
  so the whole sample is dropped.
"""

import math

import pytest
import torch

from tether.losses import masked_importance_weights, truncated_importance_weights

OLD = torch.log(torch.tensor([[0.5, 0.2, 1.0]]))
ENGINE = torch.log(torch.tensor([[0.25, 0.4, 1.0]]))
MASK = torch.tensor([[1.0, 1.0, 0.0]])


def test_truncated_importance_weights_hand_values():
    weights, metrics = truncated_importance_weights(OLD, ENGINE, MASK, cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    assert metrics["is_clip_frac"].item() == pytest.approx(0.5)
    assert metrics["logprob_gap"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["engine_kl"].item() == pytest.approx(0.25, abs=1e-6)
    assert metrics["is_ratio_mean"].item() == pytest.approx(1.25, abs=1e-6)


def test_equal_engine_and_trainer_give_unit_weights_and_zero_gap():
    weights, metrics = truncated_importance_weights(OLD, OLD.clone(), MASK, cap=2.0)
    torch.testing.assert_close(weights, MASK)
    assert metrics["logprob_gap"].item() == 0 and metrics["engine_kl"].item() == 0
    weights, metrics = masked_importance_weights(OLD, OLD.clone(), MASK)
    torch.testing.assert_close(weights, MASK)
    assert metrics["is_mask_frac"].item() == 0


def test_masked_importance_weights_token_and_sequence_level():
    weights, metrics = masked_importance_weights(OLD, ENGINE, MASK, low=0.6, high=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.0, 0.0]]))
    assert metrics["is_mask_frac"].item() == pytest.approx(0.5)

    old = torch.cat([OLD, torch.log(torch.tensor([[0.9, 0.9, 1.0]]))])
    engine = torch.cat([ENGINE, torch.log(torch.tensor([[0.3, 0.3, 1.0]]))])
    mask = torch.cat([MASK, MASK])
    weights, metrics = masked_importance_weights(old, engine, mask, low=0.6, high=2.0, level="sequence")
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert metrics["is_mask_frac"].item() == pytest.approx(0.5)  # 2 of the 4 real tokens


def test_weights_are_constants_of_the_loss():
    old = OLD.clone().requires_grad_()
    weights, _ = truncated_importance_weights(old, ENGINE, MASK, cap=1.5)
    assert not weights.requires_grad


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(OLD, ENGINE, MASK, cap=0)
    with pytest.raises(ValueError, match="0 <= low < 1 < high"):
        masked_importance_weights(OLD, ENGINE, MASK, low=1.2, high=2)
    with pytest.raises(ValueError, match="token, sequence"):
        masked_importance_weights(OLD, ENGINE, MASK, level="batch")
