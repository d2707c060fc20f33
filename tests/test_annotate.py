"""`tether annotate`: the label store (durable across SIGKILL), export, agreement statistics against values worked
out by hand, the server's API, bad input, and the loop annotate → export → rm → dpo with a scripted annotator."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tether.annotate import (AnnotateServer, Item, LabelStore, StoreError, cohen_kappa, decide, export, fleiss_kappa,
                             read_pairs, stats)
from tether.annotate.agreement import agreement
from tether.annotate.cli import _is_loopback
from tether.annotate.server import render_markdown
from tether.annotate.store import left_response
from tether.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PREF_TRAIN = ROOT / "examples" / "data" / "pref_train.jsonl"


def pairs(n: int) -> list[Item]:
    return [Item(i, f"q{i}?", f"yes, q{i}", f"no, q{i}") for i in range(n)]


def make_store(tmp_path, n=4, overlap=1) -> LabelStore:
    store = LabelStore(tmp_path / "labels.db")
    store.initialise(pairs(n), overlap=overlap, seed=0)
    return store


class Client:
    """The page's requests, as a script."""

    def __init__(self, url: str):
        self.url = url

    def next(self, annotator: str) -> dict:
        with urllib.request.urlopen(f"{self.url}api/next?annotator={annotator}", timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def label(self, annotator: str, item: int, choice: str, seconds: float = 1.0, reason: str = "") -> dict:
        return self.post("api/label", {"annotator": annotator, "item": item, "choice": choice, "seconds": seconds,
                                       "reason": reason})


@pytest.fixture
def served(tmp_path):
    store = make_store(tmp_path, n=6, overlap=2)
    server = AnnotateServer(store, host="127.0.0.1", port=0)
    server.start_in_thread()
    yield store, Client(server.url)
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- agreement, by hand


def test_cohen_kappa_by_hand():
    """Cohen's textbook table: yes/yes 20, yes/no 5, no/yes 10, no/no 15 of 50. p_o = 35/50 = 0.7;
    rater 1 says yes 25/50, rater 2 30/50: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7-0.5)/(1-0.5) = 0.4."""
    first = ["y"] * 25 + ["n"] * 25
    second = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) == 1.0  # p_e = 1: one category only


def test_fleiss_kappa_by_hand():
    """3 items, 3 raters, categories (a, b): counts [3,0], [2,1], [0,3].
    P_i = (sum n_ij^2 - 3) / 6 = 1, 1/3, 1 → mean 7/9; p_a = 5/9, p_b = 4/9 → P_e = 41/81;
    kappa = (63/81 - 41/81) / (40/81) = 22/40 = 0.55."""
    assert fleiss_kappa([[3, 0], [2, 1], [0, 3]]) == pytest.approx(0.55)
    # Fleiss (1971)'s worked example as reprinted widely: 10 subjects, 14 raters, 5 categories → 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)
    assert fleiss_kappa([[1, 0], [2, 0], [0, 2]]) == pytest.approx(1.0)  # items with one rating are left out


def test_agreement_and_position_bias_from_a_store(tmp_path):
    """bob: a, a, b, tie; amy: a, b, b, tie on items 0-3. Percent agreement 3/4. Cohen: p_o = 3/4; marginals
    bob (a 2, b 1, tie 1), amy (a 1, b 2, tie 1) → p_e = (2+2+1)/16 = 5/16; kappa = (12-5)/11 = 7/11."""
    store = make_store(tmp_path)
    for annotator, choices in (("bob", "a a b tie"), ("amy", "a b b tie")):
        for item, choice in enumerate(choices.split()):
            store.add_label(item, annotator, choice, shown_left="a" if item % 2 == 0 else "b")
    result = agreement(store.labels())
    assert result["items_with_overlap"] == 4 and result["percent_agreement"] == pytest.approx(0.75)
    assert result["cohen_kappa"]["amy / bob"]["kappa"] == pytest.approx(7 / 11)
    # Decisive votes: items 0, 1, 2 for both (6); left was 'a' on item 0 and 2 and 'b' on item 1.
    # bob: a(left) a(right) b(right); amy: a(left) b(left) b(right) → left chosen 3/6, response_a 3/6.
    bias = stats(store.labels(), 4)["position_bias"]
    assert (bias["decisive_votes"], bias["left_chosen"], bias["response_a_chosen"]) == (6, 0.5, 0.5)


def test_decide_by_majority():
    assert decide(["a", "a", "b"]) == "a"
    assert decide(["a", "b"]) == "no_majority"
    assert decide(["tie", "tie", "a"]) == "tie"
    assert decide([]) == "too_few_votes" and decide(["b"], min_votes=2) == "too_few_votes"


# ----------------------------------------------------------------------------- store and export


def test_store_serves_in_order_respects_overlap_and_undo(tmp_path):
    store = make_store(tmp_path, n=3, overlap=1)
    assert store.next_item("bob").id == 0
    store.add_label(0, "bob", "a", shown_left="a")
    assert store.next_item("amy").id == 1  # item 0 has its one vote
    store.add_label(1, "amy", "skip", shown_left="b")
    assert store.next_item("bob").id == 1  # a skip is not a vote: item 1 still needs one
    store.add_label(1, "bob", "b", shown_left="a")
    assert store.undo("bob") == 1 and store.next_item("bob").id == 1  # the undone pair comes back first
    assert store.progress("bob") == {"annotator": "bob", "done": 1, "left": 2, "total": 3, "items": 3, "votes": 1,
                                     "votes_wanted": 3}
    assert [label.undone is not None for label in store.labels(active_only=False)] == [False, False, True]
    with pytest.raises(StoreError, match="unknown choice"):
        store.add_label(2, "bob", "maybe", shown_left="a")
    with pytest.raises(StoreError, match="no item 9"):
        store.add_label(9, "bob", "a", shown_left="a")


def test_store_resumes_and_refuses_other_pairs(tmp_path):
    store = make_store(tmp_path, n=3)
    store.add_label(0, "bob", "a", shown_left="a")
    store.close()
    again = LabelStore(tmp_path / "labels.db")
    assert again.initialise(pairs(3), overlap=1, seed=0) is True and again.next_item("bob").id == 1
    with pytest.raises(StoreError, match="another set of pairs"):
        again.initialise(pairs(4), overlap=1, seed=0)


def test_export_rows_metadata_and_ties(tmp_path):
    """Item 0: a; item 1: b (chosen = response_b); item 2: tie; item 3: unlabelled."""
    store = make_store(tmp_path, n=4)
    store.add_label(0, "bob", "a", shown_left="b", seconds=2.0, reason="polite")
    store.add_label(1, "bob", "b", shown_left="a", seconds=3.0)
    store.add_label(2, "bob", "tie", shown_left="a", seconds=4.0)
    counts = export(store, tmp_path / "p.jsonl", tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "q0?", "chosen": "yes, q0", "rejected": "no, q0"},
                    {"prompt": "q1?", "chosen": "no, q1", "rejected": "yes, q1"}]
    assert (counts["rows"], counts["tie"], counts["too_few_votes"]) == (2, 1, 1)
    meta = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert meta[0]["votes"] == {"a": 1, "b": 0, "tie": 0, "both_bad": 0} and meta[0]["annotators"] == ["bob"]
    assert meta[0]["labels"][0] == {"annotator": "bob", "choice": "a", "shown_left": "b", "reason": "polite",
                                    "seconds": 2.0}
    assert [m["decision"] for m in meta] == ["a", "b", "tie", "too_few_votes"]
    export(store, tmp_path / "p.jsonl", tmp_path / "m.jsonl", keep_ties=True)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[2] == {"prompt": "q2?", "chosen": "yes, q2", "rejected": "no, q2", "outcome": "tie"}


def test_read_pairs_formats_and_bad_rows_name_file_line_field(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "response_a": "x", "response_b": "y"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    items = read_pairs(str(good))
    assert [(i.prompt, i.response_a, i.response_b) for i in items] == [("p", "x", "y"), ("p", "c", "r")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response_a": "x", "response_b": "y"}) + "\n\n"
                   + json.dumps({"prompt": "p", "response_a": "x", "response_b": ""}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl \(line 3\), row 1, field 'response_b'"):
        read_pairs(str(bad))


def test_cli_refuses_a_bad_pairs_file_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response_a": "x"}) + "\n")
    assert cli_main(["annotate", f"data={bad}", f"output_dir={tmp_path / 'run'}", "port=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "line 1" in err and "field 'response_b'" in err
    assert cli_main(["annotate", "model_a=tiny", "prompts=x.jsonl"]) == 2
    assert "needs both model_a and model_b" in capsys.readouterr().err
    assert cli_main(["annotate", f"output_dir={tmp_path / 'empty'}", "port=0"]) == 2
    assert "no pairs to label" in capsys.readouterr().err
    assert cli_main(["annotate", "export", f"output_dir={tmp_path / 'nothing'}"]) == 2
    assert "no label store" in capsys.readouterr().err


def test_sampled_pairs_are_the_samplers_two_samples(tmp_path):
    """model= samples two responses per prompt with tether's sampler: the same two a direct call gives."""
    from tether.annotate.cli import AnnotateConfig
    from tether.annotate.pairs import sample_pairs
    from tether.models import load
    from tether.rollout import SamplingParams, get_sampler

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("3+4=", "12+5=")))
    items = sample_pairs(AnnotateConfig(prompts=str(prompts), model="tiny", max_new_tokens=6, device="cpu"))
    model, tokenizer = load("tiny")
    batch = get_sampler("builtin", model, tokenizer).generate(["3+4=", "12+5="],
                                                              SamplingParams(n=2, max_new_tokens=6, seed=0))
    assert [(i.prompt, i.response_a, i.response_b) for i in items] == [
        ("3+4=", batch.completions[0], batch.completions[1]), ("12+5=", batch.completions[2], batch.completions[3])]
    # Two identical models with one seed answer alike: a side-by-side pair of one model with itself is equal.
    same = sample_pairs(AnnotateConfig(prompts=str(prompts), model_a="tiny", model_b="tiny", max_new_tokens=6,
                                       device="cpu"))
    assert all(i.response_a == i.response_b for i in same)


def test_markdown_guidelines_are_escaped():
    text = "# Rules\nPrefer **correct** answers, then *short* ones.\n\n- no `<script>`\n- be kind\n\n1. first"
    assert render_markdown(text) == (
        "<h2>Rules</h2>\n<p>Prefer <strong>correct</strong> answers, then <em>short</em> ones.</p>\n"
        "<ul>\n<li>no <code>&lt;script&gt;</code></li>\n<li>be kind</li>\n</ul>\n<ol>\n<li>first</li>\n</ol>")
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and not _is_loopback("0.0.0.0")


# ----------------------------------------------------------------------------- the server's API


def test_api_sides_are_random_per_annotator_and_recorded(served):
    store, client = served
    state = client.next("bob")
    item = state["item"]
    left = left_response(item["id"], "bob", seed=0)
    assert item["left"] == (f"yes, q{item['id']}" if left == "a" else f"no, q{item['id']}")
    assert client.next("bob")["item"] == item  # a reload shows the same sides
    client.label("bob", item["id"], "left", seconds=2.5, reason="clearer")
    label = store.labels()[-1]
    assert (label.choice, label.shown_left, label.seconds, label.reason) == (left, left, 2.5, "clearer")
    sides = {left_response(i, name, 0) for i in range(6) for name in ("bob", "amy", "eve")}
    assert sides == {"a", "b"}
    with pytest.raises(urllib.error.HTTPError) as err:
        client.label("bob", 0, "maybe")
    assert err.value.code == 400


def test_concurrent_labels_on_one_item_are_all_kept(served):
    """Two tabs (and two people) label item 0 at the same moment: every label is stored, none lost."""
    store, client = served
    barrier = threading.Barrier(8)

    def tab(name, choice):
        barrier.wait()
        client.label(name, 0, choice)

    threads = [threading.Thread(target=tab, args=(name, choice)) for name in ("bob", "amy")
               for choice in ("left", "right", "tie", "both_bad")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([label for label in store.labels() if label.item_id == 0]) == 8
    report = stats(store.labels(), 6)
    assert report["items_judged"] == 1 and report["labels"] == 8  # each annotator's latest label is their vote
    assert report["agreement"]["items_with_overlap"] == 1
    with urllib.request.urlopen(client.url + "stats", timeout=30) as response:
        page = response.read().decode()
    assert "Fleiss&#x27; kappa" in page and "<td>bob</td><td>4</td>" in page


@pytest.mark.slow  # a server process of its own: its start (imports) takes most of the ~5-20 s
def test_labels_acknowledged_before_sigkill_are_all_kept(tmp_path):
    """The server runs as `tether annotate` in its own process; a client labels as fast as it can and the server
    is killed with SIGKILL mid-stream. Every label the client saw acknowledged is in the store, and a new
    server resumes each annotator where they were."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "response_a": f"yes {i}", "response_b": f"no {i}"})
                            + "\n" for i in range(200)))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "tether", "annotate", f"data={data}", f"output_dir={run}",
                               "port=0", "overlap=2"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        url = line[line.index("http://"):].split()[0]
        client, acked, enough = Client(url), [], threading.Event()

        def annotate(name):
            try:
                while True:
                    item = client.next(name)["item"]
                    client.label(name, item["id"], "left" if item["id"] % 3 else "tie")
                    acked.append((name, item["id"]))
                    if len(acked) >= 40:
                        enough.set()
            except (urllib.error.URLError, http.client.HTTPException, OSError):  # the server is gone
                return

        workers = [threading.Thread(target=annotate, args=(name,)) for name in ("bob", "amy")]
        for worker in workers:
            worker.start()
        assert enough.wait(120)
        server.send_signal(signal.SIGKILL)
        for worker in workers:
            worker.join(30)
    finally:
        server.kill()
        server.wait()
    store = LabelStore(run / "labels.db")
    stored = {(label.annotator, label.item_id) for label in store.labels()}
    assert len(acked) >= 40 and set(acked) <= stored and len(stored) - len(set(acked)) <= 2
    for name in ("bob", "amy"):
        assert store.next_item(name).id == max(i for who, i in stored if who == name) + 1
    counts = export(store, tmp_path / "p.jsonl", tmp_path / "m.jsonl")
    assert counts["rows"] + counts["tie"] + counts["no_majority"] == len({i for _, i in stored})


# ----------------------------------------------------------------------------- the loop


def label_through_the_api(store: LabelStore, annotators: dict) -> None:
    """Serve `store` and let each scripted annotator {name: choose(item view) -> 'left' | 'right'} label every
    pair open to them, as the page would."""
    server = AnnotateServer(store, host="127.0.0.1", port=0)
    server.start_in_thread()
    client = Client(server.url)
    try:
        for name, choose in annotators.items():
            state = client.next(name)
            while state["item"] is not None:
                state = client.label(name, state["item"]["id"], choose(state["item"]))
    finally:
        server.shutdown()
        server.server_close()


def yes_side(item: dict) -> str:
    """The hidden rule of examples/data/pref_*.jsonl: "yes, ..." is better than "no, ..."."""
    return "left" if item["left"].startswith("yes") else "right"


def other_side(side: str) -> str:
    return "right" if side == "left" else "left"


@pytest.mark.slow
def test_annotate_export_rm_dpo_loop_with_a_scripted_annotator(tmp_path):
    """Two scripted annotators (overlap 2) label 96 TRL rows of examples/data/pref_train.jsonl by the hidden
    rule ("yes, ..." is better), one of them wrong on every 8th pair. Export keeps the 84 pairs with a majority;
    `tether rm` on them reaches >= 90% held-out accuracy on pref_eval, and `tether dpo` on them ranks >= 90% of
    the held-out pairs the same way. Control: an annotator who prefers "no, ..." gives a reward model that is
    wrong on >= 90% of the held-out pairs, so the labels, not the data's order, are what is learnt."""
    from tether.config import load_config
    from tether.recipes import dpo, reward_model

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(PREF_TRAIN.read_text().splitlines(keepends=True)[:96]))
    store = LabelStore(tmp_path / "annotate" / "labels.db")
    store.initialise(read_pairs(str(data)), overlap=2, seed=0)
    label_through_the_api(store, {
        "careful": yes_side,
        "hasty": lambda item: other_side(yes_side(item)) if item["id"] % 8 == 0 else yes_side(item)})
    assert cli_main(["annotate", "export", f"output_dir={tmp_path / 'annotate'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "annotate" / "preferences.jsonl").read_text().splitlines()]
    assert len(rows) == 96 - 12 and all(row["chosen"].startswith("yes") for row in rows)  # 12 split votes left out
    report = stats(store.labels(), 96)
    assert report["agreement"]["percent_agreement"] == pytest.approx(84 / 96)

    def train_rm(preferences, name):
        reward_model.train(load_config(reward_model.RewardModelConfig, None, {
            **common, "data": str(preferences), "output_dir": str(tmp_path / name), "max_steps": 24,
            "learning_rate": 1e-3}))
        return json.loads((tmp_path / name / "eval.json").read_text())["accuracy"]

    common = {"model": "tiny", "eval_data": str(ROOT / "examples" / "data" / "pref_eval.jsonl"), "batch_size": 16,
              "max_length": 64, "report_to": [], "progress": False, "warmup_steps": 4}
    assert train_rm(tmp_path / "annotate" / "preferences.jsonl", "rm") >= 0.9
    dpo.train(load_config(dpo.DPOConfig, None, {
        **common, "data": str(tmp_path / "annotate" / "preferences.jsonl"), "output_dir": str(tmp_path / "dpo"),
        "max_steps": 20, "learning_rate": 5e-4}))
    assert json.loads((tmp_path / "dpo" / "eval.json").read_text())["rewards_accuracy"] >= 0.9

    contrary = LabelStore(tmp_path / "contrary" / "labels.db")
    contrary.initialise(read_pairs(str(data)), overlap=1, seed=0)
    label_through_the_api(contrary, {"contrarian": lambda item: other_side(yes_side(item))})
    export(contrary, tmp_path / "contrary" / "preferences.jsonl", tmp_path / "contrary" / "items.jsonl")
    assert train_rm(tmp_path / "contrary" / "preferences.jsonl", "rm_contrary") <= 0.1
