"""`tether annotate`: people label preference pairs in a browser; the labels become preference data.

    store.py      the durable label store (SQLite, WAL, fsync per label)
    pairs.py      the pairs: a file, or two samples per prompt from tether's sampler
    server.py     the web server and page.html
    export.py     labels → {prompt, chosen, rejected} rows + per-item metadata
    agreement.py  percent agreement, Cohen's / Fleiss' kappa, position bias, speed
See docs/annotate.md.
"""

from tether.annotate.agreement import cohen_kappa, fleiss_kappa, stats
from tether.annotate.export import decide, export
from tether.annotate.server import AnnotateServer
from tether.annotate.store import Item, LabelStore, StoreError



def __getattr__(name: str):
    """`read_pairs` loads lazily: it reads preference rows (torch); the store and the page need no torch."""
    if name == "read_pairs":
        from tether.annotate.pairs import read_pairs

        return read_pairs
    raise AttributeError(name)


__all__ = ["AnnotateServer", "Item", "LabelStore", "StoreError", "cohen_kappa", "decide", "export", "fleiss_kappa",
           "read_pairs", "stats"]
