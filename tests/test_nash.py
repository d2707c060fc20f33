"""Nash-MD pieces on the tiny model: the geometric-mixture sampler draws from π^{1−β} π_ref^{β} (its log-probs
are the mixture's, checked against teacher-forced forwards of both models), the preference_model reward's
group and column opponents, and the config's one-line errors."""

import json

import pytest
import torch

from tether.cli import main as cli_main
from tether.models import load
from tether.models.preference import PreferenceScorer, load_preference_model, save_preference_marker
from tether.models.forward import model_token_logprobs
from tether.rewards import get_reward
from tether.rollout import SamplingParams
from tether.rollout.mixture import GeometricMixtureSampler

TINY = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


@pytest.fixture(scope="module")
def preference_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pm")
    model, tokenizer = load_preference_model(TINY, seed=4)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(folder), tokenizer.save_pretrained(folder)
    save_preference_marker(folder)
    return folder


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_geometric_mixture_sampler_logprobs_are_the_mixture(beta):
    """Each sampled token's log-prob equals log softmax((1−β) log π + β log π_ref) at that token, where π and
    π_ref are read by ordinary teacher-forced forwards of the sampled sequences."""
    policy, tokenizer = load(TINY, seed=1)
    reference, _ = load(TINY, seed=2)
    sampler = GeometricMixtureSampler(policy.eval(), reference.eval(), tokenizer, beta=beta)
    batch = sampler.generate(["ab:", "hello there:"], SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=5))
    t = batch.to_tensors(tokenizer.pad_token_id)
    P, mask = t["prompt_length"], t["completion_mask"]
    with torch.no_grad():
        lp_policy = model_token_logprobs(policy, t["input_ids"], t["attention_mask"])[0][:, P - 1:]
        lp_ref = model_token_logprobs(reference, t["input_ids"], t["attention_mask"])[0][:, P - 1:]
        logits_p = policy(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits[:, P - 1:-1]
        logits_r = reference(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits[:, P - 1:-1]
    mixed = torch.log_softmax((1 - beta) * logits_p.log_softmax(-1) + beta * logits_r.log_softmax(-1), -1)
    expected = mixed.gather(-1, t["input_ids"][:, P:, None]).squeeze(-1)  # (N, C)
    torch.testing.assert_close(t["sampling_logprobs"] * mask, expected * mask, atol=1e-4, rtol=0)
    if beta == 0.0:
        torch.testing.assert_close(t["sampling_logprobs"] * mask, lp_policy * mask, atol=1e-4, rtol=0)
    if beta == 1.0:
        torch.testing.assert_close(t["sampling_logprobs"] * mask, lp_ref * mask, atol=1e-4, rtol=0)


def test_preference_reward_group_and_column(preference_folder):
    """group: each completion's mean P against the others of its prompt; with two per prompt they sum to 1
    (antisymmetry). column: P against the row's column, the scorer's own number."""
    scorer = PreferenceScorer(preference_folder)
    prompts, completions = ["x:", "x:", "x:", "y:", "y:"], [" a", " bb", " ccc", " a", " dd"]
    group = get_reward("preference_model", path=str(preference_folder), opponent="group")(prompts, completions)
    p = scorer.probabilities
    expected_0 = (p(["x:"], [" a"], [" bb"])[0] + p(["x:"], [" a"], [" ccc"])[0]) / 2
    assert group[0] == pytest.approx(expected_0, abs=1e-6)
    assert group[3] + group[4] == pytest.approx(1.0, abs=1e-6)
    column = get_reward("preference_model", path=str(preference_folder), opponent="column:other")
    values = column(prompts[:2], completions[:2], other=[" zz", " a"])
    assert values == pytest.approx(p(prompts[:2], completions[:2], [" zz", " a"]), abs=1e-6)
    with pytest.raises(Exception, match="no column .other."):
        column(prompts[:1], completions[:1])
    with pytest.raises(ValueError, match="opponent must be"):
        get_reward("preference_model", path=str(preference_folder), opponent="everyone")


def test_nash_config_errors_are_one_line(tmp_path, capsys, preference_folder):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "x:"}) + "\n")
    assert cli_main(["nash", f"data={prompts}", f"preference_model={tmp_path}"]) == 2
    assert "not a preference model folder" in capsys.readouterr().err
    assert cli_main(["nash", f"data={prompts}", f"preference_model={preference_folder}", "opponent=self",
                     "group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert cli_main(["nash", f"data={prompts}", f"preference_model={preference_folder}", "mixture_coef=2"]) == 2
    assert "mixture_coef" in capsys.readouterr().err


def test_self_play_rewards_average_one_half_exactly(tmp_path, preference_folder):
    """opponent=self: each sample's reward is its mean P against the other samples of its prompt. Summed over
    a group, P(y_i ≻ y_j) + P(y_j ≻ y_i) = 1 pair by pair, so every step's mean reward is exactly 1/2 (and the
    mean advantage 0), whatever the policy samples. opponent=mixture (π_0 in the pool) runs the same loop."""
    from tether.config import load_config
    from tether.recipes import nash

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab:", "cd:", "ef:", "gh:"]))
    keys = {"model": TINY, "data": str(prompts), "preference_model": str(preference_folder), "max_steps": 2,
            "batch_size": 2, "group_size": 3, "max_completion_length": 6, "max_prompt_length": 8, "max_length": 32,
            "report_to": [], "progress": False, "learning_rate": 1e-3, "kl_coef": 0.1}
    nash.train(load_config(nash.NashConfig, None, {**keys, "opponent": "self", "output_dir": str(tmp_path / "s")}))
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/preference_model/mean"] for r in rows] == pytest.approx([0.5, 0.5], abs=1e-6)
    nash.train(load_config(nash.NashConfig, None, {**keys, "opponent": "mixture", "snapshot_steps": 1,
                                                   "eval_data": str(prompts), "output_dir": str(tmp_path / "m")}))
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["reward/preference_model/mean"] < 1 for r in rows)
    # The held-out evaluation plays the same opponent (OnlineRun.generate; without its column the reward raises):
    # P of the greedy answer against the opponent's greedy answer (exactly 1/2 where the two coincide).
    assert 0 < json.loads((tmp_path / "m" / "eval.json").read_text())["eval/preference_model/mean"] < 1


def test_mixture_pool_is_checkpointed_and_resume_equals_uninterrupted(tmp_path, preference_folder, crash_after_step):
    """opponent=mixture: the pool of past policies (π_0 and a snapshot every step) is saved in the checkpoint,
    so a run killed after step 2 and resumed to step 4 has bitwise the weights and metrics of a run never
    interrupted. Without the pool in the checkpoint the resumed step 3 would play π_0 (the only policy left)
    where the uninterrupted one plays π_1 (checked: the test then fails)."""
    from tether.config import load_config
    from tether.recipes import nash
    from tether.runtime.checkpoint import STATE_FILE

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab:", "cd:", "ef:", "gh:"]))
    keys = {"model": TINY, "data": str(prompts), "preference_model": str(preference_folder), "max_steps": 4,
            "save_steps": 2, "batch_size": 2, "group_size": 3, "max_completion_length": 6, "max_prompt_length": 8,
            "max_length": 32, "report_to": [], "progress": False, "learning_rate": 3e-2, "kl_coef": 0.1,
            "opponent": "mixture", "snapshot_steps": 1, "temperature": 1.5, "seed": 3}  # seed 3: step 3 draws π_1
    config = lambda name, **more: load_config(nash.NashConfig, None, {**keys, "output_dir": str(tmp_path / name),
                                                                      **more})  # noqa: E731
    straight = nash.train(config("straight"))
    crash_after_step(lambda: nash.train(config("resumed")), 2)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-2" / STATE_FILE, weights_only=True)
    assert len(state["extra"]["opponent"]["pool"]) == 3  # π_0, π_1, π_2
    resumed = nash.train(config("resumed", resume=True))

    a, _ = load(str(straight))
    b, _ = load(str(resumed))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    rows = [[{k: v for k, v in json.loads(line).items() if not k.startswith("time") and "per_sec" not in k}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("straight", "resumed")]
    assert [r["reward/preference_model/mean"] for r in rows[0]] == [r["reward/preference_model/mean"] for r in rows[1]]


def test_mixture_pool_keeps_pi_0_and_the_latest_snapshots():
    """after_step appends a snapshot every snapshot_steps; past max_snapshots the oldest after π_0 goes."""
    from tether.recipes.nash import NashConfig, Opponent

    policy, tokenizer = load(TINY, seed=0)
    name, weight = next(iter(policy.named_parameters()))
    start = weight.detach().clone()
    opponent = Opponent(NashConfig(model=TINY, opponent="mixture", snapshot_steps=2, max_snapshots=3), policy, None,
                        tokenizer)
    for step in range(1, 9):
        with torch.no_grad():
            weight.fill_(float(step))
        opponent.after_step(policy, step)
    assert len(opponent.pool) == 3
    assert torch.equal(opponent.pool[0][name], start)  # π_0 stays
    assert [float(p[name].flatten()[0]) for p in opponent.pool[1:]] == [6.0, 8.0]  # steps 2, 4 dropped
