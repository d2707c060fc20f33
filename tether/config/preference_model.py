"""Config of `tether pm`: a pairwise preference model P(a ≻ b | x) on preference pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tether.config import ConfigError, TrainConfig

MARKER_FILE = "preference_model.json"
"""The file `tether pm` writes into its `final/` folder beside the HF model: what tells a preference model
from a reward model (both are scalar-head folders). Plain Python here, so `tether nash` checks it before torch."""


@dataclass
class PreferenceModelConfig(TrainConfig):
    """Pairwise preference model P(a ≻ b | x) on preference pairs {prompt, chosen, rejected}."""

    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: message lists use the tokenizer's chat template, plain strings are used as is;
    always: string prompts are wrapped as a user message too; never: no template."""
    eval_fraction: float = 0.0
    """Held-out share of `data` when `eval_data` is not given (e.g. 0.1); 0 disables evaluation then."""
    eval_steps: int = 0
    """Evaluate pairwise accuracy on the held-out pairs every N steps (0: only at the end)."""
    skip_bad_rows: bool = False
    """Skip (and count in the log) rows that are invalid, instead of stopping with an error."""
    margin_column = ""  # not a field: a preference model has no margin (load_pairs reads it)

    def validate(self) -> None:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ConfigError(f"config key 'micro_batch_size': {micro} must divide batch_size={self.batch_size}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"config key 'eval_fraction': expected 0 <= value < 1, got {self.eval_fraction}")
