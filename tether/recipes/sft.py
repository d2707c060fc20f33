"""Supervised fine-tuning (teacher forcing): maximise the mean log-likelihood of the demonstration tokens.

    J_sft(θ) = E_(s,a) [ 1/|a| Σ_k log π_θ(a_k | s, a_<k) ]

    for each step:
        forward the global batch (packed where the model allows: `padding_free`)
        L = −Σ_tokens log π_θ(a_k | s, a_<k) / (completion tokens of the whole global batch)
        backward, one optimizer step; log, checkpoint
    save `final/`

The loop is `tether.supervised.train` (rft's rounds and distill's trace fine-tuning run it too, and a recipe
never imports another recipe); this module is its command-line entry, `tether sft`.
"""

from __future__ import annotations

from tether.config.sft import SFTConfig
from tether.supervised import evaluate_loss, load_examples, train

__all__ = ["SFTConfig", "evaluate_loss", "load_examples", "train"]
