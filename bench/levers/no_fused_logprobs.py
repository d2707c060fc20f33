"""Ablation (not a proposal): turn OFF the chunked LM head (`ops.linear_token_logprobs` through
`ops.plain_lm_head`), so every log-prob comes from the model's full (B, T, V) logits, as before that lever was
kept. It raises the vocabulary threshold of the kept code instead of copying it."""

from __future__ import annotations


def apply() -> None:
    from tether import ops

    ops.FUSED_HEAD_MIN_VOCAB = float("inf")
