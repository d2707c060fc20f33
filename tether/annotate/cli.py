"""`tether annotate`: label preference pairs in a browser, then export them as preference data.

    tether annotate data=pairs.jsonl guidelines=guidelines.md            # serve http://127.0.0.1:8765/
    tether annotate model=runs/sft_tiny/final prompts=prompts.jsonl       # sample two responses per prompt
    tether annotate model_a=runs/a/final model_b=runs/b/final prompts=prompts.jsonl
    tether annotate export output_dir=runs/annotate                     # → preferences.jsonl, items.jsonl
    tether annotate stats output_dir=runs/annotate

tether/cli.py runs `serve`, `export_labels` and `show_stats` with their configs like any recipe.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tether.annotate.agreement import stats
from tether.annotate.export import export
from tether.annotate.pairs import read_pairs, sample_pairs
from tether.annotate.server import AnnotateServer, render_markdown
from tether.annotate.store import LabelStore
from tether.config import ConfigError

STORE_NAME = "labels.db"


@dataclass
class AnnotateConfig:
    """Serve a page where people label preference pairs; every label is saved as it is made. Then
    `tether annotate export` writes them as preference rows and `tether annotate stats` shows agreement."""

    data: str = ""
    """Pairs to label: rows {prompt, response_a, response_b} or TRL preference rows {prompt, chosen, rejected}."""
    model: str = ""
    """Instead of `data`: sample two responses per prompt of `prompts` from this model (tiny, a folder, a hub name)."""
    model_a: str = ""
    """Instead of `model`: one response from model_a and one from model_b per prompt (side-by-side comparison)."""
    model_b: str = ""
    """The second model of a side-by-side comparison."""
    prompts: str = ""
    """Prompts to sample from ({prompt} rows), with `model` or `model_a`/`model_b`."""
    output_dir: str = "runs/annotate"
    """Where the label store (labels.db, SQLite) lives; starting again with the same pairs resumes it."""
    guidelines: str = ""
    """A Markdown file of labelling guidelines, shown beside every pair."""
    overlap: int = 1
    """Annotators who judge each pair (k > 1 measures agreement)."""
    host: str = "127.0.0.1"
    """Address to listen on; 127.0.0.1 keeps the page on this machine (0.0.0.0 opens it to the network)."""
    port: int = 8765
    """Port to listen on; 0 picks a free one (printed)."""
    seed: int = 0
    """Seed of the left/right order and of sampling."""
    temperature: float = 1.0
    """Sampling temperature (with `model` / `model_a`)."""
    top_p: float = 1.0
    """Nucleus sampling mass (with `model` / `model_a`)."""
    max_new_tokens: int = 128
    """Longest sampled response in tokens."""
    batch_size: int = 16
    """Prompts per sampling forward pass."""
    device: str = "auto"
    """auto, cpu or cuda[:N] for sampling."""

    def validate(self) -> None:
        sources = [bool(self.data), bool(self.model), bool(self.model_a or self.model_b)]
        if sum(sources) > 1:
            raise ConfigError("give one source of pairs: data=, or model= with prompts=, or model_a= and model_b= "
                              "with prompts=")
        if bool(self.model_a) != bool(self.model_b):
            raise ConfigError(f"config key '{'model_b' if self.model_a else 'model_a'}': a side-by-side comparison "
                              "needs both model_a and model_b")
        if (self.model or self.model_a) and not self.prompts:
            raise ConfigError("config key 'prompts': sampling pairs needs a prompts file ({prompt} rows)")
        if self.prompts and not (self.model or self.model_a):
            raise ConfigError("config key 'prompts': give model= (or model_a= and model_b=) to sample from")
        if self.overlap < 1:
            raise ConfigError(f"config key 'overlap': expected a positive integer, got {self.overlap}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"config key 'port': expected 0-65535, got {self.port}")
        if self.guidelines and not Path(self.guidelines).is_file():
            raise ConfigError(f"config key 'guidelines': file {self.guidelines} not found")


@dataclass
class ExportConfig:
    """Write the labels as {prompt, chosen, rejected} rows (for tether rm / dpo) and per-item metadata."""

    output_dir: str = "runs/annotate"
    """The folder `tether annotate` served from (it holds labels.db)."""
    output: str = ""
    """Preference rows; default output_dir/preferences.jsonl."""
    meta_output: str = ""
    """Per-item metadata (votes, annotators, seconds, reasons); default output_dir/items.jsonl."""
    keep_ties: bool = False
    """Also write tie and both-bad items as rows, marked with an `outcome` field (excluded and counted by default)."""
    min_votes: int = 1
    """Items with fewer judgements than this are left out (and counted)."""

    def validate(self) -> None:
        if self.min_votes < 1:
            raise ConfigError(f"config key 'min_votes': expected a positive integer, got {self.min_votes}")


def open_store(output_dir: str) -> LabelStore:
    path = Path(output_dir) / STORE_NAME
    if not path.is_file():
        raise ConfigError(f"config key 'output_dir': no label store at {path}; run `tether annotate` there first")
    return LabelStore(path)


def serve(config: AnnotateConfig, *, ready=None) -> None:
    """Build or resume the store, then serve until Ctrl-C. `ready(server)` is called once it listens."""
    store = LabelStore(Path(config.output_dir) / STORE_NAME)
    if config.data:
        items = read_pairs(config.data)
    elif config.model or config.model_a:
        items = [] if store.meta("fingerprint") else sample_pairs(config)  # a restart does not sample again
    else:
        items = []  # resume whatever the store holds
    resumed = store.initialise(items, overlap=config.overlap, seed=config.seed)
    guidelines = render_markdown(Path(config.guidelines).read_text(encoding="utf-8")) if config.guidelines else ""
    try:
        server = AnnotateServer(store, host=config.host, port=config.port, guidelines_html=guidelines)
    except OSError as err:
        raise ConfigError(f"config key 'port': cannot listen on {config.host}:{config.port} ({err.strerror}); "
                          f"pick another port, or port=0 for a free one") from None
    if not _is_loopback(config.host):
        print(f"WARNING: listening on {config.host}: anyone who can reach this machine can read the pairs and "
              f"label under any name (there is no login). Use host=127.0.0.1 to keep it local.", file=sys.stderr)
    print(f"tether annotate: {'resumed' if resumed else 'new'} store {store.path} "
          f"({len(store.items())} pairs, overlap {store.overlap}); open {server.url} (Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def export_labels(config: ExportConfig) -> None:
    """`tether annotate export`: preference rows and per-item metadata from the store."""
    store = open_store(config.output_dir)
    output = config.output or str(Path(config.output_dir) / "preferences.jsonl")
    meta_output = config.meta_output or str(Path(config.output_dir) / "items.jsonl")
    counts = export(store, output, meta_output, keep_ties=config.keep_ties, min_votes=config.min_votes)
    print(f"tether annotate export: {counts.pop('rows')} preference rows → {output}; per-item metadata → "
          f"{meta_output}\ndecisions: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def show_stats(config: ExportConfig) -> None:
    """`tether annotate stats`: counts, speed, agreement and position bias as JSON (the /stats page in text)."""
    store = open_store(config.output_dir)
    print(json.dumps(stats(store.labels(active_only=False), len(store.items())), indent=2))
