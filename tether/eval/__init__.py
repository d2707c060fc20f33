"""Evaluation metrics: pass@k, maj@k, majority vote. Light to import (no torch)."""

from tether.eval.metrics import maj_at_k, majority_vote, mean_pass_at_k, pass_at_1_mean, pass_at_k

__all__ = ["maj_at_k", "majority_vote", "mean_pass_at_k", "pass_at_1_mean", "pass_at_k"]
