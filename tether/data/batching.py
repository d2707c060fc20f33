"""Deterministic batch order (resumable from a step number) and padding into tensors."""

from __future__ import annotations

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
