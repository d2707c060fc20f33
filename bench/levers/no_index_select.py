"""Ablation (not a proposal): the packed attention gathers q/k/v blocks by advanced indexing (x[:, index]), as
before; index_select's backward is an index_add, advanced indexing's an accumulating index_put."""

from __future__ import annotations


def apply() -> None:
    from tether.models import packed

    packed._gather = lambda x, index: x[:, index].transpose(0, 1)
