"""Labels → preference rows `{"prompt", "chosen", "rejected"}` for `tether rm` / `tether dpo`, plus one
metadata row per item (votes, annotators, time spent, the decision).

An item's decision is the majority of its annotators' votes (each annotator's latest judgement counts once).
Ties and both-bad decisions, items with no majority, and items with fewer than `min_votes` votes are left out
of the preference rows and counted; `keep_ties=True` writes tie and both-bad items as rows too, with
`"outcome": "tie" | "both_bad"` (chosen = response_a): losses in tether treat every row as a preference, so
filter them before training.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tether.annotate.agreement import votes_by_item
from tether.annotate.store import VOTES, LabelStore


def decide(choices: list[str], min_votes: int = 1) -> str:
    """'a', 'b', 'tie' or 'both_bad' by majority; 'no_majority' when the top two are level;
    'too_few_votes' under `min_votes` (or no votes)."""
    if len(choices) < max(min_votes, 1):
        return "too_few_votes"
    (top, n_top), *rest = Counter(choices).most_common()
    return "no_majority" if rest and rest[0][1] == n_top else top


def export(store: LabelStore, output: str | Path, meta_output: str | Path, *, keep_ties: bool = False,
           min_votes: int = 1) -> dict:
    """Write the preference rows to `output` and per-item metadata to `meta_output` (both JSONL);
    returns the counts of each decision and of rows written."""
    items = store.items()
    labels = store.labels(active_only=True)
    votes = votes_by_item(labels)
    counts = Counter()
    rows, meta = [], []
    for item in items:
        item_votes = votes.get(item.id, {})
        decision = decide([label.choice for label in item_votes.values()], min_votes)
        if decision in ("a", "b") and item.response_a == item.response_b:
            decision = "identical_responses"
        counts[decision] += 1
        if decision in ("a", "b"):
            chosen, rejected = (item.response_a, item.response_b) if decision == "a" else (item.response_b,
                                                                                           item.response_a)
            rows.append({"prompt": item.prompt, "chosen": chosen, "rejected": rejected})
        elif keep_ties and decision in ("tie", "both_bad"):
            rows.append({"prompt": item.prompt, "chosen": item.response_a, "rejected": item.response_b,
                         "outcome": decision})
        item_labels = [label for label in labels if label.item_id == item.id]
        meta.append({"item": item.id, "origin": item.origin, "prompt": item.prompt,
                     "response_a": item.response_a, "response_b": item.response_b, "decision": decision,
                     "votes": {c: sum(v.choice == c for v in item_votes.values()) for c in VOTES},
                     "annotators": sorted(item_votes),
                     "seconds": round(sum(label.seconds for label in item_labels), 2),
                     "labels": [{"annotator": label.annotator, "choice": label.choice,
                                 "shown_left": label.shown_left, "reason": label.reason,
                                 "seconds": label.seconds} for label in item_labels]})
    _write_jsonl(output, rows)
    _write_jsonl(meta_output, meta)
    return {"rows": len(rows), "items": len(items), **{k: counts[k] for k in (
        "a", "b", "tie", "both_bad", "no_majority", "too_few_votes", "identical_responses")}}


def _write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Written to a temporary file and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
