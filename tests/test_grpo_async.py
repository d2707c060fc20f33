"""GRPO with asynchronous rollouts (`async_rollouts: k`) and engine/trainer importance correction (TIS, masked IS)
on the tiny model: the policy lag is logged per step and never exceeds k, stale batches show a non-zero
trainer-vs-engine log-prob gap (and none in sync mode, where the sampler's log-probs are π_old), the IS options
run and log their clip / mask fractions, and an async run still learns the digit task."""

import json

import pytest

from tether.config import ConfigError, load_config
from tether.recipes import grpo
from tether.recipes.grpo import GRPOConfig

TINY = "tiny:hidden_size=64,intermediate_size=128,num_hidden_layers=2"


def digit_fraction(prompts, completions, **columns):
    return [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * (1 + i % 3), "answer": str(i)}) + "\n" for i in range(16)))
    return path


def run(prompts_file, output_dir, *overrides) -> list[dict]:
    grpo.train(load_config(GRPOConfig, None, [
        f"data={prompts_file}", f"model={TINY}", f"rewards=[{{name: '{__file__}:digit_fraction'}}]",
        f"output_dir={output_dir}", "report_to=[]", "progress=false", "batch_size=4", "group_size=8",
        "max_completion_length=8", "learning_rate=1e-2", "lr_scheduler=constant", "kl_coef=0.0", *overrides]))
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
def test_async_staleness_gap_and_corrections(prompts_file, tmp_path, correction):
    rows = run(prompts_file, tmp_path / "run", "max_steps=5", "async_rollouts=2", f"is_correction={correction}",
               "is_cap=1.5", "is_low=0.7")
    staleness = [row["staleness"] for row in rows]
    assert staleness[0] == 0 and all(0 <= lag <= 2 for lag in staleness), staleness
    stale = [row for row in rows if row["staleness"] > 0]
    assert stale, staleness  # the worker ran ahead at least once
    assert all(row["logprob_gap"] > 1e-3 and row["engine_kl"] >= 0 for row in stale), rows
    assert all(row["logprob_gap"] < 1e-4 for row in rows if row["staleness"] == 0)  # same weights: rounding only
    key = {"none": "is_clip_frac", "tis": "is_clip_frac", "mis": "is_mask_frac"}[correction]
    assert all(0 <= row[key] <= 1 for row in rows)


def test_sync_mode_logs_no_gap(prompts_file, tmp_path):
    rows = run(prompts_file, tmp_path / "run", "max_steps=2")
    assert [row["staleness"] for row in rows] == [0.0, 0.0]
    assert "logprob_gap" not in rows[0]  # the sampler's log-probs are π_old: no second forward, no gap


def test_async_config_errors():
    with pytest.raises(ConfigError, match="async_rollouts"):
        load_config(GRPOConfig, None, ["data=x.jsonl", "rewards=[{name: math}]", "async_rollouts=-1"])
    with pytest.raises(ConfigError, match="old_logprobs"):
        load_config(GRPOConfig, None, ["data=x.jsonl", "rewards=[{name: math}]", "async_rollouts=1",
                                       "old_logprobs=sampler"])
    with pytest.raises(ConfigError, match="is_cap"):
        load_config(GRPOConfig, None, ["data=x.jsonl", "rewards=[{name: math}]", "is_cap=0.5"])


@pytest.mark.slow
def test_async_grpo_learns(prompts_file, tmp_path):
    """One step off-policy (async_rollouts=1, TIS): the share of digits still climbs by +0.3 within 15 steps."""
    rows = run(prompts_file, tmp_path / "run", "max_steps=15", "async_rollouts=1", "is_correction=tis",
               "learning_rate=5e-3")
    rewards = [row["reward_mean"] for row in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last >= first + 0.3, rewards
