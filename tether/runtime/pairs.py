"""Preference pairs for the recipes that train on them (`rm`, `pm`, `dpo`): loading and the held-out split."""

from __future__ import annotations

import torch

from tether.config import ConfigError
from tether.data.loading import load_rows
from tether.data.preference import build_preference_pairs


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random `fraction` of `items` held out (at least one when fraction > 0)."""
    if fraction <= 0:
        return items, []
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=generator).tolist()
    n_held = max(1, int(round(fraction * len(items))))
    if n_held >= len(items):
        raise ConfigError(f"config key 'eval_fraction': {fraction} of {len(items)} pairs leaves none to train on")
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_pairs(config, tokenizer, source: str):
    """Tokenized `PreferencePair`s of `source` under the config's max_length, overlong, chat_template,
    skip_bad_rows and margin_column keys."""
    pairs, _ = build_preference_pairs(load_rows(source, config.data_split), tokenizer, source=source,
                                      max_length=config.max_length, overlong=config.overlong,
                                      chat_template=config.chat_template, skip_bad_rows=config.skip_bad_rows,
                                      margin_column=config.margin_column)
    return pairs
