"""Ablation (not a proposal): turn OFF prompt-shared training forwards (`tether.models.shared_prompt`), so the
GRPO/PPO forward runs every completion row over its own copy of the prompt and DPO's chosen and rejected rows
each carry theirs, as before.

The recipes import `shares_prompts` by name, and the module that does so may move (the online recipes' shared
code is being reorganised), so every loaded tether module that holds the function is patched, after the
recipes the benchmark runs are imported."""

from __future__ import annotations

import importlib
import sys


def apply() -> None:
    from tether.models import shared_prompt

    for name in ("tether.recipes.dpo", "tether.recipes.grpo", "tether.recipes.ppo"):
        importlib.import_module(name)
    original = shared_prompt.shares_prompts

    def never(model, prompt_index):
        return False

    patched = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("tether") and getattr(module, "shares_prompts", None) is original:
            module.shares_prompts = never
            patched += 1
    if patched < 2:  # the module itself and at least one user
        raise RuntimeError("no_shared_prompt: no tether module imports shares_prompts; the lever needs updating")
