"""Agreement between annotators, position bias and speed, from the labels in a store.

Seed 003 §23.3: annotators disagree, and agreement must be monitored. Categories are the judgements
'a', 'b', 'tie', 'both_bad' (about the responses, not the screen sides); skips are not judgements.
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict

from tether.annotate.store import VOTES, Label


def votes_by_item(labels: list[Label]) -> dict[int, dict[str, Label]]:
    """{item id: {annotator: their latest active judgement}}. Two labels by one annotator on one item (two
    tabs) are both kept in the store; the later one is that annotator's vote."""
    votes: dict[int, dict[str, Label]] = defaultdict(dict)
    for label in labels:  # in id order, so a later label replaces an earlier one
        if label.undone is None and label.choice in VOTES:
            votes[label.item_id][label.annotator] = label
    return dict(votes)


def cohen_kappa(first: list[str], second: list[str]) -> float:
    """Cohen's kappa of two annotators over the same items: (p_o - p_e) / (1 - p_e), with p_o the observed
    agreement and p_e = sum_c p1(c) p2(c) the agreement expected from their marginals (Cohen 1960).
    1.0 when p_e = 1 (both always gave the same single category)."""
    n = len(first)
    assert n == len(second) and n > 0, "cohen_kappa needs two equally long, non-empty label lists"
    observed = sum(x == y for x, y in zip(first, second)) / n
    counts1, counts2 = Counter(first), Counter(second)
    expected = sum(counts1[c] * counts2[c] for c in counts1) / (n * n)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(counts: list[list[int]]) -> float:
    """Fleiss' kappa from an (items x categories) table of how many raters put item i in category j
    (Fleiss 1971), in the form that allows a different number of raters n_i >= 2 per item:
        P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)),   p_j = sum_i n_ij / sum_i n_i,
        kappa = (mean_i P_i - sum_j p_j^2) / (1 - sum_j p_j^2)."""
    rows = [row for row in counts if sum(row) >= 2]
    assert rows, "fleiss_kappa needs at least one item with two or more ratings"
    per_item = [(sum(c * c for c in row) - sum(row)) / (sum(row) * (sum(row) - 1)) for row in rows]
    total = sum(sum(row) for row in rows)
    shares = [sum(row[j] for row in rows) / total for j in range(len(rows[0]))]
    observed, expected = sum(per_item) / len(per_item), sum(p * p for p in shares)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def agreement(labels: list[Label]) -> dict:
    """Pairwise percent agreement, Cohen's kappa per pair of annotators, and Fleiss' kappa, over items that
    two or more annotators judged."""
    shared = {item: votes for item, votes in votes_by_item(labels).items() if len(votes) >= 2}
    if not shared:
        return {"items_with_overlap": 0, "percent_agreement": None, "fleiss_kappa": None, "cohen_kappa": {}}
    pairs_agree = [votes[x].choice == votes[y].choice
                   for votes in shared.values() for x, y in itertools.combinations(sorted(votes), 2)]
    by_pair: dict[tuple[str, str], tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for votes in shared.values():
        for x, y in itertools.combinations(sorted(votes), 2):
            by_pair[x, y][0].append(votes[x].choice)
            by_pair[x, y][1].append(votes[y].choice)
    table = [[sum(v.choice == c for v in votes.values()) for c in VOTES] for votes in shared.values()]
    return {"items_with_overlap": len(shared),
            "percent_agreement": sum(pairs_agree) / len(pairs_agree),
            "fleiss_kappa": fleiss_kappa(table),
            "cohen_kappa": {f"{x} / {y}": {"items": len(a), "kappa": cohen_kappa(a, b)}
                            for (x, y), (a, b) in sorted(by_pair.items())}}


def position_bias(labels: list[Label]) -> dict:
    """How often the response on the left (shown as A) wins among decisive votes; 0.5 is no bias."""
    decisive = [label for label in labels if label.undone is None and label.choice in ("a", "b")]
    if not decisive:
        return {"decisive_votes": 0, "left_chosen": None, "response_a_chosen": None}
    return {"decisive_votes": len(decisive),
            "left_chosen": sum(label.choice == label.shown_left for label in decisive) / len(decisive),
            "response_a_chosen": sum(label.choice == "a" for label in decisive) / len(decisive)}


def annotator_stats(labels: list[Label]) -> dict[str, dict]:
    """Per annotator: labels made (active), their choices, median seconds per label, labels per hour."""
    by_annotator: dict[str, list[Label]] = defaultdict(list)
    for label in labels:
        if label.undone is None:
            by_annotator[label.annotator].append(label)
    result = {}
    for name, mine in sorted(by_annotator.items()):
        median = statistics.median(label.seconds for label in mine)
        result[name] = {"labels": len(mine), "choices": dict(Counter(label.choice for label in mine)),
                        "median_seconds": round(median, 2),
                        "labels_per_hour": round(3600 / median, 1) if median > 0 else None}
    return result


def stats(labels: list[Label], n_items: int) -> dict:
    """Everything the stats page and `tether annotate stats` show."""
    active = [label for label in labels if label.undone is None]
    return {"items": n_items,
            "items_judged": len(votes_by_item(active)),
            "labels": len(active),
            "undone": len(labels) - len(active),
            "choices": dict(Counter(label.choice for label in active)),
            "annotators": annotator_stats(active),
            "agreement": agreement(active),
            "position_bias": position_bias(active)}
