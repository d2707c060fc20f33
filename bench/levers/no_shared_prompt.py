"""Ablation (not a proposal): turn OFF prompt-shared training forwards (`tether.models.shared_prompt`), so the
GRPO/PPO forward runs every completion row over its own copy of the prompt and DPO's chosen and rejected rows
each carry theirs, as before."""

from __future__ import annotations


def apply() -> None:
    from tether.models import forward
    from tether.recipes import dpo

    def never(model, prompt_index):
        return False

    forward.shares_prompts = never
    dpo.shares_prompts = never
