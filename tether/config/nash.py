"""Config of `tether nash`: Nash-MD against a pairwise preference model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tether.config import ConfigError
from tether.config.online import OnlineConfig
from tether.config.preference_model import MARKER_FILE


@dataclass
class NashConfig(OnlineConfig):
    """Nash-MD against a pairwise preference model: sample from π_θ and from an opponent, reward = P(y ≻ y')."""

    preference_model: str = ""
    """The `final/` folder of `tether pm` (required)."""
    opponent: Literal["geometric", "mixture", "self"] = "geometric"
    """geometric: π_θ^{1−β} π_ref^{β} token by token (Nash-MD); mixture: a uniformly chosen past policy
    (snapshots every snapshot_steps); self: the other samples of the same prompt (self-play)."""
    mixture_coef: float = 0.125
    """β of the geometric mixture π_θ^{1−β} π_ref^{β} (0: the opponent is π_θ itself; 1: π_ref)."""
    snapshot_steps: int = 10
    """opponent=mixture: keep a copy of the policy every N steps (π_0, the start, is always in the pool)."""
    max_snapshots: int = 8
    """opponent=mixture: most past policies kept (the oldest after π_0 is dropped first)."""
    preference_batch_size: int = 64
    """Pairs per preference-model forward."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator of KL(π_θ‖π_ref) subtracted from the reward, τ·Σ_t KL_t (k1: the Nash-MD-PG term)."""

    def validate(self) -> None:
        super().validate()
        if not self.preference_model:
            raise ConfigError("config key 'preference_model': required, the final/ folder of `tether pm`")
        if not (Path(self.preference_model) / MARKER_FILE).is_file():
            raise ConfigError(f"config key 'preference_model': {self.preference_model} is not a preference model "
                              f"folder (no {MARKER_FILE}); train one with `tether pm`")
        if not 0.0 <= self.mixture_coef <= 1.0:
            raise ConfigError(f"config key 'mixture_coef': expected 0 <= value <= 1, got {self.mixture_coef}")
        if self.snapshot_steps < 1 or self.max_snapshots < 1:
            raise ConfigError("config keys 'snapshot_steps' and 'max_snapshots': must be >= 1")
        if self.opponent == "self" and min(self.group_size, self.group_size_end or self.group_size) < 2:
            raise ConfigError("config key 'group_size': opponent=self plays the group's samples against each "
                              "other and needs group_size >= 2")
        if self.opponent == "geometric" and self.lora.r > 0:
            raise ConfigError("config key 'opponent': geometric samples π_θ and π_ref side by side, which needs a "
                              "full-weight policy; use lora.r=0 or opponent=mixture")
        if self.ppo_epochs != 1 or self.num_minibatches != 1 or self.rollout_engine != "builtin":
            raise ConfigError("config keys 'ppo_epochs', 'num_minibatches', 'rollout_engine': Nash-MD here is "
                              "on-policy with the builtin engine (1, 1, builtin)")

    def kl_needed(self) -> bool:
        """The reference is needed for τ > 0 and, whatever τ, to sample the geometric-mixture opponent."""
        return super().kl_needed() or self.opponent == "geometric"
