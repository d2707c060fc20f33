"""Tensor operations shared by every recipe: per-token log-probs, entropy, masked
statistics and THE loss reduction, `aggregate`.

Imports only torch. Shapes: B = batch (sequences), T = tokens, V = vocabulary.
Masks are 0/1 (bool, int or float); positions where the mask is 0 never affect a
result, even when the value there is NaN or inf.
"""

from __future__ import annotations

import inspect
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


# --------------------------------------------------------------------------- log-probs from hidden states

# Rows of logits per chunk of the fused head: ~64 MB of fp32 logits (V = 152k: 110 rows; V = 32k: 512).
HEAD_CHUNK_BYTES = 64 * 2**20
# Below this vocabulary size the logits are small and the model's own head is as fast (docs/benchmarks.md).
FUSED_HEAD_MIN_VOCAB = 4096


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / t)[label] per row, a chunk of rows of logits at a time.

    hidden (N, H), weight (V, H), labels (N,) long, all scored -> logprobs (N,) float32 and, when asked,
    entropy (N,) float32 (no gradient). The forward keeps one log-normaliser per row; the backward
    recomputes each chunk's logits and turns them into their gradient in place, using
    d log p_y / d z = onehot(y) - softmax(z). One (chunk, V) buffer serves every pass: on CPU a fresh
    large temporary per pass is page-faulted in and unmapped again, which costs as much as the matmul.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, chunk: int,
                with_entropy: bool):
        N, V = hidden.shape[0], weight.shape[0]
        logprobs = hidden.new_empty(N, dtype=torch.float32)
        log_norm = hidden.new_empty(N, dtype=torch.float32)
        entropy = hidden.new_empty(N, dtype=torch.float32) if with_entropy else None
        buffer = hidden.new_empty(min(chunk, N), V, dtype=torch.float32)
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            z = _head_logits_into(buffer, hidden[rows], weight, temperature)  # (n, V) fp32
            picked = z.gather(-1, labels[rows, None]).squeeze(-1)  # (n,)
            peak = z.amax(-1, keepdim=True)  # (n, 1)
            e = z.sub_(peak).exp_()  # (n, V) exp(z - max), in place
            total = e.sum(-1)  # (n,)
            log_norm[rows] = peak.squeeze(-1) + total.log()  # log sum_v exp z_v
            logprobs[rows] = picked - log_norm[rows]
            if with_entropy:  # H = log s - (1/s) sum e log e, with e = exp(z - max) and s = sum e
                entropy[rows] = total.log() + torch.special.entr(e).sum(-1) / total
        ctx.save_for_backward(hidden, weight, labels, log_norm)
        ctx.temperature, ctx.chunk = temperature, chunk
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy: Optional[Tensor] = None):
        hidden, weight, labels, log_norm = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        scale = grad_logprobs.float() / ctx.temperature  # (N,) z = logits / t, so d/d logits carries 1/t
        buffer = hidden.new_empty(min(ctx.chunk, N), V, dtype=torch.float32)
        for start in range(0, N, ctx.chunk):
            rows = slice(start, min(start + ctx.chunk, N))
            g = scale[rows, None]  # (n, 1)
            z = _head_logits_into(buffer, hidden[rows], weight, ctx.temperature)  # (n, V), recomputed
            grad_z = z.sub_(log_norm[rows, None]).exp_().mul_(-g)  # -g * softmax(z), in place
            grad_z.scatter_add_(-1, labels[rows, None], g)  # + g at the label
            h = hidden[rows]
            grad_z = grad_z.to(h.dtype)
            if grad_hidden is not None:
                torch.mm(grad_z, weight.to(h.dtype), out=grad_hidden[rows])  # (n, H)
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.T.float(), h.float())  # (V, H)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _head_logits_into(buffer: Tensor, hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """hidden (n, H) @ weight.T / t written into buffer[:n] (fp32): no new (n, V) allocation on fp32."""
    out = buffer[: hidden.shape[0]]
    if hidden.dtype == weight.dtype == torch.float32:
        torch.mm(hidden, weight.T, out=out)
    else:  # bf16 / fp16: the GEMM in the compute dtype, the statistics in fp32
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        out.copy_(hidden.to(dtype) @ weight.to(dtype).T)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs of `labels` under softmax(hidden @ weight.T / temperature), without the (B, T, V) logits.

    hidden (B, T, H), weight (V, H) (the LM head), labels (B, T) long -> (logprobs (B, T) float32,
    entropy (B, T) float32 or None). Only positions with labels >= 0 are projected onto the vocabulary;
    the others are 0. Differentiable in hidden and weight (the entropy carries no gradient).
    """
    B, T = labels.shape
    scored = labels >= 0  # (B, T)
    chunk = max(16, HEAD_CHUNK_BYTES // (4 * weight.shape[0]))
    logprobs, entropy = _LinearTokenLogprobs.apply(hidden[scored], weight, labels[scored], temperature, chunk,
                                                   return_entropy)  # (n,), (n,)
    logprobs = hidden.new_zeros(B, T, dtype=torch.float32).masked_scatter(scored, logprobs)
    if return_entropy:
        entropy = hidden.new_zeros(B, T, dtype=torch.float32).masked_scatter(scored, entropy)
    return logprobs, entropy


def head_reproduces(logits: Tensor, hidden: Tensor, head: Tensor) -> bool:
    """Whether hidden (B, H) @ head.T gives the model's own logits (B, V): the last hidden state is what the
    head reads (checked on the one position per row the model projected anyway)."""
    tolerance = 1e-3 if logits.dtype == torch.float32 else 5e-2
    with torch.no_grad():
        expected = hidden.to(head.dtype) @ head.T
        return bool(torch.allclose(expected.float(), logits.float(), rtol=tolerance, atol=tolerance))


def plain_lm_head(model: torch.nn.Module) -> Optional[Tensor]:
    """The weight W (V, H) when `model`'s logits are exactly last_hidden @ W.T, else None.

    Looks through DDP / torch.compile / PEFT wrappers. None for heads with a bias, a LoRA-wrapped head,
    or logit scaling / soft-capping in the config (Gemma 2, Cohere, Granite), for models whose forward
    takes no `logits_to_keep`, and for vocabularies under FUSED_HEAD_MIN_VOCAB: those keep the logits path.
    """
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaled = any(getattr(text_config, key, None) for key in ("final_logit_softcapping", "logit_scale",
                                                              "logits_scaling", "output_multiplier"))
    if type(head) is not torch.nn.Linear or head.bias is not None or scaled:
        return None
    if head.weight.shape[0] < FUSED_HEAD_MIN_VOCAB:
        return None
    return head.weight


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... counted from each sequence's first real token: (B, T) -> (B, T) long.

    Left padding then gives the same positions as the unpadded sequence. Pad positions
    get 0 (left) or repeat the last position (right); they are masked anyway.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logprobs(model, forward: Callable, labels: Tensor, temperature: float, chunk_size: int,
                     return_entropy: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs (and entropies) of `labels` (B, T) (-100: not scored, 0 there) from `forward(**kwargs)`,
    the model's forward over the batch the labels belong to."""
    head = plain_lm_head(model)
    if head is not None:
        # The model's own forward (so DDP / FSDP / PEFT hooks run); logits_to_keep=1 projects one position per row.
        out = forward(output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (B, T, H)
        if head_reproduces(out.logits[:, -1], hidden[:, -1], head):
            return linear_token_logprobs(hidden, head, labels, temperature=temperature,
                                         return_entropy=return_entropy)
    logits = forward().logits  # (B, T, V)
    logprobs = token_logprobs(logits, labels, chunk_size=chunk_size, temperature=temperature)
    entropy = None
    if return_entropy:
        entropy = entropy_from_logits(logits, chunk_size=chunk_size, temperature=temperature)
        entropy = torch.where(labels >= 0, entropy, torch.zeros_like(entropy))
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


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, *,
                  mean: Tensor | None = None, var: Tensor | None = None) -> Tensor:
    """(values - mean) / sqrt(var + eps) over masked entries; masked-out entries become 0.

    shift_mean=False adds the mean back (scale only), as in TRL's `masked_whiten`. `mean`/`var` default to
    this batch's masked mean and unbiased variance; `runtime.distributed.whiten` passes every rank's.
    """
    mean = masked_mean(values, mask) if mean is None else mean
    var = masked_var(values, mask) if var is None else var
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
