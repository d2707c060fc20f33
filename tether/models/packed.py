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
variable-length attention kernel: each run of consecutive segments with one length and one prefix is one
batched SDPA call. Hidden states equal the padded forward's within float rounding, and so do the gradients
(tests/test_packed.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

from tether.models import unwrap

ATTENTION = "tether_packed"
# Model families whose attention is plain causal self-attention over rotary positions, computed by the
# attention function the config names: the packed forward reproduces their padded forward exactly.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_enabled = True  # config key padding_free (set by Run for the whole process)


def set_enabled(on: bool) -> None:
    """Turn the packed forward on or off for every model in this process (config key `padding_free`)."""
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def enabled(on: bool):
    """`set_enabled(on)` for the duration of a `with` block."""
    saved = _enabled
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(saved)


@dataclass
class Run:
    """`count` consecutive segments of `length` tokens from token `start`, each attending causally to itself after
    the `prefix_length` tokens of a prefix (0: none), which starts at token `prefix_offset` of run `prefix_run`."""

    start: int
    count: int
    length: int
    prefix_length: int = 0
    prefix_run: int = 0
    prefix_offset: int = 0


@dataclass
class Layout:
    """How the packed sequence (1, N) splits into segments: runs in order, covering 0 .. N-1."""

    runs: list[Run]
    masks: dict = field(default_factory=dict)  # (prefix_length, length) -> (length, prefix_length + length) bool

    @classmethod
    def from_segments(cls, lengths: list[int], prefixes: list[int | None] | None = None) -> "Layout":
        """Segments of `lengths` laid end to end from token 0; `prefixes[i]`: the earlier segment that segment i
        attends to in full (None: none). Consecutive segments of one length and one prefix share a run."""
        prefixes = prefixes or [None] * len(lengths)
        runs, start, where = [], 0, {}  # where: segment -> (its run, its offset in the run)
        for segment, (length, prefix) in enumerate(zip(lengths, prefixes)):
            if length == 0:
                continue
            prefix_length = lengths[prefix] if prefix is not None else 0
            prefix_run, prefix_offset = where[prefix] if prefix is not None else (0, 0)
            last = runs[-1] if runs else None
            if last and (last.length, last.prefix_length, last.prefix_run, last.prefix_offset) == (
                    length, prefix_length, prefix_run, prefix_offset):
                last.count += 1
            else:
                runs.append(Run(start, 1, length, prefix_length, prefix_run, prefix_offset))
            where[segment] = (len(runs) - 1, start - runs[-1].start)
            start += length
        return cls(runs)

    def mask(self, prefix_length: int, length: int, device) -> Tensor:
        """Query i of a segment sees the whole prefix and its own keys 0..i: causal, aligned bottom-right."""
        key = (prefix_length, length)
        if key not in self.masks:
            keys = torch.arange(prefix_length + length, device=device)
            self.masks[key] = keys[None] <= torch.arange(length, device=device)[:, None] + prefix_length
        return self.masks[key]


def packed_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function interface, over a packed sequence: query (1, heads, N, d), key and
    value (1, kv_heads, N, d) -> ((1, N, heads, d), None). The layout comes in `tether_layout`.

    The sequence is split run by run (one split: its backward is one concatenation, where slicing would add
    a zero-filled full-size gradient per slice)."""
    layout: Layout = kwargs["tether_layout"]
    sizes = [run.count * run.length for run in layout.runs]
    queries, keys, values = (x[0].split(sizes, dim=1) for x in (query, key, value))  # per run (h, count * len, d)
    outputs = []
    for run, q, k, v in zip(layout.runs, queries, keys, values):
        q, k, v = (x.unflatten(1, (run.count, run.length)).transpose(0, 1) for x in (q, k, v))  # (count, h, len, d)
        mask = None
        if run.prefix_length:
            prefix = slice(run.prefix_offset, run.prefix_offset + run.prefix_length)
            k = torch.cat([keys[run.prefix_run][None, :, prefix].expand(run.count, -1, -1, -1), k], dim=2)
            v = torch.cat([values[run.prefix_run][None, :, prefix].expand(run.count, -1, -1, -1), v], dim=2)
            mask = layout.mask(run.prefix_length, run.length, query.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                             dropout_p=dropout, enable_gqa=k.shape[1] != q.shape[1])
        outputs.append(out.transpose(1, 2).flatten(0, 1))  # (count * length, heads, d)
    return torch.cat(outputs)[None], None


AttentionInterface.register(ATTENTION, packed_attention)


def unsupported_reason(model) -> str | None:
    """Why the packed forward cannot stand in for `model`'s padded forward (None: it can)."""
    if not _enabled:
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
    return index, Layout.from_segments(lengths.tolist())
