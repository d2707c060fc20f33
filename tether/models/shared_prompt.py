"""The training forward over prompt + completion rows with each distinct prompt encoded once.

GRPO's G completions of a prompt share it, and so do a DPO pair's chosen and rejected responses, yet a plain
forward over (prompt + completion) rows runs every prompt once per row. Here the distinct prompts run once.
Two ways, the first where the model allows it:

- packed (`tether.models.packed`): one sequence of every distinct prompt's tokens, then every completion's,
  no padding anywhere; each completion attends to its prompt's segment and to itself:

    [prompt 0][prompt 1]...[completion 0 | prompt 0][completion 1 | prompt 0]...  ──one forward──►

- cached: the prompts run with gradients into a KV cache; each row gathers its prompt's keys and values and
  its completion runs against them:

    prompts (U, P) ──forward──► KV cache (U, ...) ──gather rows──► (n, ...) ──forward completions (n, C)──►

Log-probs and entropies equal the plain forward's within float rounding, and so do the gradients: autograd sums
a shared prompt's gradient over the rows that read it, as the plain forward sums it over the copies
(tests/test_shared_prompt.py). Columns that are padding in every row of the batch are not computed, nor is
the last completion token (it is only ever a target).

Batches use the layout of `RolloutBatch.to_tensors` (`tether.data.batching.collate_prompt_completion` builds it):
  input_ids, attention_mask (n, P+C): prompt left-padded to P, completion right-padded to C
  completion_mask (n, C), prompt_index (n,) (rows with the same index hold the same prompt), prompt_length P.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor
from transformers import DynamicCache

from tether.models import cache_kwargs, is_fsdp, packed, unwrap
from tether.ops import (entropy_from_logits, head_reproduces, linear_token_logprobs, plain_lm_head,
                        position_ids_from_mask, token_logprobs)


NO_POSITIONS = torch.empty(0, dtype=torch.long)  # logits_to_keep for a pass whose hidden states are all it needs


def shares_prompts(model, prompt_index: Tensor, *, packing: bool = True) -> bool:
    """Whether sharing applies: some prompt occurs in more than one row, and either the packed forward applies
    (`packing`, config key `padding_free`, and a supported model) or the model's forward can take a cache with gradients (not under gradient
    checkpointing, which turns the cache off, nor under FSDP)."""
    if len(prompt_index) <= 1 or int(torch.unique(prompt_index).numel()) == len(prompt_index):
        return False
    if packed.unsupported_reason(model, packing) is None:
        return True
    inner = unwrap(model)
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # transformers >= 5.x; older: the other
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    return not checkpointing and not is_fsdp(model)


def completion_states(model, batch: dict, *, hidden: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """What predicts each completion token, each distinct prompt computed once.

    Returns (states, last_prompt):
      states       (n, C', V): the logits at positions P-1 .. P+C'-2, each predicting the next completion token
                   (C' = the longest completion in the batch, <= C); with `hidden`, the last hidden states there
                   (n, C', H). What `model(input_ids, attention_mask)` gives at those positions.
      last_prompt  (hidden state (U, H), the model's own logits (U, V)) at each distinct prompt's last position,
                   to check an LM head against.
    Differentiable. Under DDP the prompt pass runs on the wrapped module, so each backward follows one DDP forward.
    """
    P, input_ids, attention_mask = batch["prompt_length"], batch["input_ids"], batch["attention_mask"]
    n = input_ids.shape[0]
    unique, inverse = torch.unique(batch["prompt_index"], return_inverse=True)  # (U,), (n,)
    first = torch.empty_like(unique).scatter_(0, inverse.flip(0), torch.arange(n, device=inverse.device).flip(0))
    prompt_mask = attention_mask[first, :P]  # (U, P): one row per distinct prompt
    start = int((prompt_mask.sum(0) == 0).sum())  # leading columns that are padding in every prompt
    end = P + int(attention_mask[:, P:].sum(-1).max())  # past the longest completion: padding only
    positions = position_ids_from_mask(attention_mask)  # (n, P+C), counted as the plain forward counts them
    keep = {"output_hidden_states": True} if hidden else {}

    inner = unwrap(model)
    cache = DynamicCache(config=inner.config)
    out = inner(input_ids=input_ids[first, start:P], attention_mask=prompt_mask[:, start:],
                position_ids=positions[first, start:P], **cache_kwargs(inner, cache), use_cache=True, logits_to_keep=1,
                **keep)
    first_hidden = out.hidden_states[-1][:, -1] if hidden else None  # (U, H) at position P-1
    states = [(first_hidden if hidden else out.logits[:, -1])[inverse, None]]  # (n, 1, X) predicts token P
    last_prompt = (first_hidden, out.logits[:, -1])
    if end - 1 > P:  # the completion tokens that are inputs: all but the last
        cache.batch_select_indices(inverse)  # each row reads its prompt's keys and values (gathered, differentiable)
        out = model(input_ids=input_ids[:, P:end - 1], attention_mask=attention_mask[:, start:end - 1],
                    position_ids=positions[:, P:end - 1], **cache_kwargs(model, cache), use_cache=True,
                    logits_to_keep=NO_POSITIONS.to(input_ids.device) if hidden else 0, **keep)
        states.append(out.hidden_states[-1] if hidden else out.logits)  # (n, C'-1, X)
    return torch.cat(states, dim=1), last_prompt


def completion_logprobs(model, batch: dict, *, temperature: float = 1.0, entropy: bool = False,
                        entropy_grad: bool = False, packing: bool = True) -> tuple[Tensor, Tensor | None] | None:
    """Log-probs (n, C) of the completion tokens at `temperature` (0 on padding) and, with `entropy`, the
    entropy of each position's distribution (n, C) (with a gradient only under `entropy_grad`): what a plain
    forward gives, each distinct prompt computed once. With a plain LM head the head runs chunk by chunk at the
    completion positions only (`ops.linear_token_logprobs`). Where `models.packed` applies (`packing` and a
    supported model) the forward is the packed one, else the cached one. None when the head fails its check or there is no completion token at
    all: run the plain forward then."""
    P, completion_mask = batch["prompt_length"], batch["completion_mask"]
    C = completion_mask.shape[1]
    if C == 0 or not bool(completion_mask.any()):
        return None  # nothing to score: the plain forward keeps the (empty) loss in the graph
    if packed.unsupported_reason(model, packing) is None:
        return packed_completion_logprobs(model, batch, temperature=temperature, entropy=entropy,
                                          entropy_grad=entropy_grad)
    head = None if entropy_grad else plain_lm_head(model)
    states, (last_hidden, last_logits) = completion_states(model, batch, hidden=head is not None)  # (n, C', X)
    if head is not None and not head_reproduces(last_logits, last_hidden, head):
        return None
    width = states.shape[1]
    labels = batch["input_ids"][:, P:P + width].masked_fill(completion_mask[:, :width] == 0, -100)  # (n, C')
    token_entropy = None
    if head is not None:
        logprobs, token_entropy = linear_token_logprobs(states, head, labels, temperature=temperature,
                                                        return_entropy=entropy)
    else:
        logprobs = token_logprobs(states, labels, temperature=temperature)  # (n, C')
        if entropy:
            with contextlib.nullcontext() if entropy_grad else torch.no_grad():
                token_entropy = entropy_from_logits(states, temperature=temperature) * completion_mask[:, :width]
    if width < C:  # completions shorter than the padded width: the rest is padding, 0
        pad = (0, C - width)
        logprobs = torch.nn.functional.pad(logprobs, pad)
        token_entropy = torch.nn.functional.pad(token_entropy, pad) if token_entropy is not None else None
    return logprobs, token_entropy


def _packed_layout(batch: dict):
    """Where everything lies in the packed sequence: every distinct prompt's real tokens, then every completion's
    input tokens (all but the last).

    Returns (tokens (N,): flat indices into input_ids, positions (N,), layout, states (M,): the packed position
    whose output predicts each completion token, targets (M,): flat indices into the (n, C) completion grid),
    or None when a prompt is empty (its first completion token would have nothing to be predicted from)."""
    P, input_ids, attention_mask = batch["prompt_length"], batch["input_ids"], batch["attention_mask"]
    n, width = input_ids.shape
    C = width - P
    unique, inverse = torch.unique(batch["prompt_index"], return_inverse=True)  # (U,), (n,)
    first = torch.empty_like(unique).scatter_(0, inverse.flip(0), torch.arange(n, device=inverse.device).flip(0))
    prompt_lengths = attention_mask[first, :P].long().sum(-1).tolist()  # (U,) left-padded
    if min(prompt_lengths) == 0:
        return None
    completion_lengths = attention_mask[:, P:].long().sum(-1).tolist()  # (n,) right-padded (episodes: with
    # their observation tokens, which completion_mask leaves out)
    prompt_of = inverse.tolist()
    arange = functools.partial(torch.arange, device=input_ids.device)
    tokens, positions, lengths, prefixes, prompt_start = [], [], [], [], []
    total = 0  # packed tokens so far: where the next segment starts
    for row, length in zip(first.tolist(), prompt_lengths):  # segment u: prompt u
        prompt_start.append(total)
        tokens.append(row * width + P - length + arange(length))
        positions.append(arange(length))
        lengths.append(length)
        prefixes.append(None)
        total += length
    states, targets = [], []
    for row in range(n):
        u, length = prompt_of[row], completion_lengths[row]
        if length == 0:
            continue
        start, prompt_length = total, prompt_lengths[u]
        tokens.append(row * width + P + arange(length - 1))  # the last completion token is only a target
        positions.append(prompt_length + arange(length - 1))
        states.append(torch.cat([arange(1) + prompt_start[u] + prompt_length - 1, start + arange(length - 1)]))
        targets.append(row * C + arange(length))
        lengths.append(length - 1)
        prefixes.append(u)
        total += length - 1
    layout = packed.Layout.from_segments(lengths, prefixes, device=input_ids.device)
    return torch.cat(tokens), torch.cat(positions), layout, torch.cat(states), torch.cat(targets)


def packed_completion_logprobs(model, batch: dict, *, temperature: float = 1.0, entropy: bool = False,
                               entropy_grad: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """`completion_logprobs` through one packed forward (`tether.models.packed`)."""
    pack = _packed_layout(batch)
    if pack is None:
        return None
    tokens, positions, layout, states, targets = pack
    P, input_ids, completion_mask = batch["prompt_length"], batch["input_ids"], batch["completion_mask"]
    n, C = completion_mask.shape
    labels = input_ids[:, P:].flatten()[targets][None]  # (1, M): the completion tokens, row by row
    forward = functools.partial(packed.packed_forward, model, input_ids.flatten()[tokens][None], positions[None],
                                layout)
    head = None if entropy_grad else plain_lm_head(model)
    token_entropy = None
    if head is not None:
        out = forward(output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (1, N, H)
        if not head_reproduces(out.logits[:, -1], hidden[:, -1], head):
            return None
        logprobs, token_entropy = linear_token_logprobs(hidden[:, states], head, labels, temperature=temperature,
                                                        return_entropy=entropy)  # (1, M)
    else:
        logits = forward().logits[:, states]  # (1, M, V)
        logprobs = token_logprobs(logits, labels, temperature=temperature)
        if entropy:
            with contextlib.nullcontext() if entropy_grad else torch.no_grad():
                token_entropy = entropy_from_logits(logits, temperature=temperature)
    logprobs = packed.unpack(logprobs, targets, (n, C))  # (n, C), 0 on padding
    return logprobs, (packed.unpack(token_entropy, targets, (n, C)) if token_entropy is not None else None)
