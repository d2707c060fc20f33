"""Config of `tether grpo`: GRPO and its family (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tether.config import ConfigError
from tether.config.online import OnlineConfig


GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # need G >= 2 completions per prompt


@dataclass
class GRPOConfig(OnlineConfig):
    """Group-relative policy optimization with reward functions (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE)."""

    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """Advantage estimator: grpo (r − mean)/std in the group; dr_grpo r − mean; rloo leave-one-out mean;
    reinforce r − running mean; reinforce_pp batch-normalised r; reinforce_pp_baseline group mean, batch std."""
    advantage_std: Literal["population", "sample"] = "population"
    """Group std of grpo: population (÷G) or sample (÷(G−1), as TRL and verl)."""
    baseline_decay: float = 0.9
    """reinforce: decay of the running-mean reward baseline."""
    reinforce_baseline: bool = True
    """reinforce: subtract the running-mean baseline; false: advantage = reward (plain REINFORCE)."""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """How β·KL enters: loss = a loss term (GRPO); reward = subtracted from each completion's reward as
    β·Σ_t KL_t before the advantages (the estimator in `kl_estimator`)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts to refill."""
    max_sampling_tries: int = 4
    """Rounds of sampling per step under dynamic_sampling; a batch still short is filled with dropped groups."""
    is_correction: Literal["none", "tis", "mis"] = "none"
    """Importance correction of the engine's tokens by π_old/π_engine (policy lag, engine numerics): tis =
    truncated IS, weight min(ratio, is_cap); mis = masked IS, tokens (or sequences) outside [is_low, is_cap]
    drop out of the loss. The gap is logged either way when the engine's log-probs differ from π_old."""
    is_cap: float = 2.0
    """TIS cap C on the ratio; the upper edge of the masked-IS band."""
    is_low: float = 0.5
    """Lower edge of the masked-IS band."""
    is_level: Literal["token", "sequence"] = "token"
    """Masked IS decides per token, or per sequence by its geometric-mean ratio."""

    def validate(self) -> None:
        super().validate()
        if not self.rewards and not self.env:
            raise ConfigError("config key 'rewards': GRPO needs at least one reward function, "
                              "e.g. rewards: [{name: math, weight: 1.0}] (or an `env` that gives rewards)")
        smallest_group = min(self.group_size, self.group_size_end or self.group_size)
        if self.advantage in GROUP_ESTIMATORS and smallest_group < 2:
            raise ConfigError(f"config key 'group_size': advantage={self.advantage} compares completions of the "
                              f"same prompt and needs group_size >= 2, got {smallest_group}")
        if self.dynamic_sampling and smallest_group < 2:
            raise ConfigError("config key 'dynamic_sampling': needs group_size >= 2")
        if self.max_sampling_tries < 1:
            raise ConfigError(f"config key 'max_sampling_tries': must be >= 1, got {self.max_sampling_tries}")
        if self.is_cap <= 1 or not 0 <= self.is_low < 1:
            raise ConfigError(f"config keys 'is_cap' / 'is_low': need is_cap > 1 and 0 <= is_low < 1, "
                              f"got {self.is_cap} / {self.is_low}")

