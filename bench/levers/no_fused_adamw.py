"""Ablation (not a proposal): turn OFF fused AdamW (`runtime.optim.build_optimizer`), so the optimizer is
torch's default for-loop AdamW, as before that lever was kept."""

from __future__ import annotations


def apply() -> None:
    import torch

    original = torch.optim.AdamW.__init__

    def init(self, *args, **kwargs):
        kwargs["fused"] = None
        original(self, *args, **kwargs)

    torch.optim.AdamW.__init__ = init
