"""Lever "chunked log-probs": per-token log-probs from the last hidden states, never holding the (N, V) logits.

Proposed for tether/ops.py and tether/recipes/online.py (diff in docs/benchmarks.md); `apply()` patches a
running tether with it so the benchmark can measure it. Pure torch.

Why it is faster on CPU, not only smaller: a (rows, V) fp32 temporary above glibc's mmap threshold (32 MB at
most) is a fresh mmap, so every large logits tensor is page-faulted in and unmapped again, pass after pass
(logits, float copy, log-softmax, its gradient, ...). Here one (chunk, V) buffer is allocated per call and every
pass over it is in place: matmul into it, subtract, exp, scale; the gradient GEMMs read it where it lies.
Positions whose target is ignored (prompt tokens, padding) are never projected at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of logits per chunk: ~64 MB of fp32 logits, so V = 152k gives 110 rows and V = 32k gives 512.
CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab_size: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab_size))


class LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / t)[label] per row, `chunk` rows of logits at a time.

    hidden (N, H), weight (V, H), labels (N,) long (all valid) -> logprobs (N,) float32 and, with
    `with_entropy`, entropy (N,) float32 (no gradient). The forward keeps only each row's log-normaliser;
    the backward recomputes a chunk's logits and turns them into their gradient in place:
    d logp_y / d z = onehot(y) - softmax(z).
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
            z = _logits_into(buffer, hidden[rows], weight, temperature)  # (n, V) fp32
            picked = z.gather(-1, labels[rows, None]).squeeze(-1)  # (n,)
            peak = z.amax(-1, keepdim=True)  # (n, 1)
            e = z.sub_(peak).exp_()  # (n, V) exp(z - max), in place
            total = e.sum(-1)  # (n,)
            lse = peak.squeeze(-1) + total.log()  # log sum exp z
            logprobs[rows] = picked - lse
            log_norm[rows] = lse
            if with_entropy:  # H = log s - (1/s) sum e log e  with e = exp(z - max), s = sum e
                entropy[rows] = total.log() + torch.special.entr(e).sum(-1) / total
        ctx.save_for_backward(hidden, weight, labels, log_norm)
        ctx.temperature, ctx.chunk = temperature, chunk
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy=None):
        hidden, weight, labels, log_norm = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        N, V = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        g_all = grad_logprobs.float() / t  # (N,) d loss / d z also carries the 1/t of z = logits / t
        buffer = hidden.new_empty(min(chunk, N), V, dtype=torch.float32)
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            g = g_all[rows, None]  # (n, 1)
            z = _logits_into(buffer, hidden[rows], weight, t)  # (n, V), recomputed
            grad_z = z.sub_(log_norm[rows, None]).exp_().mul_(-g)  # -g softmax(z), in place
            grad_z.scatter_add_(-1, labels[rows, None], g)  # + g at the label
            h = hidden[rows]
            if grad_z.dtype != h.dtype:
                grad_z = grad_z.to(h.dtype)
            if grad_hidden is not None:
                torch.mm(grad_z, weight.to(h.dtype), out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.T.float(), h.float())
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _logits_into(buffer: Tensor, hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """hidden (n, H) @ weight.T / t written into buffer[:n] (fp32), without a new (n, V) allocation."""
    out = buffer[: hidden.shape[0]]
    if hidden.dtype == weight.dtype == torch.float32:
        torch.mm(hidden, weight.T, out=out)
    else:  # bf16 / fp16 (CUDA): GEMM in the compute dtype, statistics in fp32
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        out.copy_(hidden.to(dtype) @ weight.to(dtype).T)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, temperature: float = 1.0,
                          chunk: int | None = None, with_entropy: bool = False):
    """Per-token log-probs of `labels` under softmax(hidden @ weight.T / t), only where labels >= 0.

    hidden (B, T, H), weight (V, H), labels (B, T) long, negative = not scored -> logprobs (B, T) float32
    (0 where not scored) and entropy (B, T) float32 or None (no gradient). Differentiable in hidden and weight.
    """
    B, T = labels.shape
    scored = labels >= 0  # (B, T)
    rows = hidden[scored]  # (n, H): only the scored positions are projected onto the vocabulary
    chunk = chunk or chunk_rows(weight.shape[0])
    logprobs, entropy = LinearTokenLogprobs.apply(rows, weight, labels[scored], temperature, chunk, with_entropy)
    out = hidden.new_zeros(B, T, dtype=torch.float32).masked_scatter(scored, logprobs)
    if with_entropy:
        entropy = hidden.new_zeros(B, T, dtype=torch.float32).masked_scatter(scored, entropy)
    return out, entropy


def plain_head(model):
    """The LM head weight (V, H) if the logits are exactly hidden @ weight.T, else None (then: full logits)."""
    from tether.models import unwrap

    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None or type(head) is not torch.nn.Linear
            or getattr(text_config, "final_logit_softcapping", None) or getattr(text_config, "logit_scale", None)
            or getattr(text_config, "logits_scaling", None)):
        return None
    return head.weight


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Last hidden states (B, T, H), through the model's own forward (so DDP / FSDP / PEFT hooks run);
    `logits_to_keep=1` makes the head project one position per row instead of all of them."""
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                **kwargs)
    return out.hidden_states[-1]


# ----------------------------------------------------------------------------- drop-ins for tether


def model_token_logprobs(model, input_ids, attention_mask, *, temperature: float = 1.0, chunk_size: int = 1024,
                         return_entropy: bool = False, target_mask=None):
    """tether.ops.model_token_logprobs with the fused head; `target_mask` (B, T-1) limits which targets are
    scored (the others are 0), e.g. the loss mask, so prompt positions are never projected."""
    from tether import ops

    weight = plain_head(model)
    if weight is None:
        return ORIGINAL["model_token_logprobs"](model, input_ids, attention_mask, temperature=temperature,
                                                chunk_size=chunk_size, return_entropy=return_entropy)
    position_ids = ops.position_ids_from_mask(attention_mask) if bool((attention_mask[:, 0] == 0).any()) else None
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)  # (B, T, H)
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # (B, T-1)
    if target_mask is not None:
        keep &= target_mask.bool()
    labels = torch.full_like(input_ids, -100)  # (B, T): position t scores token t+1
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~keep, -100)
    logprobs, entropy = linear_token_logprobs(hidden, weight, labels, temperature=temperature,
                                              with_entropy=return_entropy)
    return logprobs[:, :-1], (entropy[:, :-1] if return_entropy else None)


def completion_forward(model, batch, *, temperature: float = 1.0, entropy: bool = False, entropy_grad: bool = False,
                       value_head=None):
    """tether.recipes.online.completion_forward with the fused head (completion positions only)."""
    weight = plain_head(model)
    if weight is None or entropy_grad or value_head is not None:
        return ORIGINAL["completion_forward"](model, batch, temperature=temperature, entropy=entropy,
                                              entropy_grad=entropy_grad, value_head=value_head)
    from tether.ops import position_ids_from_mask

    P = batch["prompt_length"]
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (n, P+C)
    hidden = hidden_states(model, input_ids, attention_mask, position_ids_from_mask(attention_mask))
    labels = input_ids[:, P:].masked_fill(batch["completion_mask"] == 0, -100)  # (n, C)
    logprobs, token_entropy = linear_token_logprobs(hidden[:, P - 1:-1], weight, labels, temperature=temperature,
                                                    with_entropy=entropy)
    return logprobs, token_entropy, None


ORIGINAL = {}


def apply() -> None:
    """Patch a running tether: recipes call these instead of the logits-based versions."""
    import importlib

    from tether import ops

    ORIGINAL.setdefault("model_token_logprobs", ops.model_token_logprobs)
    for name in ("tether.recipes.sft", "tether.recipes.dpo"):
        module = importlib.import_module(name)
        module.model_token_logprobs = model_token_logprobs
    online = importlib.import_module("tether.recipes.online")
    ORIGINAL.setdefault("completion_forward", online.completion_forward)
    for name in ("tether.recipes.online", "tether.recipes.grpo", "tether.recipes.ppo"):
        module = importlib.import_module(name)
        module.completion_forward = completion_forward
