"""The forward that scores completions: log-probs (and entropy, values) at the completion tokens of a batch.

The one place that chooses between the shared-prompt forward (the G completions of a prompt read one
encoding of it), the packed (padding-free) forward, the fused head (only completion positions reach the
vocabulary) and the plain forward: `model_token_logprobs` for any batch, `completion_forward` for a rollout,
`pair_logps` / `unpaired_logps` for preference pairs and KTO examples. Packing is an explicit argument
(`packing`, the config key `padding_free`), never a process-wide switch.

Batch layout (`RolloutBatch.to_tensors`): input_ids/attention_mask (n, P+C) with left-padded prompts of
P tokens and right-padded completions of C tokens, completion_mask (n, C), prompt_index (n,), prompt_length P.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from tether.data.batching import collate_prompt_completion
from tether.data.preference import collate_pairs, collate_unpaired
from tether.models import packed
from tether.models.shared_prompt import completion_logprobs, shares_prompts
from tether.ops import entropy_from_logits, forward_logprobs, masked_sum, position_ids_from_mask, token_logprobs


def model_token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    target_mask: Optional[Tensor] = None,
    packing: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-prob of each next token under `model`, for left- or right-padded batches.

    input_ids, attention_mask (B, T) -> (logprobs (B, T-1), entropy (B, T-1) or None).
    logprobs[:, t] = log pi(input_ids[:, t+1] | input_ids[:, :t+1]) at `temperature`;
    positions whose target token is padding are 0 (logprobs and entropy), and so is the
    position that predicts a left-padded sequence's first token from a pad token (the
    unpadded sequence has no log-prob for its first token either). `target_mask` (B, T-1),
    e.g. a loss mask, limits the scored targets further: the others are 0 too.

    Where `models.packed` applies (`packing`: the config key `padding_free`; supported models) the rows' real tokens run as
    one packed sequence, so no work is spent on padding. When the logits are a plain linear head on the last hidden
    state (most causal LMs), the head is applied chunk by chunk to the scored positions only
    (`linear_token_logprobs`): the (B, T, V) logits never exist. Otherwise the model's logits are used.
    """
    target = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # (B, T-1)
    if target_mask is not None:
        target &= target_mask.bool()
    # Shift labels instead of slicing logits[:, :-1]: the slice is not contiguous and would
    # copy the whole (B, T, V) tensor. The last position gets label -100 and is dropped.
    labels = torch.full_like(input_ids, -100)  # (B, T)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~target, -100)

    rows = packed.pack_rows(attention_mask) if packed.unsupported_reason(model, packing) is None else None
    if rows is not None:  # one row (1, N) of every real token; positions restart in each row
        index, layout = rows
        positions = position_ids_from_mask(attention_mask).flatten()[index][None]
        forward = functools.partial(packed.packed_forward, model, input_ids.flatten()[index][None], positions,
                                    layout)
        logprobs, entropy = forward_logprobs(model, forward, labels.flatten()[index][None], temperature,
                                              chunk_size, return_entropy)  # (1, N)
        logprobs = packed.unpack(logprobs, index, input_ids.shape)  # (B, T), 0 on padding
        entropy = packed.unpack(entropy, index, input_ids.shape) if return_entropy else None
    else:
        kwargs = {}
        if bool((attention_mask[:, 0] == 0).any()):  # left padding: positions must start at 0
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        forward = functools.partial(model, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logprobs, entropy = forward_logprobs(model, forward, labels, temperature, chunk_size, return_entropy)
    return logprobs[:, :-1], (entropy[:, :-1] if return_entropy else None)


def sequence_logps(model, batch: dict[str, Tensor], *, packing: bool = True) -> tuple[Tensor, Tensor]:
    """(summed completion log-probs (N,), completion lengths (N,)) of a collated batch."""
    mask = batch["loss_mask"]  # (N, T-1)
    logprobs, _ = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"], target_mask=mask,
                                       packing=packing)  # (N, T-1), prompt positions not scored
    return masked_sum(logprobs, mask, dim=-1), mask.sum(-1)


def pair_logps(model, pairs, pad_id: int, device, *, packing: bool = True) -> tuple[Tensor, Tensor]:
    """Chosen and rejected: (logps (2B,), lengths (2B,)), chosen rows first. Each prompt is encoded once for
    both of its responses (`tether.models.shared_prompt`); where the model cannot share one (gradient
    checkpointing, FSDP), chosen and rejected go through ONE (2B, T) forward."""
    prompt_index = list(range(len(pairs))) * 2  # chosen rows, then rejected rows
    if shares_prompts(model, torch.tensor(prompt_index), packing=packing):
        shared = collate_prompt_completion([p.prompt_ids for p in pairs],
                                           [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
                                           prompt_index, pad_id)
        shared = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in shared.items()}
        result = completion_logprobs(model, shared, packing=packing)
        if result is not None:
            mask = shared["completion_mask"]  # (2B, C)
            return masked_sum(result[0], mask, dim=-1), mask.sum(-1)
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    return sequence_logps(model, batch, packing=packing)


def unpaired_logps(model, examples, pad_id: int, device, completions=None, *, packing: bool = True):
    """(logps (B,), lengths (B,), labels (B,)); `completions` swaps in other completions (KTO's KL pairs)."""
    batch = {k: v.to(device) for k, v in collate_unpaired(examples, pad_id, completions).items()}
    logps, lengths = sequence_logps(model, batch, packing=packing)
    return logps, lengths, batch["labels"]


def take(batch: dict, index) -> dict:
    """Rows `index` of every (N, ...) tensor in `batch`; other entries (prompt_length) as they are."""
    return {k: v[index] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def completion_forward(model, batch: dict, *, temperature: float = 1.0, entropy: bool = False,
                       entropy_grad: bool = False, value_head=None, packing: bool = True):
    """One forward over prompt + completion, read at the completion tokens only. `packing` (config key
    `padding_free`) lets the packed forward run where the model supports it.

    Returns (logprobs (n, C), entropy (n, C) or None, values (n, C) or None): log π(token) at `temperature`,
    0 on padding; the entropy of the sampling distribution (with gradient only if `entropy_grad`);
    with `value_head` (a critic sharing the policy's body) V(state before each completion token).
    """
    P = batch["prompt_length"]
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (n, P+C)
    if value_head is None and shares_prompts(model, batch["prompt_index"], packing=packing):
        # The G completions of a prompt read one encoding of it (tether.models.shared_prompt).
        shared = completion_logprobs(model, batch, temperature=temperature, entropy=entropy,
                                     entropy_grad=entropy_grad, packing=packing)
        if shared is not None:
            return (*shared, None)
    if value_head is None and not entropy_grad:
        # Only the completion targets are scored; with a plain LM head the prompt positions are never
        # projected onto the vocabulary and the (n, P+C, V) logits never exist (ops.linear_token_logprobs).
        target_mask = torch.zeros_like(attention_mask[:, 1:])  # (n, P+C-1)
        target_mask[:, P - 1:] = batch["completion_mask"]
        logprobs, token_entropy = model_token_logprobs(model, input_ids, attention_mask, temperature=temperature,
                                                       return_entropy=entropy, target_mask=target_mask,
                                                       packing=packing)
        return logprobs[:, P - 1:], (token_entropy[:, P - 1:] if entropy else None), None
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),  # prompts are left-padded
                output_hidden_states=value_head is not None)
    logits = out.logits[:, P - 1:-1]  # (n, C, V): position P-1+t predicts completion token t
    labels = input_ids[:, P:].masked_fill(batch["completion_mask"] == 0, -100)  # (n, C)
    logprobs = token_logprobs(logits, labels, temperature=temperature)  # (n, C)
    token_entropy = values = None
    if entropy:
        with contextlib.nullcontext() if entropy_grad else torch.no_grad():
            token_entropy = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature=temperature)
        token_entropy = token_entropy * batch["completion_mask"]
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, P - 1:-1])  # (n, C)
    return logprobs, token_entropy, values


def critic_values(critic, batch: dict) -> Tensor:
    """A separate value model's V(state before each completion token), (n, C)."""
    P = batch["prompt_length"]
    values = critic(batch["input_ids"], batch["attention_mask"],
                    position_ids=position_ids_from_mask(batch["attention_mask"]))  # (n, P+C)
    return values[:, P - 1:-1]


@torch.no_grad()
def scoring_pass(fn, batch: dict, micro_size: int) -> Tensor:
    """`fn(micro_batch) -> (n, C)` over the whole rollout in micro-batches, without gradients: (N, C)."""
    N = batch["input_ids"].shape[0]
    return torch.cat([fn(take(batch, slice(i, i + micro_size))).float() for i in range(0, N, micro_size)])


def logprob_fn(model, temperature: float, *, packing: bool = True):
    """`micro -> log π(completion tokens)` (n, C) of `model` at `temperature`, for `scoring_pass`."""
    return lambda micro: completion_forward(model, micro, temperature=temperature, packing=packing)[0]
