"""The durable label store: one SQLite file in WAL mode, written as each label is made.

Why SQLite (WAL, synchronous=FULL): a commit returns only after its WAL frame is fsynced, so a label the page
was told is saved survives a SIGKILL of the server or a power cut; readers (the stats page, export) never
block the writer; several annotators' requests are serialised by SQLite's own lock; and it ships with Python.
An append-only JSONL log would give the same durability, but undo, "what is next for this annotator" and
agreement need indexed queries that SQLite already does.

Tables:
    meta(key, value)        source fingerprint, overlap, seed
    items(id, prompt, response_a, response_b, origin)     texts JSON-encoded (a string or a message list)
    labels(id, item_id, annotator, choice, shown_left, reason, seconds, created, undone)

`choice` names a response, not a screen side: 'a' (response_a better), 'b', 'tie', 'both_bad' or 'skip';
`shown_left` is the response that was on the left ('a' or 'b'). Undo never deletes: it stamps `undone`.
Every label row is kept, including two made on one item from two tabs.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CHOICES = ("a", "b", "tie", "both_bad", "skip")
VOTES = ("a", "b", "tie", "both_bad")  # the choices that count as a judgement (skip does not)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, response_a TEXT NOT NULL, response_b TEXT NOT NULL,
    origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad', 'skip')),
    shown_left TEXT NOT NULL CHECK (shown_left IN ('a', 'b')),
    reason TEXT NOT NULL DEFAULT '',
    seconds REAL NOT NULL,
    created REAL NOT NULL,
    undone REAL);
CREATE INDEX IF NOT EXISTS labels_by_annotator ON labels (annotator, undone);
CREATE INDEX IF NOT EXISTS labels_by_item ON labels (item_id, undone);
"""


@dataclass
class Item:
    """One pair to judge; `prompt` and the responses are strings or message lists."""

    id: int
    prompt: object
    response_a: object
    response_b: object
    origin: str = ""


@dataclass
class Label:
    id: int
    item_id: int
    annotator: str
    choice: str
    shown_left: str
    reason: str
    seconds: float
    created: float
    undone: float | None


def fingerprint(items: list[Item]) -> str:
    """A hash of the pairs' texts, so a store is never resumed with other pairs."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.prompt, item.response_a, item.response_b]).encode())
    return digest.hexdigest()[:16]


def left_response(item_id: int, annotator: str, seed: int) -> str:
    """Which response ('a' or 'b') this annotator sees on the left: random per (item, annotator), and the same
    on every reload, so a person never sees a pair flip."""
    digest = hashlib.sha256(f"{seed}:{item_id}:{annotator}".encode()).digest()
    return "a" if digest[0] % 2 == 0 else "b"


class StoreError(ValueError):
    """The store cannot be used as asked (another set of pairs, an unknown item or choice)."""


class LabelStore:
    """Thread-safe access to one store file; each write is one committed (fsynced) transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # one connection shared by the server's threads
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: acknowledged = on disk
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- set-up ---------------------------------------------------------------------------------------------

    def meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def initialise(self, items: list[Item], *, overlap: int, seed: int) -> bool:
        """Write the pairs into an empty store, or check they match a store being resumed. True on resume."""
        with self._lock:
            stored = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            if stored:
                if items and self.meta("fingerprint") != fingerprint(items):
                    raise StoreError(f"{self.path} holds labels for another set of pairs; give a new output_dir "
                                     f"to start over, or the same data to resume")
                self._set_meta({"overlap": str(overlap)})
                return True
            if not items:
                raise StoreError(f"{self.path}: no pairs to label (give data=, or model= with prompts=)")
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO items (id, prompt, response_a, response_b, origin) VALUES (?, ?, ?, ?, ?)",
                [(it.id, json.dumps(it.prompt), json.dumps(it.response_a), json.dumps(it.response_b), it.origin)
                 for it in items])
            self._set_meta({"fingerprint": fingerprint(items), "overlap": str(overlap), "seed": str(seed)})
            self._db.execute("COMMIT")  # pairs and their fingerprint together, or neither
            return False

    def _set_meta(self, values: dict[str, str]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    @property
    def overlap(self) -> int:
        return int(self.meta("overlap", "1"))

    @property
    def seed(self) -> int:
        return int(self.meta("seed", "0"))

    # -- reads ----------------------------------------------------------------------------------------------

    def items(self) -> list[Item]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, prompt, response_a, response_b, origin FROM items ORDER BY id").fetchall()
        return [Item(i, json.loads(p), json.loads(a), json.loads(b), o) for i, p, a, b, o in rows]

    def item(self, item_id: int) -> Item:
        with self._lock:
            row = self._db.execute("SELECT id, prompt, response_a, response_b, origin FROM items WHERE id = ?",
                                   (item_id,)).fetchone()
        if row is None:
            raise StoreError(f"no item {item_id}")
        return Item(row[0], json.loads(row[1]), json.loads(row[2]), json.loads(row[3]), row[4])

    def labels(self, *, active_only: bool = True) -> list[Label]:
        where = "WHERE undone IS NULL" if active_only else ""
        with self._lock:
            return [Label(*row) for row in self._db.execute(
                f"SELECT id, item_id, annotator, choice, shown_left, reason, seconds, created, undone FROM labels "
                f"{where} ORDER BY id")]

    def _open_items(self, annotator: str) -> tuple[set[int], list[int]]:
        """(items `annotator` has labelled, items still open to them in serving order). Open: not labelled by
        them and judged by fewer than `overlap` annotators; their most recently undone pair first, then by id."""
        done = {row[0] for row in self._db.execute(
            "SELECT item_id FROM labels WHERE annotator = ? AND undone IS NULL", (annotator,))}
        judged_by = dict(self._judged_by())
        undone = [row[0] for row in self._db.execute(
            "SELECT item_id FROM labels WHERE annotator = ? AND undone IS NOT NULL ORDER BY undone DESC",
            (annotator,))]
        in_order = undone + [row[0] for row in self._db.execute("SELECT id FROM items ORDER BY id")]
        overlap, open_items = self.overlap, []
        for item_id in dict.fromkeys(in_order):
            if item_id not in done and judged_by.get(item_id, 0) < overlap:
                open_items.append(item_id)
        return done, open_items

    def _judged_by(self) -> list[tuple[int, int]]:
        """(item id, number of annotators whose active label on it is a judgement, not a skip)."""
        return self._db.execute("SELECT item_id, COUNT(DISTINCT annotator) FROM labels WHERE undone IS NULL "
                                "AND choice != 'skip' GROUP BY item_id").fetchall()

    def next_item(self, annotator: str) -> Item | None:
        """The next pair for `annotator` (see `_open_items`), or None when nothing is left for them."""
        with self._lock:
            _, open_items = self._open_items(annotator)
        return self.item(open_items[0]) if open_items else None

    def progress(self, annotator: str) -> dict:
        """Counts for the page's progress bar: this annotator's labels and what is left for them, and the
        whole job (votes made / votes wanted = items x overlap)."""
        with self._lock:
            done, open_items = self._open_items(annotator)
            total_items = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            votes = sum(min(n, self.overlap) for _, n in self._judged_by())
        return {"annotator": annotator, "done": len(done), "left": len(open_items),
                "total": len(done) + len(open_items), "items": total_items, "votes": votes,
                "votes_wanted": total_items * self.overlap}

    # -- writes ---------------------------------------------------------------------------------------------

    def add_label(self, item_id: int, annotator: str, choice: str, *, shown_left: str, reason: str = "",
                  seconds: float = 0.0) -> int:
        """Append one label and commit it (fsynced) before returning its id."""
        if choice not in CHOICES:
            raise StoreError(f"unknown choice {choice!r}; expected one of {', '.join(CHOICES)}")
        if shown_left not in ("a", "b"):
            raise StoreError(f"shown_left must be 'a' or 'b', got {shown_left!r}")
        if not annotator.strip():
            raise StoreError("an annotator name is needed")
        self.item(item_id)  # raises on an unknown item
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO labels (item_id, annotator, choice, shown_left, reason, seconds, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (item_id, annotator, choice, shown_left, reason, max(0.0, float(seconds)), time.time()))
            return cursor.lastrowid

    def undo(self, annotator: str) -> int | None:
        """Withdraw `annotator`'s latest active label (kept, stamped undone); returns its item id, or None."""
        with self._lock:
            row = self._db.execute("SELECT id, item_id FROM labels WHERE annotator = ? AND undone IS NULL "
                                   "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE labels SET undone = ? WHERE id = ?", (time.time(), row[0]))
            return row[1]
