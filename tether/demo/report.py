"""Plots (PNG) and a one-page HTML report for a demo run folder."""

from __future__ import annotations

import html
import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Write rows as JSON lines; returns the path as a string (for a config's `data` key)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_series(path: Path, title: str, series: dict[str, tuple[list, list]], *, ylabel: str,
                xlabel: str = "step") -> Path:
    """One line chart: {label: (xs, ys)} → PNG at `path`. `ylabel` is required: every plot says what it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def metric_series(rows: list[dict], key: str, x_key: str = "step") -> tuple[list, list]:
    points = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def write_html(path: Path, *, title: str, tables: list[tuple[str, list[str], list[list]]], images: list[Path],
               samples: list[tuple[str, list[dict]]], notes: list[str] = ()) -> Path:
    """A self-contained page: tables (caption, header, rows), images (relative to the page) and samples."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f4f4f4}img{max-width:48%;margin:1%}"
             "pre{background:#f8f8f8;padding:6px;white-space:pre-wrap}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    for caption, header, rows in tables:
        parts.append(f"<table><caption>{html.escape(caption)}</caption><tr>"
                     + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts += [f"<img src='{html.escape(img.name)}' alt='{html.escape(img.stem)}'>" for img in images]
    for caption, rows in samples:
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        for row in rows:
            reward = row.get("reward")
            parts.append(f"<pre>{html.escape(str(row.get('prompt', '')))}"
                         f"<b>{html.escape(str(row.get('completion', '')))}</b>"
                         f"   → reward {html.escape(_fmt(reward))}</pre>")
    path.write_text("\n".join(parts))
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table for the terminal."""
    cells = [[_fmt(v) for v in row] for row in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
