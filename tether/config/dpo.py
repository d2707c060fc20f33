"""Config of `tether dpo`: DPO and its family on preference pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tether.config import ConfigError, TrainConfig


REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOConfig(TrainConfig):
    """Offline preference optimization: DPO, IPO, cDPO, robust DPO, hinge, SimPO, ORPO on pairs; KTO on
    unpaired {prompt, completion, label} rows (or on pairs, split into chosen=true / rejected=false)."""

    loss: Literal["dpo", "ipo", "cdpo", "robust", "hinge", "simpo", "orpo", "kto"] = "dpo"
    """Preference loss; see docs/preference.md for each formula."""
    beta: float = 0.1
    """β: strength of the KL anchor to the reference (dpo, cdpo, robust, hinge, kto), IPO's τ, SimPO's
    reward scale, and ORPO's λ unless orpo_lambda is set."""
    label_smoothing: float = 0.0
    """ε, the assumed rate of flipped labels (dpo/cdpo: conservative DPO; robust: must be < 0.5)."""
    gamma: float = 0.5
    """SimPO target reward margin γ (the paper's γ, not γ/β)."""
    orpo_lambda: float | None = None
    """ORPO weight λ of the odds-ratio term; null means λ = beta."""
    desirable_weight: float = 1.0
    """KTO λ_D: weight of desirable (label=true) examples."""
    undesirable_weight: float = 1.0
    """KTO λ_U: weight of undesirable (label=false) examples."""
    ref_model: str = ""
    """Reference model π_ref (folder or hub name); "" means the starting policy (under LoRA: the base
    model with the adapter disabled, no second copy)."""
    precompute_ref: bool = True
    """Compute reference log-probs once for every example before training and reuse them across epochs
    (the reference model is then freed)."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: message lists use the tokenizer's chat template, plain strings are used as is;
    always: string prompts are wrapped as a user message too; never: no template."""
    eval_fraction: float = 0.0
    """Held-out share of `data` when `eval_data` is not given (e.g. 0.1); 0 disables evaluation then."""
    eval_steps: int = 0
    """Evaluate on the held-out examples every N steps (0: only at the end)."""
    skip_bad_rows: bool = False
    """Skip (and count in the log) rows that are invalid, instead of stopping with an error."""

    def validate(self) -> None:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ConfigError(f"config key 'micro_batch_size': {micro} must divide batch_size={self.batch_size}")
        if self.beta <= 0:
            raise ConfigError(f"config key 'beta': must be > 0, got {self.beta}")
        if self.loss == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"config key 'label_smoothing': robust DPO needs 0 <= value < 0.5, "
                              f"got {self.label_smoothing}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"config key 'label_smoothing': expected 0 <= value < 1, got {self.label_smoothing}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"config key 'eval_fraction': expected 0 <= value < 1, got {self.eval_fraction}")
        if self.ref_model and self.loss in REFERENCE_FREE:
            raise ConfigError(f"config key 'ref_model': loss={self.loss} is reference-free; leave ref_model empty")

