"""Deterministic batch order (resumable from a step number) and padding into tensors."""

from __future__ import annotations

import hashlib

import torch


class BatchOrder:
    """Index batches over `n` examples: each epoch is a fresh permutation seeded by (seed, epoch).

    Batches are consecutive slices of the endless concatenation of epochs, so the position after
    `step` batches is `step * batch_size` examples: resuming needs only the step number.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.n, generator=generator).tolist()
            else:
                self._perm = list(range(self.n))
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> list[int]:
        """Indices of batch number `step` (0-based)."""
        start = step * self.batch_size
        indices = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.n)
            indices.append(self._permutation(epoch)[offset])
        return indices

    def steps_for(self, epochs: float) -> int:
        return max(1, int(epochs * self.n) // self.batch_size)


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """(B, T_max) tensor of `sequences` padded with `value` on the given side."""
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if side == "right":
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        else:
            out[i, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
    return out


def collate_sft(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids (B, T), attention_mask (B, T) and loss_mask (B, T-1) aligned with targets."""
    input_ids = pad([e.input_ids for e in examples], pad_id)
    attention_mask = pad([[1] * len(e.input_ids) for e in examples], 0)
    loss_mask = pad([e.loss_mask for e in examples], 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        # Token t+1 is predicted from position t: the mask of targets is shifted by one.
        "loss_mask": loss_mask[:, 1:],
    }


def split_micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    return [indices[i: i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


def length_groups(lengths: list[int], call_cost: float, max_groups: int = 4) -> list[list[int]]:
    """Positions 0..n-1 of a micro-batch in groups of similar length, each to run as its own forward/backward.

    A padded batch computes len(group) × longest(group) tokens. Sorted by length and cut where it pays, the
    groups minimise Σ len(group) × longest(group) + call_cost × (number of groups), with `call_cost` what one
    more forward/backward costs in padded tokens (`tether.models.forward_call_cost`), at most `max_groups`
    groups. One group keeps the given order; call_cost = inf never splits. Losses divided by global counts
    do not change with the split (only float rounding does).
    """
    n = len(lengths)
    if n <= 1 or call_cost == float("inf"):
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lengths[i])
    longest = [lengths[i] for i in order]  # ascending: a group [i, j) is padded to longest[j - 1]
    # best[k][j]: padded tokens of the first j sorted rows in k groups; cut[k][j]: where its last group starts.
    best = [[float("inf")] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (j - i) * longest[j - 1]
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    groups = min(range(1, max_groups + 1), key=lambda k: best[k][n] + call_cost * k)  # ties: fewer groups
    if groups == 1:
        return [list(range(n))]
    bounds, j = [], n
    for k in range(groups, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    return [order[i:j] for i, j in reversed(bounds)]


def grouped_micro_batches(indices: list[int], micro_batch_size: int, lengths, call_cost: float) -> list[list[int]]:
    """`split_micro_batches`, each micro-batch split further into rows of similar length (`length_groups`);
    `lengths[i]` is example i's padded extent."""
    out = []
    for micro in split_micro_batches(indices, micro_batch_size):
        out += [[micro[j] for j in group] for group in length_groups([lengths[i] for i in micro], call_cost)]
    return out


def collate_prompt_completion(prompts: list[list[int]], completions: list[list[int]], prompt_index: list[int],
                              pad_id: int) -> dict:
    """completions[i] after prompts[prompt_index[i]]: input_ids and attention_mask (n, P+C) with each prompt
    LEFT-padded to P and each completion RIGHT-padded to C, completion_mask (n, C) float, prompt_index (n,),
    prompt_length P. The layout of rollouts (`RolloutBatch.to_tensors`) and of the prompt-sharing forwards
    (`tether.models.shared_prompt`): position P-1+t predicts completion token t."""
    n = len(completions)
    P = max((len(p) for p in prompts), default=0)
    C = max((len(c) for c in completions), default=0)
    input_ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(n, P + C, dtype=torch.long)
    for row, (i, completion) in enumerate(zip(prompt_index, completions)):
        prompt = prompts[i]
        input_ids[row, P - len(prompt):P] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, P:P + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention_mask[row, P - len(prompt):P + len(completion)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": attention_mask[:, P:].float(),
            "prompt_index": torch.tensor(prompt_index, dtype=torch.long), "prompt_length": P}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. (seed, step, attempt, position)): a resumed step samples the same."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
