"""Config of `tether rm`: a Bradley-Terry reward model on preference pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tether.config import ConfigError, TrainConfig


@dataclass
class PairsConfig(TrainConfig):
    """What `tether rm` and `tether pm` share: a scalar-head model trained on preference pairs."""

    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: message lists use the tokenizer's chat template, plain strings are used as is;
    always: string prompts are wrapped as a user message too; never: no template."""
    eval_fraction: float = 0.0
    """Held-out share of `data` when `eval_data` is not given (e.g. 0.1); 0 disables evaluation then."""
    eval_steps: int = 0
    """Evaluate on the held-out pairs every N steps (0: only at the end): pairwise accuracy, and a reward
    model's margin."""
    skip_bad_rows: bool = False
    """Skip (and count in the log) rows that are invalid, instead of stopping with an error."""

    def validate(self) -> None:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ConfigError(f"config key 'micro_batch_size': {micro} must divide batch_size={self.batch_size}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"config key 'eval_fraction': expected 0 <= value < 1, got {self.eval_fraction}")


@dataclass
class RewardModelConfig(PairsConfig):
    """Bradley-Terry reward model on preference pairs {prompt, chosen, rejected} (or HH-style conversations)."""

    margin_column: str = "margin"
    """Row field holding an optional per-pair margin m in −log σ(r_w − r_l − m); "" ignores margins."""
    center_rewards_coef: float = 0.0
    """Reward centering: adds coef · mean((r_w + r_l)²) to keep rewards near 0 (e.g. 0.01)."""

