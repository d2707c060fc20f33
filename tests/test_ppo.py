"""`tether ppo` end to end on the tiny model: it learns with either critic, the adaptive KL controller moves
β by its rule step after step, a killed-and-resumed run (critic included) equals an uninterrupted one, and
a reward-model folder works as the reward."""

import json
import math

import pytest
import torch

from tether import models
from tether.config import ConfigError, load_config
from tether.models.value import RewardScorer, load_reward_model, load_value_model
from tether.recipes import ppo
from tether.recipes.ppo import PPOConfig

TINY = "tiny:hidden_size=64,intermediate_size=128,num_hidden_layers=2"
TIMING = ("step_time", "tokens_per_s", "peak_memory_mb", "peak_rss_mb")  # machine-dependent


def digit_fraction(prompts, completions, **columns):
    """The verifiable task: the share of the completion's characters that are digits."""
    return [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * (1 + i % 3)}) + "\n" for i in range(16)))
    return path


def make_config(prompts_file, output_dir, *overrides) -> PPOConfig:
    return load_config(PPOConfig, None, [
        f"data={prompts_file}", f"model={TINY}", f"rewards=[{{name: '{__file__}:digit_fraction'}}]",
        f"output_dir={output_dir}", "report_to=[]", "progress=false", "batch_size=16", "max_completion_length=8",
        "learning_rate=3e-3", "lr_scheduler=constant", *overrides])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_raises_reward(prompts_file, tmp_path, critic):
    """Mean reward (share of digits) climbs from ~0.13 by at least +0.2 absolute within 20 steps (β = 0.05,
    GAE, 4 epochs, value clipping); the critic learns something (explained variance > 0 late in training)."""
    ppo.train(make_config(prompts_file, tmp_path / "run", "max_steps=20", f"critic={critic}"))
    rows = read_metrics(tmp_path / "run")
    rewards = [row["reward_mean"] for row in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last >= first + 0.2, rewards
    assert max(row["explained_variance"] for row in rows[-10:]) > 0
    assert all(math.isfinite(row["value_loss"]) and 0 <= row["clip_frac_high"] <= 1 for row in rows)
    if critic == "separate":
        critic_model, _ = load_value_model(str(tmp_path / "run" / "critic"))
        assert critic_model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)).shape == (1, 3)
    else:
        assert (tmp_path / "run" / "critic" / "value_head.safetensors").is_file()


@pytest.mark.parametrize("mode", ["adaptive_simple", "adaptive_proportional"])
def test_adaptive_kl_controller_moves_beta_by_its_rule(prompts_file, tmp_path, mode):
    """β_{s+1} follows from (β_s, the sequence KL measured at step s) by the controller's rule:
    simple (Schulman 2017): ×2 above 1.5 target, ÷2 below target/1.5; proportional (Ziegler 2019):
    × (1 + clip(KL/target − 1, ±0.2) · n/horizon) with n = completions per step."""
    target, horizon, n = 0.5, 32, 16
    ppo.train(make_config(prompts_file, tmp_path / "run", "max_steps=6", f"kl_controller={mode}", "kl_coef=0.1",
                          f"kl_target={target}", f"kl_horizon={horizon}", "learning_rate=2e-2"))
    rows = read_metrics(tmp_path / "run")
    for now, after in zip(rows, rows[1:]):
        beta, kl = now["kl_coef"], now["kl_ref_seq"]
        if mode == "adaptive_simple":
            expected = beta * 2 if kl > 1.5 * target else beta / 2 if kl < target / 1.5 else beta
        else:
            expected = beta * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)
        assert after["kl_coef"] == pytest.approx(expected, rel=1e-6)
    assert len({row["kl_coef"] for row in rows}) > 1


def test_resume_equals_uninterrupted(prompts_file, tmp_path, crash_after_step):
    """Kill after the step-2 checkpoint, resume to step 4: policy weights bitwise equal, the separate critic
    restored (its values, hence every later metric, equal), metrics equal except timing."""
    options = ["max_steps=4", "save_steps=2", "ppo_epochs=2", "num_minibatches=2", "batch_size=8",
               "kl_controller=adaptive_simple", "kl_target=0.5", "group_size=2"]
    straight = ppo.train(make_config(prompts_file, tmp_path / "straight", *options))
    crash_after_step(lambda: ppo.train(make_config(prompts_file, tmp_path / "resumed", *options)), 2)
    resumed = ppo.train(make_config(prompts_file, tmp_path / "resumed", *options, "resume=true"))

    a, _ = models.load(str(straight))
    b, _ = models.load(str(resumed))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    critic_a, _ = load_value_model(str(tmp_path / "straight" / "critic"))
    critic_b, _ = load_value_model(str(tmp_path / "resumed" / "critic"))
    for (name, x), (_, y) in zip(critic_a.state_dict().items(), critic_b.state_dict().items()):
        assert torch.equal(x, y), name
    strip = lambda row: {k: v for k, v in row.items() if k not in TIMING and not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in read_metrics(tmp_path / "straight")] == [strip(r) for r in read_metrics(tmp_path / "resumed")]


def test_reward_model_folder_scores_completions(prompts_file, tmp_path):
    """`reward_model: folder` scores every completion with that model (logged as reward/reward_model): the
    samples written equal RewardScorer's own scores of the same (prompt, completion) pairs."""
    rm, tokenizer = load_reward_model("tiny", seed=3)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    config = load_config(PPOConfig, None, [
        f"data={prompts_file}", f"model={TINY}", f"reward_model={tmp_path / 'rm'}", f"output_dir={tmp_path / 'run'}",
        "report_to=[]", "progress=false", "batch_size=4", "max_completion_length=6", "max_steps=1", "sample_steps=1",
        "critic=shared", "kl_coef=0"])
    ppo.train(config)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    expected = RewardScorer(str(tmp_path / "rm"), device="cpu").score([s["prompt"] for s in samples],
                                                                      [s["completion"] for s in samples])
    assert [s["rewards"]["reward_model"] for s in samples] == pytest.approx(expected, abs=1e-5)
    assert "reward/reward_model/mean" in read_metrics(tmp_path / "run")[0]


def test_config_errors_and_help(capsys):
    with pytest.raises(ConfigError, match="'rewards'"):
        load_config(PPOConfig, None, ["data=x.jsonl"])
    with pytest.raises(ConfigError, match="'critic_model'"):
        load_config(PPOConfig, None, ["rewards=[{name: math}]", "critic=shared", "critic_model=somewhere"])
    with pytest.raises(ConfigError, match="unknown reward 'lenght'.*Did you mean 'length'"):
        load_config(PPOConfig, None, ["rewards=[{name: lenght}]"])
    from tether.cli import main

    assert main(["ppo", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("critic", "critic_model", "reward_model", "gamma", "lam", "whiten_advantages", "value_clip",
                "value_coef", "kl_controller", "kl_target", "kl_horizon", "entropy_coef", "ppo_epochs"):
        assert f"  {key} (" in out, key


def test_async_rollouts_run_on_the_shared_core(prompts_file, tmp_path):
    """async_rollouts is an OnlineConfig key: PPO gets it from the shared core too. The worker samples one step
    ahead (the first batch fresh, then at most one update behind, and at least once behind), and π_old is
    recomputed on the trained weights (not the stale sampler's log-probs), so with one epoch and one minibatch
    every step's policy ratio is 1."""
    ppo.train(make_config(prompts_file, tmp_path / "run", "max_steps=4", "async_rollouts=1", "ppo_epochs=1"))
    rows = read_metrics(tmp_path / "run")
    staleness = [row["staleness"] for row in rows]
    assert staleness[0] == 0 and all(lag in (0, 1) for lag in staleness) and 1 in staleness, staleness
    assert all(abs(row["ratio_mean"] - 1) < 1e-4 for row in rows), [row["ratio_mean"] for row in rows]
