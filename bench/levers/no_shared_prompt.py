"""Ablation (not a proposal): turn OFF prompt-shared training forwards (`tether.models.shared_prompt`), so the
GRPO/PPO forward runs every completion row over its own copy of the prompt and DPO's chosen and rejected rows
each carry theirs, as before."""

from __future__ import annotations


def apply() -> None:
    from tether.recipes import dpo, online

    def never(model, prompt_index):
        return False

    online.shares_prompts = never
    dpo.shares_prompts = never
