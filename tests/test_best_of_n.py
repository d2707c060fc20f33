"""Best-of-N: the choice rule by hand, and a real run that must pick the argmax-reward sample of every prompt."""

import json

import pytest

from tether.cli import main
from tether.config import ConfigError, load_config
from tether.recipes.best_of_n import BestOfNConfig, run, select

SMALL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1"
# reward = completion length in characters, except the prompt "skip:" which cannot be judged (None).
REWARD = """
def length(prompts, completions, **columns):
    return [None if p == "skip:" else float(len(c)) for p, c in zip(prompts, completions)]
"""


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_select_rules():
    assert select([0.5, 2.0, None, 2.0], top_k=1) == [1]  # argmax; of the two 2.0s the first wins
    assert select([None, None], top_k=1) == []  # nothing judged: nothing chosen
    assert select([0.0, 1.0, 1.0, 0.5], threshold=0.5) == [1, 2, 3]  # >= threshold, in sample order
    assert select([0.0, 1.0, 3.0, 2.0], top_k=2) == [2, 3]  # the two best, returned in sample order
    assert select([3.0, 1.0, 2.0, 0.9], threshold=1.0, top_k=2) == [0, 2]


def test_best_is_the_argmax_of_the_written_samples(tmp_path):
    (tmp_path / "reward.py").write_text(REWARD)
    data = tmp_path / "prompts.jsonl"
    prompts = ["a:", "bb:", "skip:", "cat:", "dog:"]
    data.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    config = load_config(BestOfNConfig, None, {
        "model": SMALL, "data": str(data), "output_dir": str(tmp_path / "bon"), "write_all": True,
        "sampling": {"n": 6, "max_new_tokens": 12, "temperature": 1.0},
        "rewards": [{"name": f"{tmp_path}/reward.py:length"}]})
    best_path = run(config)

    best, every = read_jsonl(best_path), read_jsonl(tmp_path / "bon" / "all.jsonl")
    assert len(every) == 6 * len(prompts)
    assert all(s["reward"] == (None if s["prompt"] == "skip:" else float(len(s["completion"]))) for s in every)
    assert [b["prompt"] for b in best] == ["a:", "bb:", "cat:", "dog:"]  # "skip:" has only None rewards
    for row in best:
        samples = [s for s in every if s["id"] == row["id"]]
        rewards = [s["reward"] if s["completion"].strip() else None for s in samples]
        top = max(r for r in rewards if r is not None)
        expected = samples[rewards.index(top)]  # the first sample with the highest reward
        assert (row["completion"], row["reward"], row["sample_index"]) == (
            expected["completion"], top, expected["sample_index"])
        assert [s["chosen"] for s in samples] == [s is expected for s in samples]
    assert len({s["completion"] for s in every}) > len(prompts)  # the samples really differ
    summary = json.loads((tmp_path / "bon" / "summary.json").read_text())
    assert (summary["prompts"], summary["written"], summary["skipped_prompts"]) == (5, 4, 1)
    assert summary["skipped_rows"] == [2]
    assert summary["none_rewards"] == 6


def test_config_needs_a_reward_and_cli_help(capsys):
    with pytest.raises(ConfigError, match="rewards"):
        load_config(BestOfNConfig, None, {"data": "x.jsonl"})
    with pytest.raises(ConfigError, match="sampling.*n must be >= 1"):
        load_config(BestOfNConfig, None, {"data": "x.jsonl", "rewards": ["math"], "sampling": {"n": 0}})
    assert main(["best-of-n", "--help"]) == 0
    assert "sampling.n" in capsys.readouterr().out
