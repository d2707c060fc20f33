"""Rejection-sampling fine-tuning: exactly the samples that pass the filter are kept, and SFT trains on them."""

import json

import pytest

from tether.config import ConfigError, load_config
from tether.data.loading import load_rows
from tether import supervised
from tether.recipes import rft

SMALL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1"
REWARD = """
def letters(prompts, completions, **columns):
    return [float(sum(ch.isalpha() for ch in c)) for c in completions]
"""


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_keep_samples_rules():
    samples = [{"completion": c, "reward": r} for c, r in
               [("a", 2.0), ("b", 3.0), ("a", 2.0), ("", 9.0), ("c", None), ("d", 1.0)]]
    assert rft.keep_samples(samples, threshold=2.0, top_k=0, dedupe=False) == [0, 1, 2]  # "" and None never
    assert rft.keep_samples(samples, threshold=2.0, top_k=0, dedupe=True) == [0, 1]  # the repeated "a" dropped
    assert rft.keep_samples(samples, threshold=None, top_k=2, dedupe=False) == [0, 1]  # 3.0, then the first 2.0
    assert rft.keep_samples(samples, threshold=2.5, top_k=2, dedupe=False) == [1]


@pytest.mark.parametrize("filter_keys", [{"threshold": 6.0}, {"top_k": 2}])
def test_rft_keeps_exactly_the_filtered_samples_and_trains_on_them(tmp_path, monkeypatch, filter_keys):
    (tmp_path / "reward.py").write_text(REWARD)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w}:", "id": i}) + "\n" for i, w in enumerate(["ab", "cd", "ef"])))
    sft_runs = []  # (model, rows of the data each SFT call trained on)
    original = supervised.train

    def recording_train(config):
        sft_runs.append((config.model, load_rows(config.data)))
        return original(config)

    monkeypatch.setattr(supervised, "train", recording_train)
    config = load_config(rft.RFTConfig, None, {
        "model": SMALL, "data": str(data), "output_dir": str(tmp_path / "rft"), "rounds": 2,
        "sampling": {"n": 5, "max_new_tokens": 10}, "rewards": [{"name": f"{tmp_path}/reward.py:letters"}],
        "max_steps": 2, "batch_size": 4, "progress": False, "report_to": [], **filter_keys})
    final = rft.train(config)

    metrics = read_jsonl(tmp_path / "rft" / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    for k, line in enumerate(metrics, 1):
        round_dir = tmp_path / "rft" / f"round-{k}"
        samples, kept = read_jsonl(round_dir / "samples.jsonl"), read_jsonl(round_dir / "kept.jsonl")
        assert len(samples) == 15
        assert all(s["reward"] == float(sum(ch.isalpha() for ch in s["completion"])) for s in samples)
        expected = []
        for p in range(3):  # the filter, recomputed from the written rewards
            group = [s for s in samples if s["prompt_index"] == p]
            ok = [i for i, s in enumerate(group) if s["completion"].strip()
                  and s["reward"] >= filter_keys.get("threshold", float("-inf"))]
            if "top_k" in filter_keys:
                ok = sorted(sorted(ok, key=lambda i: (-group[i]["reward"], i))[:filter_keys["top_k"]])
            expected += [group[i] for i in ok]
        assert [(s["id"], s["completion"]) for s in kept] == [(s["id"], s["completion"]) for s in expected]
        assert [s["kept"] for s in samples] == [any(s is e for e in expected) for s in samples]
        assert 0 < line["kept"] == len(kept) < len(samples)  # the filter dropped some and kept some
        assert line["prompts_with_kept"] == len({s["id"] for s in kept})
        # the round's SFT trained on exactly the kept rows, starting from the current policy
        sft_model, sft_rows = sft_runs[k - 1]
        assert [(r["prompt"], r["completion"]) for r in sft_rows] == [(s["prompt"], s["completion"]) for s in kept]
        assert sft_model == (SMALL if k == 1 else metrics[0]["model"])
        assert line["sampled_from"] == sft_model
    assert final == tmp_path / "rft" / "final" and final.resolve() == (tmp_path / "rft/round-2/sft/final").resolve()
    assert len(read_jsonl(tmp_path / "rft" / "kept.jsonl")) == sum(m["kept"] for m in metrics)


def test_rft_config_needs_a_filter():
    with pytest.raises(ConfigError, match="threshold"):
        load_config(rft.RFTConfig, None, {"data": "x.jsonl", "rewards": ["math"]})


def test_rft_resume_skips_finished_rounds_and_resumes_the_round_sft(tmp_path, crash_after_step):
    (tmp_path / "reward.py").write_text(REWARD)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w}:"}) + "\n" for w in ["ab", "cd"]))
    keys = {"model": SMALL, "data": str(data), "output_dir": str(tmp_path / "rft"), "rounds": 2, "top_k": 2,
            "sampling": {"n": 4, "max_new_tokens": 8}, "rewards": [{"name": f"{tmp_path}/reward.py:letters"}],
            "max_steps": 4, "save_steps": 2, "batch_size": 2, "progress": False, "report_to": []}
    crash_after_step(lambda: rft.train(load_config(rft.RFTConfig, None, keys)), 2,
                     where=lambda run: run.dir.parent.name == "round-2")
    round_1 = tmp_path / "rft" / "round-1"
    stamps = {p.name: p.stat().st_mtime_ns for p in [round_1 / "samples.jsonl", round_1 / "sft/final/model.safetensors",
                                                     tmp_path / "rft/round-2/kept.jsonl"]}
    rft.train(load_config(rft.RFTConfig, None, {**keys, "resume": True}))
    assert stamps == {p.name: p.stat().st_mtime_ns for p in [
        round_1 / "samples.jsonl", round_1 / "sft/final/model.safetensors", tmp_path / "rft/round-2/kept.jsonl"]}
    steps = [json.loads(line)["step"] for line in (tmp_path / "rft/round-2/sft/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # round 2's SFT continued from its step-2 checkpoint
    assert [m["round"] for m in read_jsonl(tmp_path / "rft" / "metrics.jsonl")] == [1, 2]
