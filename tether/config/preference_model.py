"""Config of `tether pm`: a pairwise preference model P(a ≻ b | x) on preference pairs."""

from __future__ import annotations

from dataclasses import dataclass

from tether.config.reward_model import PairsConfig

MARKER_FILE = "preference_model.json"
"""The file `tether pm` writes into its `final/` folder beside the HF model: what tells a preference model
from a reward model (both are scalar-head folders). Plain Python here, so `tether nash` checks it before torch."""


@dataclass
class PreferenceModelConfig(PairsConfig):
    """Pairwise preference model P(a ≻ b | x) on preference pairs {prompt, chosen, rejected}."""

    margin_column = ""  # not a field: a preference model has no margin (load_pairs reads it)
