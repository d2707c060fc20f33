"""Tensor operations shared by every recipe: per-token log-probs, entropy, masked
statistics and THE loss reduction, `aggregate`.

Imports only torch. Shapes: B = batch (sequences), T = tokens, V = vocabulary.
Masks are 0/1 (bool, int or float); positions where the mask is 0 never affect a
result, even when the value there is NaN or inf.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Count = Union[int, float, Tensor, None]

AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "token_sum_norm")


# --------------------------------------------------------------------------- chunked vocab ops


def _map_row_chunks(fn: Callable[..., Tensor], rows: Sequence[Tensor], chunk_size: int) -> Tensor:
    """Apply `fn` to `chunk_size` rows of each tensor in `rows` at a time and concatenate.

    `fn` upcasts its chunk to fp32, so only one (chunk_size, V) fp32 block lives at a
    time. When gradients are needed each chunk is checkpointed: backward recomputes the
    fp32 block instead of keeping every block alive until backward runs.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    outputs = []
    for start in range(0, rows[0].shape[0], chunk_size):
        chunk = [r[start : start + chunk_size] for r in rows]
        if needs_grad:
            outputs.append(checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False))
        else:
            outputs.append(fn(*chunk))
    if not outputs:  # zero rows: `fn` of the empty chunk, so the result stays in the autograd graph
        return fn(*[r[:0] for r in rows])
    return torch.cat(outputs)


def token_logprobs(
    logits: Tensor, labels: Tensor, *, chunk_size: int = 1024, temperature: float = 1.0
) -> Tensor:
    """log softmax(logits / temperature)[label] for every position, chunked over rows.

    logits (B, T, V) any float dtype; labels (B, T) long -> (B, T) float32.
    Negative labels (e.g. -100, the ignore index) give 0.0. Differentiable.
    """
    B, T, V = logits.shape
    flat_logits = logits.reshape(B * T, V)  # (B*T, V), a view when logits is contiguous
    flat_labels = labels.reshape(B * T)  # (B*T,)

    def rows_logprob(chunk_logits: Tensor, chunk_labels: Tensor) -> Tensor:
        z = chunk_logits.float() / temperature  # (n, V) fp32
        valid = chunk_labels >= 0  # (n,)
        picked = z.gather(-1, chunk_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (n,)
        logprob = picked - torch.logsumexp(z, dim=-1)  # (n,) log p(label) = z_y - log sum exp z
        return torch.where(valid, logprob, torch.zeros_like(logprob))

    return _map_row_chunks(rows_logprob, [flat_logits, flat_labels], chunk_size).view(B, T)


def _rows_entropy(chunk_logits: Tensor, temperature: float = 1.0) -> Tensor:
    z = chunk_logits.float() / temperature  # (n, V)
    logp = torch.log_softmax(z, dim=-1)  # (n, V)
    return -(logp.exp() * logp).sum(-1)  # (n,) H = -sum p log p


def entropy_from_logits(
    logits: Tensor, *, chunk_size: int = 1024, temperature: float = 1.0
) -> Tensor:
    """Entropy of softmax(logits / temperature) per position: (B, T, V) -> (B, T) float32."""
    B, T, V = logits.shape
    fn = lambda chunk: _rows_entropy(chunk, temperature)  # noqa: E731
    return _map_row_chunks(fn, [logits.reshape(B * T, V)], chunk_size).view(B, T)


def kl_from_logits(
    p_logits: Tensor, q_logits: Tensor, *, chunk_size: int = 1024, temperature: float = 1.0
) -> Tensor:
    """Exact KL(p || q) = sum_v p_v (log p_v - log q_v) per position, p = softmax(p_logits / t).

    p_logits, q_logits (B, T, V) -> (B, T) float32, chunked like `token_logprobs`.
    """
    B, T, V = p_logits.shape

    def rows_kl(p_chunk: Tensor, q_chunk: Tensor) -> Tensor:
        logp = torch.log_softmax(p_chunk.float() / temperature, dim=-1)  # (n, V)
        logq = torch.log_softmax(q_chunk.float() / temperature, dim=-1)  # (n, V)
        return (logp.exp() * (logp - logq)).sum(-1)  # (n,)

    rows = [p_logits.reshape(B * T, V), q_logits.reshape(B * T, V)]
    return _map_row_chunks(rows_kl, rows, chunk_size).view(B, T)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... counted from each sequence's first real token: (B, T) -> (B, T) long.

    Left padding then gives the same positions as the unpadded sequence. Pad positions
    get 0 (left) or repeat the last position (right); they are masked anyway.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-prob of each next token under `model`, for left- or right-padded batches.

    input_ids, attention_mask (B, T) -> (logprobs (B, T-1), entropy (B, T-1) or None).
    logprobs[:, t] = log pi(input_ids[:, t+1] | input_ids[:, :t+1]) at `temperature`;
    positions whose target token is padding are 0 (logprobs and entropy), and so is the
    position that predicts a left-padded sequence's first token from a pad token (the
    unpadded sequence has no log-prob for its first token either).
    """
    kwargs = {}
    if bool((attention_mask[:, 0] == 0).any()):  # left padding: positions must start at 0
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits  # (B, T, V)

    target_mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # (B, T-1)
    # Shift labels instead of slicing logits[:, :-1]: the slice is not contiguous and would
    # copy the whole (B, T, V) tensor. The last position gets label -100 and is dropped.
    labels = torch.full_like(input_ids, -100)  # (B, T)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~target_mask, -100)
    logprobs = token_logprobs(logits, labels, chunk_size=chunk_size, temperature=temperature)
    logprobs = logprobs[:, :-1]  # (B, T-1)

    entropy = None
    if return_entropy:
        entropy = entropy_from_logits(logits, chunk_size=chunk_size, temperature=temperature)
        entropy = torch.where(target_mask, entropy[:, :-1], torch.zeros_like(entropy[:, :-1]))
    return logprobs, entropy


# --------------------------------------------------------------------------- masked statistics


def masked_sum(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of values where mask is 1 (NaN-safe at masked-out positions)."""
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of values where mask is 1; 0 (not NaN) where the mask sums to 0."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(
    values: Tensor, mask: Tensor, unbiased: bool = True, dim: Optional[int] = None
) -> Tensor:
    """Variance of values where mask is 1; unbiased divides by (n - 1), clamped to >= 1."""
    mean = masked_mean(values, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    sq_dev = masked_sum((values - mean) ** 2, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return sq_dev / ((count - 1) if unbiased else count).clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(values - mean) / sqrt(var + eps) over masked entries; masked-out entries become 0.

    shift_mean=False adds the mean back (scale only), as in TRL's `masked_whiten`.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- loss reduction


def _count(given: Count, fallback: Tensor | int) -> Tensor | float:
    """A global count if the caller gave one, else the local one; never below 1."""
    count = fallback if given is None else given
    if isinstance(count, Tensor):
        return count.float().clamp(min=1)
    return float(max(count, 1))


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: Count = None,
    num_seqs: Count = None,
    max_len: Optional[int] = None,
) -> Tensor:
    """Reduce a per-token quantity (B, T) to a scalar: the one loss reduction in tether.

    num_tokens / num_seqs are GLOBAL counts (all micro-batches, all ranks), so the
    losses of the micro-batches SUM to the loss of the full batch. Without them the
    local counts are used. Modes:
      token_mean:          sum(values * mask) / num_tokens
      seq_mean_token_mean: sum_b (masked mean of row b) / num_seqs
      token_sum_norm:      sum(values * mask) / (max_len * num_seqs)   (Dr. GRPO, Liu et al. 2025;
                           max_len is the generation budget, a constant)
    """
    if mode == "token_mean":
        return masked_sum(values, mask) / _count(num_tokens, mask.sum())
    if mode == "seq_mean_token_mean":
        per_seq = masked_mean(values, mask, dim=-1)  # (B,)
        return per_seq.sum() / _count(num_seqs, values.shape[0])
    if mode == "token_sum_norm":
        if max_len is None:
            raise ValueError("aggregate mode 'token_sum_norm' needs max_len (the generation budget)")
        return masked_sum(values, mask) / (_count(num_seqs, values.shape[0]) * max_len)
    raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATION_MODES)}")
