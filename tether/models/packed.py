"""The padding-free training forward: a batch's rows laid end to end as one sequence, attention kept per row.

A padded batch (B, T) spends its matmuls and elementwise work on the pad positions too: a quarter to a third
of the work for rows of mixed lengths. Here the real tokens of every row are gathered into one row (1, N),
position ids restart at 0 in each row, and attention is computed segment by segment: each segment attends
causally to itself and, optionally, to the whole of one earlier segment, its prefix. A prompt shared by
several rows (GRPO's group of completions, a DPO pair's chosen and rejected responses) is then one segment
that runs once, and each completion is a segment whose prefix it is:

    padded rows (B, T) ──gather real tokens──► (1, N) ──model forward, attention per segment──► (1, N, H)

The model's own forward runs (its modules, so DDP, FSDP and PEFT hooks run as usual); only its attention
function is replaced for the call, through transformers' AttentionInterface. CPU PyTorch has no
variable-length attention kernel, so attention alone runs padded: the segments are gathered into at most two
padded blocks (those without a prefix, and those with one) and each block is one SDPA call; the projections,
MLP and norms run on the N packed tokens only. Hidden states equal the padded forward's within float rounding,
and so do the gradients (tests/test_packed.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

from tether.models import unwrap

ATTENTION = "tether_packed"
# Model families whose attention is plain causal self-attention over rotary positions, computed by the
# attention function the config names: the packed forward reproduces their padded forward exactly.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Layout:
    """Where each segment of the packed sequence (1, N) lies, and the padded blocks attention runs on.

    Segments without a prefix (a row, or a shared prompt) are gathered right-padded into one block (S, L) and
    attend causally (a pad position comes after every real one, so no mask is needed). Segments with a prefix
    are gathered into one block (S', L') of queries whose keys are the prefix, left-padded to Lp, then their
    own tokens: `mask` (S', 1, L', Lp + L') lets query i see the real prefix keys and its own keys 0..i.
    Only attention runs on these padded blocks; everything else runs on the N packed tokens.
      plain (S, L), own (S', L'), prefix (S', Lp): packed positions (pads repeat a real position of the row)
      order (N,): where each packed token's output lies in the blocks' outputs, flattened one after the other
    """

    plain: Tensor | None
    own: Tensor | None
    prefix: Tensor | None
    mask: Tensor | None
    order: Tensor

    @classmethod
    def from_segments(cls, lengths: list[int], prefixes: list[int | None] | None = None, device=None) -> "Layout":
        """Segments of `lengths` laid end to end from token 0; `prefixes[i]`: the earlier segment that segment i
        attends to in full (None: none). Empty segments are skipped."""
        prefixes = prefixes or [None] * len(lengths)
        length = torch.tensor(lengths, dtype=torch.long, device=device)
        start = length.cumsum(0) - length
        prefix_of = torch.tensor([-1 if p is None else p for p in prefixes], dtype=torch.long, device=device)
        real = length > 0
        plain = (real & (prefix_of < 0)).nonzero().squeeze(-1)
        prefixed = (real & (prefix_of >= 0)).nonzero().squeeze(-1)

        def block(segments: Tensor) -> Tensor:  # (S, L) positions of each segment's tokens, right-padded
            offsets = torch.arange(int(length[segments].max()), device=device)
            return start[segments, None] + torch.minimum(offsets[None], length[segments, None] - 1)

        # order: segment s's token j is at row rank[s], column j of its block
        rank = torch.zeros_like(length)
        rank[plain] = torch.arange(len(plain), device=device)
        rank[prefixed] = torch.arange(len(prefixed), device=device)
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), length)  # (N,)
        column = torch.arange(len(segment), device=device) - start[segment]
        plain_block = block(plain) if len(plain) else None
        plain_size = plain_block.numel() if plain_block is not None else 0
        own = prefix = mask = None
        width = 0
        if len(prefixed):
            own = block(prefixed)  # (S', L')
            width = own.shape[1]
            owner = prefix_of[prefixed]  # (S',) the prefix segment of each
            prefix_length = length[owner]
            Lp = int(prefix_length.max())
            pad = Lp - prefix_length  # (S',) left padding of each prefix
            columns = torch.arange(Lp, device=device)
            prefix = start[owner, None] + (columns[None] - pad[:, None]).clamp(min=0)  # (S', Lp)
            sees_prefix = columns[None] >= pad[:, None]  # (S', Lp)
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            mask = torch.cat([sees_prefix[:, None].expand(-1, width, -1), causal.expand(len(prefixed), -1, -1)],
                             dim=-1)[:, None]  # (S', 1, L', Lp + L')
        is_plain = prefix_of[segment] < 0
        block_width = torch.where(is_plain, plain_block.shape[1] if plain_block is not None else 0, width)
        order = torch.where(is_plain, 0, plain_size) + rank[segment] * block_width + column
        return cls(plain_block, own, prefix, mask, order)


def unpack(values: Tensor, index: Tensor, shape) -> Tensor:
    """Per-token values of a packed row (1, N) back to their places in a grid of `shape`: `index` (N,) holds
    their flat indices there; everything else is 0."""
    return values.new_zeros(math.prod(shape)).index_copy(0, index, values[0]).view(shape)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (heads, N, d) at the token indices `index` (S, L) -> (S, heads, L, d). index_select, not x[:, index]:
    its backward is an index_add, about twice as fast on CPU as advanced indexing's accumulating index_put."""
    return x.index_select(1, index.flatten()).unflatten(1, index.shape).transpose(0, 1)


def packed_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function interface, over a packed sequence: query (1, heads, N, d), key and
    value (1, kv_heads, N, d) -> ((1, N, heads, d), None). The layout comes in `tether_layout`: at most two
    SDPA calls per layer, on the padded blocks gathered from the packed tokens."""
    layout: Layout = kwargs["tether_layout"]
    q, k, v = query[0], key[0], value[0]  # (h, N, d)
    gqa = k.shape[0] != q.shape[0]
    outputs = []
    if layout.plain is not None:
        rows = layout.plain
        out = F.scaled_dot_product_attention(_gather(q, rows), _gather(k, rows), _gather(v, rows), is_causal=True,
                                             scale=scaling, dropout_p=dropout, enable_gqa=gqa)  # (S, h, L, d)
        outputs.append(out.transpose(1, 2).flatten(0, 1))  # (S * L, h, d)
    if layout.own is not None:
        own, prefix = layout.own, layout.prefix
        keys = torch.cat([_gather(k, prefix), _gather(k, own)], dim=2)  # (S', kv, Lp + L', d)
        values = torch.cat([_gather(v, prefix), _gather(v, own)], dim=2)
        out = F.scaled_dot_product_attention(_gather(q, own), keys, values, attn_mask=layout.mask,
                                             scale=scaling, dropout_p=dropout, enable_gqa=gqa)  # (S', h, L', d)
        outputs.append(out.transpose(1, 2).flatten(0, 1))
    return torch.cat(outputs).index_select(0, layout.order)[None], None


AttentionInterface.register(ATTENTION, packed_attention)


def unsupported_reason(model, packing: bool = True) -> str | None:
    """Why the packed forward cannot stand in for `model`'s padded forward (None: it can). `packing` is the
    caller's choice (config key `padding_free`), passed down explicitly: False always gives a reason."""
    if not packing:
        return "padding_free is off"
    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):  # PEFT: the adapters sit in the linear layers, attention is the base's
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r} (supported: sdpa, eager)"
    if getattr(config, "use_sliding_window", False) or (model_type == "mistral" and config.sliding_window):
        return "sliding-window attention"
    if getattr(config, "layer_types", None) and set(config.layer_types) != {"full_attention"}:
        return f"layer types {sorted(set(config.layer_types))} (supported: full_attention)"
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if checkpointing:  # the backward re-runs layers outside the call, with the model's own attention
        return "gradient checkpointing"
    return None


@contextlib.contextmanager
def _packed_attention(model):
    """Route `model`'s attention to `packed_attention` for one call. The function itself is registered through
    transformers' public AttentionInterface (above); what selects it is the config's `_attn_implementation`,
    which has no public per-call setter, so it is switched here and restored, and only here (tests/test_packed.py
    `test_packed_attention_is_what_runs` fails if a transformers release stops honouring it)."""
    config = unwrap(model).config
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved


def packed_forward(model, input_ids: Tensor, position_ids: Tensor, layout: Layout, **kwargs):
    """`model`'s forward over one packed row: input_ids, position_ids (1, N). Other arguments are passed on."""
    with _packed_attention(model):
        return model(input_ids=input_ids, position_ids=position_ids, tether_layout=layout, **kwargs)


def pack_rows(attention_mask: Tensor) -> tuple[Tensor, Layout] | None:
    """The real tokens of each row of a padded batch, row after row: (flat indices into (B, T) (N,), layout).
    None when a row's real tokens are not one contiguous run (the packed positions would differ)."""
    lengths = attention_mask.sum(-1)  # (B,)
    first = attention_mask.float().argmax(-1)  # (B,) first real token (0 for an empty row)
    T = attention_mask.shape[1]
    last = T - 1 - attention_mask.flip(-1).float().argmax(-1)
    if bool(((last - first + 1 != lengths) & (lengths > 0)).any()):
        return None
    index = attention_mask.flatten().nonzero().squeeze(-1)  # (N,) row-major: row after row
    return index, Layout.from_segments(lengths.tolist(), device=attention_mask.device)
