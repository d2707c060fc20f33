"""Ablation (not a proposal): turn OFF prompt-shared training forwards (`tether.models.shared_prompt`), so the
GRPO/PPO forward runs every completion row over its own copy of the prompt and DPO's chosen and rejected rows
each carry theirs, as before."""

from __future__ import annotations


def apply() -> None:
    from tether.models import forward

    def never(model, prompt_index, *, packing=True):
        return False

    forward.shares_prompts = never  # completion_forward and pair_logps (DPO) both ask here
