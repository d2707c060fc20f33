"""π_ref, the frozen reference model that KL-anchored training compares the policy with.

DPO's log-ratios log π(y|x) − log π_ref(y|x) and the online recipes' KL(π_θ ‖ π_ref) both read it. It takes
one of three forms:

    a frozen model     a separately loaded π_ref, or a deep copy of the starting policy
    the policy itself  under LoRA: the base model with the adapter disabled (no second copy); without LoRA:
                       the unchanged policy, valid only before its first update (DPO's precomputation)
    none               β = 0 or a reference-free loss (SimPO, ORPO): the recipe builds no `Reference`,
                       so no model is copied or loaded and no reference forward runs

Build it before `run.start` loads resumed weights, so that π_ref is always the starting policy. `logps` runs
any forward under π_ref; `logprobs` reads it at a rollout's completion tokens (`tether.models.forward`).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from tether.models import is_peft, unwrap
from tether.models.forward import logprob_fn, scoring_pass


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with no parameter requiring gradients (π_ref is never trained)."""
    return model.eval().requires_grad_(False)


class Reference:
    """π_ref: `frozen`, a model of its own, or (frozen=None) the policy with its LoRA adapter disabled, or the
    unchanged policy itself when it has no adapter."""

    def __init__(self, policy: torch.nn.Module, frozen: torch.nn.Module | None = None):
        self.policy, self.frozen = policy, frozen

    @classmethod
    def from_policy(cls, policy: torch.nn.Module, *, frozen_copy: bool = True) -> Reference:
        """π_ref = the policy as it is now. Under LoRA: the adapter-disabled base, never a copy. Otherwise a
        frozen deep copy, or with frozen_copy=False the policy itself (use it only before the first update)."""
        inner = unwrap(policy)
        if is_peft(inner) or not frozen_copy:
            return cls(policy)
        return cls(policy, freeze(copy.deepcopy(inner)))

    @contextlib.contextmanager
    def active(self):
        """The model that computes π_ref, in eval mode. When it is the policy, the policy's train/eval mode
        and its adapter are restored on exit."""
        if self.frozen is not None:
            yield self.frozen
            return
        inner = unwrap(self.policy)
        was_training = inner.training
        inner.eval()
        try:
            with inner.disable_adapter() if is_peft(inner) else contextlib.nullcontext():
                yield inner
        finally:
            inner.train(was_training)

    @torch.no_grad()
    def logps(self, fn, *args, **kwargs) -> torch.Tensor:
        """The log-probs under π_ref, without gradients: the first output of `fn(model, *args, **kwargs)`."""
        with self.active() as model:
            return fn(model, *args, **kwargs)[0]

    def logprobs(self, batch: dict, micro_size: int, temperature: float, *, packing: bool = True) -> torch.Tensor:
        """log π_ref of every completion token of a rollout batch, (N, C), `micro_size` rows per forward
        (`packing`: config key `padding_free`)."""
        with self.active() as model:
            return scoring_pass(logprob_fn(model, temperature, packing=packing), batch, micro_size)
