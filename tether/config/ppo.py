"""Config of `tether ppo`: PPO with a critic and GAE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tether.config import ConfigError
from tether.config.online import OnlineConfig


@dataclass
class PPOConfig(OnlineConfig):
    """PPO with a critic and GAE: policy, frozen reference, reward model or functions, value model."""

    group_size: int = 1
    """Completions sampled per prompt (PPO needs no groups; >1 gives more completions per prompt)."""
    reward_model: str = ""
    """A reward model folder (from `tether rm`) scoring each completion; added to `rewards` with weight 1."""
    critic: Literal["separate", "shared"] = "separate"
    """separate: a value model of its own with its own optimizer (initialised from critic_model, or the
    policy's weights with a new head; trained in full even under LoRA); shared: a value head on the
    policy's body (one forward, less memory)."""
    critic_model: str = ""
    """Initial separate critic: a reward/value model folder (InstructGPT starts it from the reward model)
    or a causal LM; "" means the starting policy's weights with a fresh head."""
    gamma: float = 1.0
    """γ, discount of GAE."""
    lam: float = 0.95
    """λ, GAE's bias/variance trade-off (0: one-step TD, 1: Monte-Carlo returns)."""
    whiten_advantages: bool = True
    """Normalise the advantages to mean 0, std 1 over the batch's tokens."""
    value_coef: float = 0.1
    """c_v, weight of the value loss."""
    value_clip: float | None = 0.2
    """ε_v: new values are clipped to old ± ε_v in the value loss (null: no clipping)."""
    kl_coef: float = 0.05
    """β, weight of the per-token KL penalty in the reward (InstructGPT). 0 loads no reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate in the reward: k1 = log π_old − log π_ref (InstructGPT), k2, k3."""
    ppo_epochs: int = 4
    """μ: update epochs over each step's rollouts."""

    def validate(self) -> None:
        super().validate()
        if not self.rewards and not self.reward_model and not self.env:
            raise ConfigError("config key 'rewards': PPO needs a reward: set reward_model (a folder) or rewards "
                              "(e.g. [{name: math, weight: 1.0}]) (or an `env` that gives rewards)")
        if self.critic == "shared" and self.critic_model:
            raise ConfigError("config key 'critic_model': a shared critic is a head on the policy; leave "
                              "critic_model empty or set critic=separate")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"config keys 'gamma', 'lam': must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ConfigError(f"config key 'value_clip': must be > 0 or null, got {self.value_clip}")

