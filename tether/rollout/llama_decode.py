"""A lean decode step for Llama-family models (Llama, Mistral, Qwen2): the built-in sampler's fast path.

On a small model a decode step through the Hugging Face modules is mostly Python and dispatch: ~45 tensor ops
and ~60 module calls per layer for one token per row (by cProfile, under half of the step is the matmuls,
attention and cache). `LlamaDecoder` runs the same arithmetic as a plain function over the model's own weights,
~15 ops per layer:

    x = rms_norm(h)                      q, k, v = x @ W_qkv.T      (q, k, v fused, 1/sqrt(d) folded into W_q)
    q, k = rotary(q, k)                  one complex multiply (head dims of W_q, W_k permuted to interleaved
                                         pairs: q·k is unchanged by a permutation applied to both)
    K[..., t], V[..., t] = k, v          preallocated cache, written in place
    h = h + softmax(q K.T + mask) V @ W_o.T
    h = h + (silu(x W_g.T) * x W_u.T) @ W_d.T   with x = rms_norm(h); gate and up fused

The n samples of a prompt attend over one copy of its keys and values (`_attend_grouped`): the prompt part of
the attention is one matmul per prompt with n times the query rows, read from memory once, and only the
completion part is per sample. On CPU the attention of a step (cache reads, scores, softmax, weighted sum)
is one call into a small C kernel (`decode_attention.c`, compiled on first use by `native.py`): in PyTorch it
is ~12 ops per layer over 2-row matrices, and dispatch, not arithmetic, set its cost. The PyTorch version
stays as the fallback and the reference. The prefill still runs the model's own forward (once per chunk of prompts); its
cache is copied in. Results equal the Hugging Face forward within float rounding (tests/test_llama_decode.py);
`unsupported_reason` names anything this path does not reproduce exactly, and the sampler then keeps the
model's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tether.rollout import native
from tether.rollout.native import padded

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies depend only on the config (a table of positions reproduces them). "dynamic"
# and "longrope" change their frequencies with the sequence length as it grows: those keep the model's forward.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Extra memory the weight copies may take (every projection, transposed, q/k/v and gate/up side by side). The
# path is for models whose steps are dominated by per-op overhead; above this the matmuls dominate and the
# copies would cost memory.
MAX_COPY_BYTES = 256 * 2**20


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def unsupported_reason(model, max_length: int | None = None) -> str | None:
    """Why `LlamaDecoder` cannot reproduce `model`'s forward (None: it can), for sequences up to `max_length`."""
    if hasattr(model, "get_base_model"):
        return "a PEFT-wrapped model (adapter layers are not plain linear layers)"
    config = _text_config(model)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or type(getattr(body, "embed_tokens", None)) is not nn.Embedding:
        return "not the usual <Model>ForCausalLM layout (model.embed_tokens, model.layers)"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} (supported: silu)"
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} (its frequencies change with the length; supported: {STATIC_ROPE_TYPES})"
    window = getattr(config, "sliding_window", None)
    sliding = config.model_type == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if window is not None and sliding and (max_length is None or max_length > window):
        return f"sliding-window attention (window {window}) shorter than the sequences ({max_length} tokens)"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return "an LM head that is not a plain bias-free linear layer"
    if any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return "scaled or soft-capped logits"
    copies = 0  # bytes of the transposed weight copies
    for index, layer in enumerate(layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if any(type(p) is not nn.Linear for p in projections):
            return f"layer {index}: a projection that is not a plain linear layer (adapter, quantized, ...)"
        if any(p.bias is not None for p in projections[3:]):
            return f"layer {index}: a bias on o_proj or the MLP"
        if len({p.bias is None for p in projections[:3]}) > 1:
            return f"layer {index}: biases on some of q/k/v only"
        copies += sum(p.weight.numel() * p.weight.element_size() for p in projections)
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if any(not type(n).__name__.endswith("RMSNorm") or not hasattr(n, "variance_epsilon") for n in norms):
            return f"layer {index}: norm layers other than the family's RMSNorm"
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        return f"parameters in {sorted(map(str, dtypes))} (the fast path is verified in float32 only)"
    if copies > MAX_COPY_BYTES:
        return f"a model whose weight copies would take {copies / 2**20:.0f} MB (> {MAX_COPY_BYTES / 2**20:.0f})"
    return None


def rotary_pair_order(head_dim: int) -> Tensor:
    """Rotary embedding pairs dims (i, i + d/2) of a head: the order (0, d/2, 1, d/2 + 1, ...) puts each pair
    side by side. Applied to the q and k weights, and to the keys of a cache computed with the original order
    (q·k is unchanged when both are permuted alike)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], -1).flatten()  # (d,)


class _Layer:
    """One decoder layer's weights, laid out for the lean step, and its slice of the KV cache."""

    def __init__(self, layer, num_heads: int, num_kv_heads: int, head_dim: int):
        attention, mlp = layer.self_attn, layer.mlp
        # Reorder each q and k head to rotary pairs (`rotary_pair_order`) so the rotation is one complex multiply.
        # V keeps its order (the output projection reads it).
        order = rotary_pair_order(head_dim)
        scale = head_dim ** -0.5  # the attention's 1/sqrt(d), applied to q once here

        def heads_reordered(weight: Tensor, heads: int) -> Tensor:  # (heads*d, ...) -> same, dims reordered
            return weight.view(heads, head_dim, *weight.shape[1:])[:, order].reshape(weight.shape)

        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        # Every weight is stored transposed and contiguous, (in, out): a decode step multiplies a few rows by it,
        # and on CPU that matmul is ~15% faster with the weight laid out row by row of its input
        # (docs/benchmarks.md, session 6).
        qkv_weight = torch.cat([heads_reordered(q.weight.detach(), num_heads) * scale,
                                heads_reordered(k.weight.detach(), num_kv_heads), v.weight.detach()])
        self.qkv_weight_t = qkv_weight.T.contiguous()  # (H, (heads + 2 kv_heads) d)
        self.qkv_bias = None
        if q.bias is not None:
            self.qkv_bias = torch.cat([heads_reordered(q.bias.detach(), num_heads) * scale,
                                       heads_reordered(k.bias.detach(), num_kv_heads), v.bias.detach()])
        self.o_weight_t = attention.o_proj.weight.detach().T.contiguous()  # (heads*d, H)
        self.gate_up_weight_t = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]).T.contiguous()
        self.down_weight_t = mlp.down_proj.weight.detach().T.contiguous()  # (I, H)
        self.input_norm = (layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon)
        self.post_norm = (layer.post_attention_layernorm.weight.detach(),
                          layer.post_attention_layernorm.variance_epsilon)
        # Keys then values, set by `LlamaDecoder.load_cache` (`split_cache` gives the two views): the prompts'
        # (2, U, kv_heads, P' d) and the completions' (2, U, kv_heads, n, T' d); once rows are dropped, one
        # (2, B, kv_heads, T'' d) per sample. Lengths are padded to the native kernel's key block (16).
        self.prompt = self.cache = None


def split_cache(cache: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """A cache block (2, ..., T * d) as views: keys transposed (..., d, T) and values (..., T, d).

    Keys are kept transposed so that a query's scores over them are one row of a matmul, and the native
    kernel reads 16 keys at a time as contiguous columns."""
    return cache[0].unflatten(-1, (head_dim, -1)), cache[1].unflatten(-1, (-1, head_dim))


class LlamaDecoder:
    """Decode steps of a Llama-family model over a preallocated KV cache; one token per row per step.

        decoder = LlamaDecoder(model, max_length)            # after unsupported_reason(model, max_length) is None
        decoder.load_cache(prefill_cache, attention_mask, repeats=n)
        logits = decoder.step(tokens, positions)             # (B,), (B,) -> (B, V); the cache grows by one

    `attention_mask` (B, max_length) marks the real positions of every row (left padding 0, the rest 1).
    The weights are read (and copied, transposed) at construction: build one per `generate` call.
    """

    def __init__(self, model, max_length: int, native_attention: bool = True):
        config = _text_config(model)
        body = model.model
        attention = body.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attention.q_proj.weight.shape[0] // self.num_heads
        self.hidden_size = config.hidden_size
        self.intermediate_size = body.layers[0].mlp.gate_proj.weight.shape[0]
        self.max_length = max_length
        self.embed = body.embed_tokens.weight.detach()
        self.final_norm = (body.norm.weight.detach(), body.norm.variance_epsilon)
        self.head = model.get_output_embeddings().weight.detach()
        self.layers = [_Layer(layer, self.num_heads, self.num_kv_heads, self.head_dim) for layer in body.layers]
        self.rotation = self._rotation_table(body.rotary_emb, max_length)  # (T_max, heads + 2 kv_heads, d/2)
        self.length = 0  # positions in the cache
        # The fused C attention (`native.py`) on CPU float32 when it compiled; else the same in PyTorch ops.
        self.native = (native_attention and self.embed.device.type == "cpu" and native.supports(self.head_dim)
                       and native.library() is not None)

    def _rotation_table(self, rotary_emb, max_length: int) -> Tensor:
        """cos + i sin of every position, from the model's own rotary module (so every static RoPE scaling
        and its attention factor are included), per head of the fused qkv: 1 for the value heads."""
        device = self.embed.device
        positions = torch.arange(max_length, device=device)[None]  # (1, T_max)
        cos, sin = rotary_emb(self.embed[:1, None], positions)  # (1, T_max, d) each, halves repeated
        half = self.head_dim // 2
        rotation = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())  # (T_max, d/2)
        heads = self.num_heads + self.num_kv_heads
        table = torch.ones(max_length, heads + self.num_kv_heads, half, dtype=rotation.dtype, device=device)
        table[:, :heads] = rotation[:, None]
        return table

    def load_cache(self, cache, attention_mask: Tensor, repeats: int = 1) -> None:
        """Copy a Hugging Face prefill cache (U rows) in, each row repeated `repeats` times (B = U * repeats).

        attention_mask (B, max_length): 1 on real tokens, including every position still to be generated.
        With repeats > 1 the prompt's keys and values are kept once per prompt (`_attend_grouped`)."""
        order = rotary_pair_order(self.head_dim)
        self.attention_mask, self.repeats = attention_mask, repeats
        for layer, cached in zip(self.layers, cache.layers):
            keys, values = cached.keys, cached.values  # (U, kv_heads, P, d)
            U, kv_heads, P, d = keys.shape
            layer.prompt = keys.new_zeros(2, U, kv_heads, padded(P) * d)
            prompt_keys, prompt_values = split_cache(layer.prompt, d)
            prompt_keys[..., :P] = keys[..., order.to(keys.device)].transpose(-1, -2)
            prompt_values[..., :P, :] = values
            layer.cache = keys.new_zeros(2, U, kv_heads, repeats, padded(self.max_length - P) * d)  # per sample
        self.groups, self.prompt_length = U, P
        self.length = P
        self.grouped = True
        prompt_mask = attention_mask[::repeats, :P]  # (U, P)
        self.prompt_bias = torch.zeros(prompt_mask.shape, dtype=keys.dtype, device=prompt_mask.device).masked_fill_(
            prompt_mask == 0, float("-inf"))  # (U, P)
        G = self.num_heads // self.num_kv_heads
        self.scratch = keys.new_empty(repeats * G * self.max_length)  # the native kernel's scores
        if repeats == 1:  # nothing to share
            self._flatten()

    def _flatten(self) -> None:
        """One cache row per sample (2, B, kv_heads, T * d), prompt and completion together, for row dropping."""
        U, n, P, c = self.groups, self.repeats, self.prompt_length, self.length - self.prompt_length
        kv_heads, d = self.num_kv_heads, self.head_dim
        for layer in self.layers:
            cache = layer.prompt.new_zeros(2, U * n, kv_heads, padded(self.max_length) * d)
            keys, values = split_cache(cache, d)  # (B, kv_heads, d, T), (B, kv_heads, T, d)
            prompt_keys, prompt_values = split_cache(layer.prompt, d)  # (U, kv_heads, d, P'), (U, kv_heads, P', d)
            own_keys, own_values = split_cache(layer.cache, d)  # (U, kv_heads, n, d, T'), (U, kv_heads, n, T', d)
            keys[..., :P] = prompt_keys[..., :P].repeat_interleave(n, dim=0)
            values[..., :P, :] = prompt_values[..., :P, :].repeat_interleave(n, dim=0)
            keys[..., P:P + c] = own_keys[..., :c].transpose(1, 2).reshape(U * n, kv_heads, d, c)
            values[..., P:P + c, :] = own_values[..., :c, :].transpose(1, 2).reshape(U * n, kv_heads, c, d)
            layer.cache, layer.prompt = cache, None
        bias = torch.zeros(self.attention_mask.shape, dtype=self.prompt_bias.dtype, device=self.attention_mask.device)
        self.mask_bias = bias.masked_fill_(self.attention_mask == 0, float("-inf"))  # (B, T_max)
        self.grouped = False

    def select(self, keep: Tensor) -> None:
        """Keep only the rows `keep` (B',) of the batch."""
        if self.grouped:
            self._flatten()
        for layer in self.layers:
            layer.cache = layer.cache[:, keep]
        self.mask_bias = self.mask_bias[keep]

    def _attend_flat(self, cache: Tensor, qkv: Tensor, t: int) -> Tensor:
        """Attention of one new token per row over its cache row: cache (2, B, kv_heads, T * d), qkv (B, heads
        + 2 kv_heads, d) rotated -> (B, heads * d)."""
        B, heads, kv_heads, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.native:  # the cache write included
            return native.decode_attention(qkv, cache, t + 1, self.mask_bias, None, 0, heads, kv_heads, d,
                                           self.scratch)
        keys, values = split_cache(cache, d)  # (B, kv_heads, d, T), (B, kv_heads, T, d)
        new = qkv[:, heads:].view(B, 2, kv_heads, d)
        keys[..., t], values[..., t, :] = new[:, 0], new[:, 1]
        q = qkv[:, :heads].view(B, kv_heads, heads // kv_heads, d)  # (B, kv_heads, G, d): GQA groups
        scores = torch.matmul(q, keys[..., :t + 1])  # (B, kv_heads, G, T)
        probs = torch.softmax(scores.add_(self.mask_bias[:, None, None, :t + 1]), dim=-1)
        return torch.matmul(probs, values[..., :t + 1, :]).view(B, heads * d)  # (B, kv_heads, G, d) flattened

    def _attend_grouped(self, layer: _Layer, qkv: Tensor, t: int) -> Tensor:
        """The same, with the n samples of a prompt reading its keys and values as one batch (prompt-shared, or
        cascade, attention): the prompt part is one matmul per prompt with n·G query rows instead of n matmuls
        of G rows, and it is read from memory once. qkv (B, ...) rows are prompt-major: b = u * n + j."""
        U, n, P = self.groups, self.repeats, self.prompt_length
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        G, c = heads // kv_heads, t - P + 1  # c: completion positions in the cache, this token included
        if self.native:  # the cache write included
            return native.decode_attention(qkv, layer.prompt, P, self.prompt_bias, layer.cache, c, heads, kv_heads,
                                           d, self.scratch)
        keys, values = split_cache(layer.cache, d)  # (U, kv_heads, n, d, T'), (U, kv_heads, n, T', d)
        new = qkv[:, heads:].view(U, n, 2, kv_heads, d).transpose(1, 3)  # (U, kv_heads, 2, n, d)
        keys[..., t - P], values[..., t - P, :] = new[:, :, 0], new[:, :, 1]
        prompt_keys, prompt_values = split_cache(layer.prompt, d)  # (U, kv_heads, d, P'), (U, kv_heads, P', d)
        q = qkv[:, :heads].view(U, n, kv_heads, G, d).transpose(1, 2).contiguous()  # (U, kv_heads, n, G, d)
        prompt_scores = torch.matmul(q.view(U, kv_heads, n * G, d), prompt_keys[..., :P])
        prompt_scores.add_(self.prompt_bias[:, None, None])  # (U, kv_heads, n G, P)
        own_scores = torch.matmul(q, keys[..., :c])  # (U, kv_heads, n, G, c)
        probs = torch.softmax(torch.cat([prompt_scores.view(U, kv_heads, n, G, P), own_scores], -1), dim=-1)
        attended = torch.matmul(probs[..., P:], values[..., :c, :])  # (U, kv_heads, n, G, d)
        attended += torch.matmul(probs[..., :P].reshape(U, kv_heads, n * G, P),
                                 prompt_values[..., :P, :]).view(attended.shape)
        return attended.transpose(1, 2).reshape(U * n, heads * d)  # rows u * n + j, heads kv * G + g

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Feed one token per row at its rotary position: tokens, positions (B,) long -> logits (B, V)."""
        B, d = tokens.shape[0], self.head_dim
        H, I = self.hidden_size, self.intermediate_size
        t = self.length  # the cache slot this token fills
        self.length = t + 1
        rotation = self.rotation[positions]  # (B, heads + 2 kv_heads, d/2)
        h = F.embedding(tokens, self.embed)  # (B, H)
        for layer in self.layers:
            x = F.rms_norm(h, (H,), *layer.input_norm)
            if layer.qkv_bias is None:
                qkv = x @ layer.qkv_weight_t
            else:
                qkv = torch.addmm(layer.qkv_bias, x, layer.qkv_weight_t)
            qkv = qkv.view(B, -1, d // 2, 2)  # (B, heads + 2 kv_heads, d/2, 2)
            qkv = torch.view_as_real(torch.view_as_complex(qkv) * rotation).view(B, -1, d)  # rotary on q and k
            if self.grouped:
                attended = self._attend_grouped(layer, qkv, t)
            else:
                attended = self._attend_flat(layer.cache, qkv, t)
            h = torch.addmm(h, attended, layer.o_weight_t)  # h + o_proj(attention)
            x = F.rms_norm(h, (H,), *layer.post_norm)
            gate_up = x @ layer.gate_up_weight_t  # (B, 2 I)
            h = torch.addmm(h, F.silu(gate_up[:, :I]).mul_(gate_up[:, I:]), layer.down_weight_t)  # h + MLP
        h = F.rms_norm(h, (H,), *self.final_norm)
        return F.linear(h, self.head)  # (B, V)
