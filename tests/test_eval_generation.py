"""Generation eval (pass@k, maj@k), `tether eval score` and `tether eval winrate`: values checked by hand."""

import json
import math

import pytest

from tether import models
from tether.eval import generation, score, winrate
from tether.rollout import RolloutBatch

SMALL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_generation_metrics_by_hand():
    """Two prompts, n = 4.
    prompt 0: correct [T, F, F, F], answers 5, 7, 7, -  → c = 1
    prompt 1: correct [T, T, F, F], answers 3, 3, 4, 4  → c = 2
    pass@1 = (1/4 + 2/4) / 2 = 0.375
    pass@2 = (1 - C(3,2)/C(4,2) + 1 - C(2,2)/C(4,2)) / 2 = (1/2 + 5/6) / 2 = 2/3
    pass@4 = 1 (both have a correct sample)
    maj@1: 5 (right), 3 (right) → 1.      maj@2: 5 vs 7 tie → 5 first (right); 3 (right) → 1.
    maj@4: 7 beats 5 (wrong); 3 vs 4 tie → 3 first (right) → 0.5.
    """
    correct = [[True, False, False, False], [True, True, False, False]]
    answers = [["5", "7", " 7", None], ["3", "3", "4", "4"]]  # " 7" groups with "7" (spaces ignored)
    metrics = generation.generation_metrics(correct, answers, [1, 2, 4])
    assert metrics["pass@1"] == pytest.approx(0.375)
    assert metrics["pass@2"] == pytest.approx(2 / 3)
    assert metrics["pass@4"] == pytest.approx(1.0)
    assert metrics["pass@1_mean"] == pytest.approx(0.375)
    assert (metrics["maj@1"], metrics["maj@2"], metrics["maj@4"]) == (1.0, 1.0, 0.5)


def test_reported_pass_at_k_equals_the_combinatorial_value(tmp_path):
    """Sample for real from a tiny model; a user reward marks even-length completions correct. The reported
    pass@k must equal mean_p [1 - C(n - c_p, k) / C(n, k)] for the observed c_p."""
    reward_file = tmp_path / "parity.py"
    reward_file.write_text("def even(prompts, completions, **columns):\n"
                           "    return [float(len(c) % 2 == 0) for c in completions]\n")
    model, tokenizer = models.load(SMALL)
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(6)]
    n, ks = 6, [1, 2, 4, 6]
    result = generation.evaluate(model, tokenizer, rows, n=n, ks=ks, temperature=1.0, top_p=1.0, max_new_tokens=6,
                                 rewards=[f"{reward_file}:even"], keep_samples=True, batch_size=4)
    samples = result["samples"]
    assert len(samples) == len(rows) * n
    assert all(s["correct"] == (len(s["completion"]) % 2 == 0) for s in samples)
    counts = [sum(s["correct"] for s in samples if s["prompt_index"] == p) for p in range(len(rows))]
    assert [p["correct"] for p in result["per_prompt"]] == counts
    assert 0 < sum(counts) < len(samples)  # a mix of right and wrong, so the check means something
    for k in ks:
        direct = sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in counts) / len(rows)
        assert result["metrics"][f"pass@{k}"] == pytest.approx(direct, abs=1e-12)
    assert result["metrics"]["pass@1_mean"] == pytest.approx(sum(counts) / (n * len(rows)))
    assert result["rewards"]["even"]["mean"] == pytest.approx(sum(counts) / (n * len(rows)))


def test_maj_at_k_through_evaluate_with_the_math_reward(monkeypatch):
    """Hand-written completions replace the sampler; the math reward judges them and maj@k votes on the
    answers its extractor finds. prompt 0 (answer 4): 4, 5, 5, 4 → maj@1 right, maj@3 = 5 wrong, maj@4 tie →
    4 (first) right. prompt 1 (answer 9): nothing, 8, 9, 8 → maj@1: no answer → wrong, maj@3: 8 and 9 tie →
    8 (first) wrong, maj@4 = 8 wrong. pass@1 = (2/4 + 1/4) / 2 = 0.375."""
    texts = ["<answer>4</answer>", "<answer>5</answer>", "so 5", "it is 4",
             "no idea", "<answer>8</answer>", "9", "<answer>8</answer>"]

    def fake_sample_rows(model, tokenizer, rows, params, **kwargs):
        return RolloutBatch(prompt_ids=[[1]] * 2, completion_ids=[[5]] * 8, completion_logprobs=[[0.0]] * 8,
                            finish_reasons=["eos"] * 8, completions=texts, prompt_index=[0] * 4 + [1] * 4)

    monkeypatch.setattr(generation, "sample_rows", fake_sample_rows)
    rows = [{"prompt": "2+2=", "answer": "4"}, {"prompt": "4+5=", "answer": "9"}]
    result = generation.evaluate(None, None, rows, n=4, ks=[1, 3, 4], rewards=["math"])
    metrics = result["metrics"]
    assert (metrics["maj@1"], metrics["maj@3"], metrics["maj@4"]) == (0.5, 0.0, 0.5)
    assert metrics["pass@1"] == pytest.approx(0.375)
    assert metrics["pass@4"] == 1.0
    assert result["per_prompt"][1]["answers"] == [None, "8", "9", "8"]


def test_eval_score_cli(tmp_path, capsys):
    """3 completions: right, wrong, right (math 2/3); a user reward of length 1, 2, 3 weighted 0.5."""
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "1+1=", "completion": "2", "answer": "2"},
        {"prompt": "1+2=", "completion": "40", "answer": "3"},
        {"prompt": "2+2=", "completion": "<answer>4</answer>", "answer": "4"}])
    (tmp_path / "r.py").write_text("def n(prompts, completions, **kw):\n    return [1.0, 2.0, None]\n")
    (tmp_path / "rewards.yaml").write_text(f"rewards:\n  - {{name: math}}\n  - {{name: '{tmp_path}/r.py:n', "
                                           "weight: 0.5}\n")
    out = tmp_path / "scores.json"
    assert score.main(["--data", data, "--reward-config", str(tmp_path / "rewards.yaml"), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rewards"]["math"]["mean"] == pytest.approx(2 / 3)
    assert result["rewards"]["n"] == {"mean": 1.5, "std": 0.5, "none_count": 1, "count": 3}
    assert result["values"]["total"] == [1.5, 1.0, None]  # 1 + 0.5·1, 0 + 0.5·2, None (a None component)
    assert "math" in capsys.readouterr().out


def test_winrate_counts_and_rates(tmp_path):
    """Pointwise reward = completion length: A is longer on 2 prompts, equal on 1, shorter on 1."""
    prompts = ["a", "b", "c", "d"]
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": p, "completion": c}
                                           for p, c in zip(prompts, ["xx", "xx", "x", "x"])])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": p, "completion": c}
                                           for p, c in zip(prompts, ["x", "", "x", "xx"])])
    (tmp_path / "len.py").write_text("def length(prompts, completions, **kw):\n"
                                     "    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "wr.json"
    assert winrate.main(["--completions-a", a, "--completions-b", b, "--rewards", f"{tmp_path}/len.py:length",
                         "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == 0.5 and result["win_rate_ties_half"] == 0.625
    assert result["margins"] == [1.0, 2.0, 0.0, -1.0]
    assert winrate.compare([0.3, None, -0.05, 0.05], tie_margin=0.1) == {
        "wins": 1, "ties": 2, "losses": 0, "unjudged": 1, "judged": 3, "win_rate": 1 / 3, "tie_rate": 2 / 3,
        "loss_rate": 0.0, "win_rate_ties_half": 2 / 3}
