"""Lever "faster token drawing": one uniform number per row instead of one exponential per vocabulary entry.

Proposed for tether/rollout/sampler.py (`select_tokens`; diff in docs/benchmarks.md); `apply()` patches a running
tether so the benchmark can measure it.

The exponential race (and torch.multinomial, which is the same race inside) draws V random numbers per row per
step: with V = 152k and 64 rows that is ~10M exponentials, ~0.2 s of one CPU core per generated token, far more
than the model's own forward. Inverse-CDF sampling needs one uniform per row. It is done in two levels so the
prefix sums stay exact: sums of blocks of BLOCK entries (one pass), a float64 prefix sum over the blocks picks
the block, a float64 prefix sum inside that one block picks the token. The passes over (B, V) are: max,
exp(z - max) in place, block sums. Log-probs come from the same pass: log p(y) = z_y - max - log(sum exp(z - max)),
of the full distribution before EOS is banned, as before.

Used when no filter is on (top_k = 0, top_p = 1, min_p = 0) and temperature > 0, the RL default; otherwise the
original `select_tokens` runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 1024


SMALL_VOCAB = 8192  # below this the exponential race is cheaper than the extra small ops here
_WORKSPACE: dict = {}


def _workspace(like: Tensor) -> Tensor:
    """A (B, V) fp32 scratch buffer reused from step to step (a fresh 40 MB tensor each step is page-faulted
    in and unmapped again by the allocator)."""
    key = (tuple(like.shape), like.device)
    if key not in _WORKSPACE:
        _WORKSPACE.clear()
        _WORKSPACE[key] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return _WORKSPACE[key]


def select_tokens(logits: Tensor, params, generator: torch.Generator, banned_ids: Tensor | None = None):
    """Same contract as tether.rollout.sampler.select_tokens: logits (B, V) -> (tokens (B,), logprobs (B,))."""
    if (params.temperature == 0 or params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0
            or logits.shape[-1] < SMALL_VOCAB):
        return ORIGINAL["select_tokens"](logits, params, generator, banned_ids)
    return inverse_cdf_draw(logits, params.temperature, generator, banned_ids)


def inverse_cdf_draw(logits: Tensor, temperature: float, generator: torch.Generator,
                     banned_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    B, V = logits.shape
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature  # (B, V)
    peak = z.amax(-1, keepdim=True)  # (B, 1)
    weights = torch.sub(z, peak, out=_workspace(z)).exp_()  # (B, V) exp(z - max), into a reused buffer
    full = V // BLOCK
    block_sums = weights[:, : full * BLOCK].view(B, full, BLOCK).sum(-1).double()  # (B, full)
    if full * BLOCK < V:  # the last, shorter block
        block_sums = torch.cat([block_sums, weights[:, full * BLOCK:].sum(-1, keepdim=True).double()], -1)
    blocks = block_sums.shape[1]
    log_norm = peak.squeeze(-1).double() + block_sums.sum(-1).log()  # (B,) full distribution, before banning
    if banned_ids is not None and len(banned_ids):
        banned_weights = weights[:, banned_ids]  # (B, k)
        block_sums.index_add_(1, banned_ids // BLOCK, -banned_weights.double())
        weights[:, banned_ids] = 0.0
        block_sums.clamp_(min=0.0)
    # Level 1: the block. u in [0, total); the first block whose running sum exceeds u.
    prefix = block_sums.cumsum(-1)  # (B, blocks) float64
    u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=z.device) * prefix[:, -1:]
    block = torch.searchsorted(prefix, u, right=True).clamp_(max=blocks - 1)  # (B, 1)
    before = torch.where(block > 0, prefix.gather(-1, (block - 1).clamp(min=0)), 0.0)  # mass of earlier blocks
    # Level 2: the token inside the block.
    start = block * BLOCK  # (B, 1)
    index = start + torch.arange(BLOCK, device=z.device)  # (B, BLOCK); the last block may end before BLOCK
    inside = weights.gather(-1, index.clamp(max=V - 1)).double().masked_fill_(index >= V, 0.0).cumsum(-1)
    offset = torch.searchsorted(inside, u - before, right=True).clamp_(max=BLOCK - 1)  # (B, 1)
    # Never land on a zero-weight entry (banned, padding) through rounding at the block's end.
    offset = torch.minimum(offset, (inside < inside[:, -1:]).sum(-1, keepdim=True).clamp(max=BLOCK - 1))
    tokens = (start + offset).squeeze(-1).clamp_(max=V - 1)  # (B,)
    logprobs = (z.gather(-1, tokens[:, None]).squeeze(-1).double() - log_norm).float()
    return tokens, logprobs


ORIGINAL = {}


def apply() -> None:
    from tether.rollout import sampler

    ORIGINAL.setdefault("select_tokens", sampler.select_tokens)
    sampler.select_tokens = select_tokens
