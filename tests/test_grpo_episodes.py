"""`tether grpo` on episodes (`env=`): a killed-and-resumed run equals an uninterrupted one bitwise, samples.jsonl
holds readable episodes, the episode metrics are logged, and a bad `env` stops the run before any work."""

import json

import pytest
import torch

from tether import models
from tether.cli import main
from tether.recipes import grpo
from tether.recipes.grpo import GRPOConfig
from tether.config import load_config

TINY = "tiny:hidden_size=64,intermediate_size=128,num_hidden_layers=2"
TIMING = ("step_time", "tokens_per_s")


def digit_fraction(prompts, completions, **columns):
    return [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]


class DigitEnv:
    """Every digit the (random) model writes ends a turn; the environment answers " ok" twice, then the episode
    is over, with a reward of 0.5 for reaching the end."""
    stop = [str(d) for d in range(10)]

    def __init__(self, reply=" ok"):
        self.reply, self.turns = reply, 0

    def reset(self, row):
        return None

    def step(self, text):
        self.turns += 1
        return self.reply, (0.5 if self.turns == 3 else None), self.turns == 3


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * (1 + i % 3)}) + "\n" for i in range(16)))
    return path


def make_config(prompts_file, output_dir, *overrides) -> GRPOConfig:
    return load_config(GRPOConfig, None, [
        f"data={prompts_file}", f"model={TINY}", f"rewards=[{{name: '{__file__}:digit_fraction'}}]",
        f"env={__file__}:DigitEnv", "env_options={reply: ' ok'}", "max_turns=4", "max_turn_tokens=6",
        f"output_dir={output_dir}", "report_to=[]", "progress=false", "batch_size=4", "group_size=4",
        "max_completion_length=24", "learning_rate=1e-2", "lr_scheduler=constant", *overrides])


def test_resume_on_episodes_equals_uninterrupted(prompts_file, tmp_path, crash_after_step):
    options = ["max_steps=3", "save_steps=1", "sample_steps=1", "ppo_epochs=2", "num_minibatches=2"]
    straight = grpo.train(make_config(prompts_file, tmp_path / "straight", *options))
    crash_after_step(lambda: grpo.train(make_config(prompts_file, tmp_path / "resumed", *options)), 1)
    resumed = grpo.train(make_config(prompts_file, tmp_path / "resumed", *options, "resume=true"))

    a, _ = models.load(str(straight))
    b, _ = models.load(str(resumed))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert (tmp_path / "straight" / "samples.jsonl").read_text() == (tmp_path / "resumed" / "samples.jsonl").read_text()

    rows = [json.loads(line) for line in (tmp_path / "straight" / "samples.jsonl").read_text().splitlines()]
    multi = [r for r in rows if len(r["episode"]["turns"]) > 1]
    assert multi, "some episodes had several turns"
    for row in multi:  # the readable transcript is the completion, turn by turn
        assert "".join(t["text"] for t in row["episode"]["turns"]) == row["completion"]
        assert [t["role"] for t in row["episode"]["turns"]][:2] == ["model", "env"]
        assert row["episode"]["env_reward"] in (None, 0.5)
        assert row["rewards"]["env"] == (row["episode"]["env_reward"] or 0.0)  # the `env` reward: 0 if none given
        assert row["reward"] == pytest.approx(row["rewards"]["digit_fraction"] + row["rewards"]["env"])
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(1.0 <= m["episode/turns_mean"] <= 4.0 for m in metrics)
    assert all(m["episode/tool_calls_mean"] == 0.0 for m in metrics)  # no tools in this environment


def test_bad_env_stops_before_work(prompts_file, tmp_path, capsys):
    base = [f"data={prompts_file}", "model=tiny", "rewards=[{name: math}]", "report_to=[]"]
    assert main(["grpo", *base, f"output_dir={tmp_path}/a", "env=calculater"]) == 2
    assert "config key 'env'" in capsys.readouterr().err
    assert main(["grpo", *base, f"output_dir={tmp_path}/b", "env=calculator", "env_options={format: xml}"]) == 2
    assert "env_options.format" in capsys.readouterr().err
    assert main(["grpo", *base, f"output_dir={tmp_path}/c", f"env={tmp_path}/missing.py:Env"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")


def some_digit(prompts, completions, **columns):
    """1 when the episode's text has a digit anywhere (what ended a model turn in DigitEnv)."""
    return [float(any(c.isdigit() for c in text)) for text in completions]


def test_eval_over_episodes(tmp_path):
    """`tether eval --env`: pass@k over whole episodes; each sample carries its readable episode."""
    rows = [{"prompt": p} for p in ("a", "bb", "ccc")]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", TINY, "--data", str(data), "--n", "4", "--k", "1", "4", "--temperature", "1.0",
                 "--top-p", "1.0", "--max-new-tokens", "24", "--rewards", f"{__file__}:some_digit",
                 "--env", f"{__file__}:DigitEnv", "--max-turns", "4", "--max-turn-tokens", "6", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    samples = result["samples"]
    assert len(samples) == 12
    for sample in samples:
        turns = sample["episode"]["turns"]
        assert "".join(t["text"] for t in turns) == sample["completion"]
        assert sample["correct"] == any(c.isdigit() for c in sample["completion"])
    assert result["metrics"]["pass@1_mean"] == pytest.approx(sum(s["correct"] for s in samples) / 12)
    assert result["metrics"]["episode/turns_mean"] == pytest.approx(
        sum(sum(t["role"] == "model" for t in s["episode"]["turns"]) for s in samples) / 12)
    assert result["metrics"]["episode/turns_mean"] > 1.0  # several turns happened


def test_bad_env_is_a_config_error_before_torch_loads():
    """The env keys live on the torch-free OnlineConfig: a bad `env` exits 2 before torch is imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom tether.cli import main\n"
            "rc = main(['grpo', 'model=tiny', 'data=x.jsonl', 'rewards=[{name: math}]', 'env=calculater'])\n"
            "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "config key 'env': 'calculater' is unknown" in result.stderr
