"""The labelling web server: Python's http.server (one thread per request) over the label store.

    GET  /                     the page (page.html; plain HTML + JS, no build step, nothing fetched from elsewhere)
    GET  /stats                counts, speed, agreement and position bias as a page
    GET  /api/next?annotator=  the annotator's next pair (sides already randomised) and progress
    POST /api/label            {annotator, item, choice: left|right|tie|both_bad|skip, reason, seconds}
    POST /api/undo             {annotator}: withdraw their latest label
    GET  /api/stats            the stats as JSON

A label is answered only after its commit is on disk (see store.py), so what the page shows as saved is saved.
"""

from __future__ import annotations

import html
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tether.annotate.agreement import stats
from tether.annotate.store import Item, LabelStore, StoreError, left_response

PAGE = Path(__file__).with_name("page.html")
SIDE_CHOICES = ("left", "right", "tie", "both_bad", "skip")
MAX_BODY = 1 << 20  # a label is a few hundred bytes; refuse anything far larger


def render_markdown(text: str) -> str:
    """The small part of Markdown guidelines use: # headings, - / 1. lists, paragraphs, **bold**, *italic*,
    `code`. Everything is HTML-escaped first, so a guidelines file cannot inject markup."""
    def inline(line: str) -> str:
        line = html.escape(line)
        line = re.sub(r"`([^`]+)`", r"<code>\1</code>", line)
        line = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", line)
        return re.sub(r"(?<![*\w])\*([^*]+)\*(?!\*)", r"<em>\1</em>", line)

    out, paragraph, list_tag = [], [], None

    def flush():
        nonlocal list_tag
        if paragraph:
            out.append("<p>" + " ".join(paragraph) + "</p>")
            paragraph.clear()
        if list_tag:
            out.append(f"</{list_tag}>")
            list_tag = None

    for raw in text.splitlines():
        line = raw.strip()
        heading = re.match(r"(#{1,4})\s+(.*)", line)
        bullet = re.match(r"([-*]|\d+\.)\s+(.*)", line)
        if not line:
            flush()
        elif heading:
            flush()
            level = len(heading.group(1)) + 1  # the page's own title is h1
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif bullet:
            tag = "ol" if bullet.group(1)[0].isdigit() else "ul"
            if paragraph or list_tag != tag:
                flush()
                out.append(f"<{tag}>")
                list_tag = tag
            out.append(f"<li>{inline(bullet.group(2))}</li>")
        else:
            if list_tag:
                flush()
            paragraph.append(inline(line))
    flush()
    return "\n".join(out)


def display_text(value) -> str:
    """A string as it is; a message list as "role: content" blocks."""
    if isinstance(value, str):
        return value
    return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                       for m in value)


def item_view(store: LabelStore, item: Item | None, annotator: str) -> dict | None:
    if item is None:
        return None
    left = left_response(item.id, annotator, store.seed)
    right = "b" if left == "a" else "a"
    text = {"a": item.response_a, "b": item.response_b}
    return {"id": item.id, "prompt": display_text(item.prompt), "left": display_text(text[left]),
            "right": display_text(text[right])}


def stats_page(report: dict) -> str:
    """The stats as a small HTML page (no script)."""
    def table(rows: list[list], head: list[str]) -> str:
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{cells}</table>"

    def number(value, digits=3):
        return "–" if value is None else round(value, digits)

    agreement, bias = report["agreement"], report["position_bias"]
    summary = [["items", report["items"]], ["items judged", report["items_judged"]], ["labels", report["labels"]],
               ["undone", report["undone"]]] + [[f"choice: {k}", v] for k, v in sorted(report["choices"].items())]
    people = [[name, s["labels"], s["median_seconds"], s["labels_per_hour"] or "–",
               ", ".join(f"{k} {v}" for k, v in sorted(s["choices"].items()))]
              for name, s in report["annotators"].items()]
    agree = [["items judged by 2+ annotators", agreement["items_with_overlap"]],
             ["pairwise percent agreement", number(agreement["percent_agreement"])],
             ["Fleiss' kappa", number(agreement["fleiss_kappa"])]] + [
        [f"Cohen's kappa {pair} ({v['items']} items)", number(v["kappa"])]
        for pair, v in agreement["cohen_kappa"].items()]
    position = [["decisive votes", bias["decisive_votes"]], ["left (A) chosen", number(bias["left_chosen"])],
                ["response_a chosen", number(bias["response_a_chosen"])]]
    people_head = ["annotator", "labels", "median s/label", "labels/hour", "choices"]
    body = (f"<h1>tether annotate: stats</h1><p><a href='/'>back to labelling</a></p>"
            f"<h2>Counts</h2>{table(summary, ['', ''])}"
            f"<h2>Annotators</h2>{table(people, people_head)}"
            f"<h2>Agreement</h2>{table(agree, ['', ''])}"
            f"<h2>Position bias</h2><p>0.5 means the screen side does not sway the choice.</p>"
            f"{table(position, ['', ''])}")
    style = ("body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>tether annotate: stats</title>" \
           f"<style>{style}</style></head><body>{body}</body></html>"


class AnnotateHandler(BaseHTTPRequestHandler):
    server: "AnnotateServer"

    def log_message(self, format, *args):  # one line per request is noise while labelling
        pass

    def _send(self, status: int, body: str, content_type: str = "application/json") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False))

    def _state(self, annotator: str, **extra) -> dict:
        store = self.server.store
        return {"item": item_view(store, store.next_item(annotator), annotator),
                "progress": store.progress(annotator), **extra}

    def do_GET(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        store = self.server.store
        if url.path == "/":
            self._send(200, self.server.page, "text/html")
        elif url.path == "/stats":
            self._send(200, stats_page(stats(store.labels(active_only=False), len(store.items()))), "text/html")
        elif url.path == "/api/stats":
            self._json(200, stats(store.labels(active_only=False), len(store.items())))
        elif url.path == "/api/next":
            annotator = query.get("annotator", "").strip()
            if not annotator:
                self._json(400, {"error": "annotator is missing"})
            else:
                self._json(200, self._state(annotator))
        else:
            self._json(404, {"error": f"no such page {url.path}"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(413, {"error": "request too large"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            annotator = str(body.get("annotator", "")).strip()
            if not annotator:
                raise StoreError("annotator is missing")
            if self.path == "/api/label":
                self._json(200, self._state(annotator, saved=self._label(annotator, body)))
            elif self.path == "/api/undo":
                self._json(200, self._state(annotator, undone_item=self.server.store.undo(annotator)))
            else:
                self._json(404, {"error": f"no such endpoint {self.path}"})
        except (StoreError, ValueError, TypeError, AttributeError) as err:
            self._json(400, {"error": str(err)})

    def _label(self, annotator: str, body: dict) -> int:
        choice = body.get("choice")
        if choice not in SIDE_CHOICES:
            raise StoreError(f"choice must be one of {', '.join(SIDE_CHOICES)}, got {choice!r}")
        item_id = int(body["item"])
        left = left_response(item_id, annotator, self.server.store.seed)
        stored = {"left": left, "right": "b" if left == "a" else "a"}.get(choice, choice)
        return self.server.store.add_label(item_id, annotator, stored, shown_left=left,
                                           reason=str(body.get("reason", ""))[:2000],
                                           seconds=min(float(body.get("seconds", 0.0)), 3600.0))


class AnnotateServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, store: LabelStore, *, host: str = "127.0.0.1", port: int = 0, guidelines_html: str = ""):
        super().__init__((host, port), AnnotateHandler)
        self.store = store
        self.page = PAGE.read_text(encoding="utf-8").replace(
            "<!--GUIDELINES-->", guidelines_html or "<p>No guidelines were given (start with guidelines=FILE.md).</p>")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def start_in_thread(self) -> threading.Thread:
        """Serve in a background thread (for tests and notebooks); stop with `shutdown()`."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread
