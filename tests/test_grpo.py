"""`tether grpo` end to end on the tiny model: it learns a verifiable task, β bounds the KL to the reference
where β = 0 lets a hackable reward drag the policy away, the loss splits exactly over micro-batches, a
killed-and-resumed run equals an uninterrupted one, and the edge cases (everything truncated, dynamic
sampling, schedules, KL as reward shaping, RLOO / REINFORCE / GSPO / Dr. GRPO) run to finite numbers."""

import json
import math

import pytest
import torch

from tether import models
from tether.config import ConfigError, load_config
from tether.recipes import grpo
from tether.recipes.grpo import GRPOConfig, grpo_loss
from tether.models.forward import completion_forward, take
from tether.online import global_counts
from tether.rollout import SamplingParams, get_sampler

TINY = "tiny:hidden_size=64,intermediate_size=128,num_hidden_layers=2"
TIMING = ("step_time", "tokens_per_s", "peak_memory_mb", "peak_rss_mb")  # machine-dependent


def digit_fraction(prompts, completions, **columns):
    """The verifiable (and hackable) task: the share of the completion's characters that are digits."""
    return [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * (1 + i % 3), "answer": str(i)}) + "\n" for i in range(16)))
    return path


def make_config(prompts_file, output_dir, *overrides) -> GRPOConfig:
    return load_config(GRPOConfig, None, [
        f"data={prompts_file}", f"model={TINY}", f"rewards=[{{name: '{__file__}:digit_fraction'}}]",
        f"output_dir={output_dir}", "report_to=[]", "progress=false", "batch_size=4", "group_size=8",
        "max_completion_length=8", "learning_rate=1e-2", "lr_scheduler=constant", *overrides])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sequence_kl_to_start(final_dir, prompts, n=32) -> float:
    """Monte-Carlo KL(π_final ‖ π_start) of whole completions: mean over samples of Σ_t log π_final − log π_start."""
    policy, tokenizer = models.load(str(final_dir))
    start, _ = models.load(TINY, seed=0)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    batch = get_sampler("builtin", policy, tokenizer).generate(ids, SamplingParams(n=n, max_new_tokens=8, seed=123))
    tensors = batch.to_tensors(tokenizer.pad_token_id)
    with torch.no_grad():
        log_ratio = completion_forward(policy, tensors)[0] - completion_forward(start, tensors)[0]  # (N, C)
    return float((log_ratio * tensors["completion_mask"]).sum(-1).mean())


# ----------------------------------------------------------------------------- the loss, exactly


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_loss_and_gradient_split_over_micro_batches(prompts_file, tmp_path, mode):
    """The loss of a minibatch equals the SUM of its micro-batches' losses when each divides by the
    minibatch's global counts (tether.ops.aggregate), and so do the gradients: gradient accumulation and
    data parallelism change nothing. Checked with β > 0 (KL term), clip-higher, dual clip and entropy bonus."""
    config = make_config(prompts_file, tmp_path, f"loss_aggregation={mode}", "kl_coef=0.1", "clip_high=0.28",
                         "dual_clip=3.0", "entropy_coef=0.01")
    model, tokenizer = models.load(TINY, seed=0)
    samples = get_sampler("builtin", model, tokenizer).generate(
        [tokenizer("x")["input_ids"], tokenizer("xyz")["input_ids"]], SamplingParams(n=3, max_new_tokens=6, seed=1))
    batch = samples.to_tensors(tokenizer.pad_token_id)
    N, C = batch["completion_mask"].shape
    generator = torch.Generator().manual_seed(0)
    batch["loss_mask"] = batch["completion_mask"]
    batch["old_logprobs"] = batch["sampling_logprobs"] + 0.3 * torch.randn(N, C, generator=generator)
    batch["ref_logprobs"] = batch["sampling_logprobs"] + 0.3 * torch.randn(N, C, generator=generator)
    batch["advantages"] = torch.randn(N, generator=generator)
    index = list(range(N))
    counts = global_counts(batch, torch.tensor(index), config.max_completion_length)

    def loss_and_grads(parts):
        model.zero_grad()
        total = 0.0
        for part in parts:
            loss, _, _ = grpo_loss(model, take(batch, part), config, beta=0.1, counts=counts, temperature=1.0)
            loss.backward()
            total += loss.detach()
        return total, [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = loss_and_grads([index])
    split, split_grads = loss_and_grads([index[:1], index[1:4], index[4:]])
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-5)
    for a, b in zip(split_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_grpo_raises_reward(prompts_file, tmp_path):
    """Mean reward (share of digits) climbs from ~0.14 by at least +0.3 absolute within 15 steps."""
    grpo.train(make_config(prompts_file, tmp_path / "run", "max_steps=15", "kl_coef=0.0", "learning_rate=5e-3"))
    rewards = [row["reward_mean"] for row in read_metrics(tmp_path / "run")]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last >= first + 0.3, rewards


@pytest.mark.slow
def test_kl_penalty_bounds_drift_from_reference(prompts_file, tmp_path):
    """The digit reward is hackable: with β = 0 the policy collapses onto digits and its KL to the start
    keeps growing; with β = 1 (k3 in the loss) it stays near the reference. Sequence KL measured after training."""
    steps = ["max_steps=30"]
    grpo.train(make_config(prompts_file, tmp_path / "free", *steps, "kl_coef=0.0"))
    grpo.train(make_config(prompts_file, tmp_path / "anchored", *steps, "kl_coef=1.0"))
    free = sequence_kl_to_start(tmp_path / "free" / "final", ["x", "xx"])
    anchored = sequence_kl_to_start(tmp_path / "anchored" / "final", ["x", "xx"])
    assert anchored < 3.0, (free, anchored)
    assert free >= 5 * anchored, (free, anchored)
    logged = [row["kl_ref_seq"] for row in read_metrics(tmp_path / "anchored")]
    assert max(logged) < 5.0, logged


# ----------------------------------------------------------------------------- resume, edge cases


def test_resume_equals_uninterrupted(prompts_file, tmp_path, crash_after_step):
    """Kill after step 2 (checkpointed) and resume to step 4: weights are bitwise those of a run that was
    never interrupted, and every metric (the rewards' cumulative counters too) and samples.jsonl are equal
    except timing. Exercises the prompt cursor
    under dynamic sampling, the adaptive β, minibatch shuffles over two epochs and the sampler seeds."""
    options = ["max_steps=4", "save_steps=2", "ppo_epochs=2", "num_minibatches=2", "dynamic_sampling=true",
               "kl_controller=adaptive_proportional", "kl_target=0.5", "kl_horizon=100", "sample_steps=1",
               "group_size=4", "lr_scheduler=cosine",
               # math (weight 0) only counts: its cumulative counters must go on from the checkpoint's
               f"rewards=[{{name: '{__file__}:digit_fraction'}}, {{name: math, weight: 0}}]"]
    straight = grpo.train(make_config(prompts_file, tmp_path / "straight", *options))
    crash_after_step(lambda: grpo.train(make_config(prompts_file, tmp_path / "resumed", *options)), 2)
    resumed = grpo.train(make_config(prompts_file, tmp_path / "resumed", *options, "resume=true"))

    a, _ = models.load(str(straight))
    b, _ = models.load(str(resumed))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    strip = lambda row: {k: v for k, v in row.items() if k not in TIMING and not k.startswith("time/")}  # noqa: E731
    rows_a, rows_b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [strip(r) for r in rows_a] == [strip(r) for r in rows_b]
    assert rows_a[-1]["kl_coef"] != rows_a[0]["kl_coef"]  # the adaptive β did move (and was restored)
    assert rows_b[-1]["reward/math/no_answer"] > rows_b[1]["reward/math/no_answer"] > 0  # counted on, not from 0
    assert (tmp_path / "straight" / "samples.jsonl").read_text() == (tmp_path / "resumed" / "samples.jsonl").read_text()


def test_everything_truncated_gives_finite_loss(prompts_file, tmp_path):
    """max_completion_length=1 with EOS banned → every completion is truncated; with mask_truncated (DAPO
    overlong filtering) no token carries a loss: the loss is exactly 0, gradients finite, nothing skipped."""
    grpo.train(make_config(prompts_file, tmp_path / "run", "max_steps=2", "max_completion_length=1",
                           "mask_truncated=true", "kl_coef=0.1"))
    for row in read_metrics(tmp_path / "run"):
        assert row["truncated_frac"] == 1.0
        assert row["loss"] == 0.0 and math.isfinite(row["grad_norm"])
        assert "skipped_steps" not in row


def test_min_completion_length_fixes_the_length(prompts_file, tmp_path):
    """min = max: every completion has exactly that length (EOS is banned until then), where the same run without
    it has some completions that EOS ended earlier."""
    lengths = {}
    for minimum in (0, 8):
        run_dir = tmp_path / f"min{minimum}"
        grpo.train(make_config(prompts_file, run_dir, "max_steps=3", "sample_steps=1",
                               f"min_completion_length={minimum}", "max_completion_length=8", "temperature=2.0"))
        rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        lengths[minimum] = [(row["length"], row["finish_reason"]) for row in rows]
    assert len(lengths[8]) == 3 * 4 * 8 and set(lengths[8]) == {(8, "length")}
    assert any(reason == "eos" and length < 8 for length, reason in lengths[0])
    with pytest.raises(ConfigError, match="'min_completion_length'"):
        make_config(prompts_file, tmp_path / "bad", "min_completion_length=9")


def test_non_finite_step_is_skipped_not_applied(prompts_file, tmp_path, monkeypatch):
    """A NaN loss (here injected into the first step) gives a NaN gradient norm: the guard skips that
    optimizer step, counts it, and training goes on with finite steps."""
    calls, real = [], grpo.clipped_policy_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) == 1 else loss), metrics

    monkeypatch.setattr(grpo, "clipped_policy_loss", poisoned)
    grpo.train(make_config(prompts_file, tmp_path / "run", "max_steps=2"))
    first, second = read_metrics(tmp_path / "run")
    assert first["grad_norm"] == "nan" and first["skipped_steps"] == 1
    assert math.isfinite(second["loss"]) and math.isfinite(second["grad_norm"]) and second["skipped_steps"] == 1


@pytest.mark.parametrize("options", [
    ["advantage=rloo"],
    ["advantage=reinforce", "group_size=1"],
    ["advantage=reinforce_pp", "kl_penalty=reward", "kl_estimator=k1"],
    ["advantage=dr_grpo", "loss_aggregation=token_sum_norm", "importance_level=sequence"],
])
def test_family_members_run(prompts_file, tmp_path, options):
    """RLOO, REINFORCE (G = 1, running baseline), REINFORCE++ with KL in the reward, Dr. GRPO + GSPO."""
    grpo.train(make_config(prompts_file, tmp_path / "run", "max_steps=2", "sample_steps=2", *options))
    rows = read_metrics(tmp_path / "run")
    assert all(math.isfinite(row["loss"]) for row in rows)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2} and len(samples) == rows[-1]["num_completions"]
    assert {"prompt", "completion", "reward", "rewards", "advantage", "finish_reason"} <= set(samples[0])


def test_schedules_and_dynamic_sampling(prompts_file, tmp_path):
    """G goes 2 → 6 and the temperature 1.2 → 0.8 linearly over 3 steps; dynamic sampling leaves no
    zero-variance group in the training batch when refills are allowed."""
    grpo.train(make_config(prompts_file, tmp_path / "run", "max_steps=4", "group_size=2", "group_size_end=6",
                           "temperature=1.2", "temperature_end=0.8", "schedule_steps=3", "dynamic_sampling=true",
                           "max_sampling_tries=8"))
    rows = read_metrics(tmp_path / "run")
    assert [r["group_size"] for r in rows] == [2, 3, 5, 6]  # round(2 + 4 s/3)
    assert [round(r["temperature"], 6) for r in rows] == [1.2, round(1.2 - 0.4 / 3, 6), round(1.2 - 0.8 / 3, 6), 0.8]
    for r in rows:
        assert r["num_completions"] == 4 * r["group_size"]
        assert r["adv_std"] > 0 and (r["dynamic_sampling_filled_groups"] == 0 or r["sampling_tries"] == 8)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown reward 'mathh'.*Did you mean 'math'"):
        load_config(GRPOConfig, None, ["data=x.jsonl", "rewards=[{name: mathh}]"])
    with pytest.raises(ConfigError, match="'rewards'"):
        load_config(GRPOConfig, None, ["data=x.jsonl"])
    with pytest.raises(ConfigError, match="'group_size'"):
        load_config(GRPOConfig, None, ["rewards=[{name: math}]", "group_size=1"])
    with pytest.raises(ConfigError, match="'max_length'"):
        load_config(GRPOConfig, None, ["rewards=[{name: math}]", "max_prompt_length=500"])
    with pytest.raises(ConfigError, match="'kl_coef'"):
        load_config(GRPOConfig, None, ["rewards=[{name: math}]", "kl_coef=0", "kl_controller=adaptive_simple"])


def test_cli_help_lists_options(capsys):
    from tether.cli import main

    assert main(["grpo", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("group_size", "kl_coef", "clip_high", "dynamic_sampling", "importance_level", "loss_aggregation",
                "advantage", "temperature_end", "rewards", "mask_truncated"):
        assert f"  {key} (" in out, key
    assert main(["grpo", "rewards=[{name: nope}]", "data=x.jsonl"]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err
