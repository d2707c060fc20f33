"""The gradient-variance estimator (tether.runtime.grad_stats) against answers worked out by hand and against
a slow reference (one forward and backward per sample, torch.var over the stacked gradients)."""

import pytest
import torch

from tether.runtime.grad_stats import GradientMoments, policy_gradient_variance, reinforce_losses


def test_linear_model_by_hand():
    """loss_i = −a_i · (w · x_i) ⇒ g_i = −a_i x_i. With x = (1,0), (0,1), (1,1) and a = 1, 2, 3:
    g = (−1,0), (0,−2), (−3,−3); ḡ = (−4/3, −5/3); Σ‖g_i‖² = 1 + 4 + 18 = 23; N‖ḡ‖² = 3 · 41/9 = 41/3;
    tr Cov = (23 − 41/3) / 2 = 14/3; of the mean: 14/9; ‖ḡ‖² = 41/9."""
    w = torch.zeros(2, requires_grad=True)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    a = torch.tensor([1.0, 2.0, 3.0])
    moments = GradientMoments([w])
    moments.add(-a * (x @ w))
    m = moments.metrics()
    assert m["grad_var"].item() == pytest.approx(14 / 3, rel=1e-6)
    assert m["grad_var_of_mean"].item() == pytest.approx(14 / 9, rel=1e-6)
    assert m["grad_mean_norm_sq"].item() == pytest.approx(41 / 9, rel=1e-6)
    assert w.grad is None  # the estimator leaves .grad alone


def test_chunks_and_slow_reference_agree():
    """Per-sample gradients of a small network, fed in chunks of 3, equal the stacked-gradient reference:
    Σ_j Var_j(g_ij) with the unbiased (N − 1) divisor."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    inputs, targets = torch.randn(7, 4), torch.randn(7)
    params = list(net.parameters())
    reference = []
    for i in range(7):  # slow: a forward and a backward per sample
        loss = (net(inputs[i:i + 1]).squeeze() - targets[i]) ** 2
        reference.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    reference = torch.stack(reference)  # (N, P)
    moments = GradientMoments(params)
    for start in (0, 3, 6):
        rows = slice(start, start + 3)
        moments.add((net(inputs[rows]).squeeze(-1) - targets[rows]) ** 2)
    m = moments.metrics()
    assert m["grad_var"].item() == pytest.approx(reference.var(dim=0).sum().item(), rel=1e-5)
    assert m["grad_mean_norm_sq"].item() == pytest.approx(reference.mean(0).pow(2).sum().item(), rel=1e-5)


def test_reinforce_losses_by_hand():
    """−Σ_t A · log π over the masked tokens; NaN advantages (unjudged) give 0; per-token advantages too."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    losses = reinforce_losses(logprobs, torch.tensor([2.0, -1.0, float("nan")]), mask)
    assert losses.tolist() == pytest.approx([12.0, -1.0, 0.0])
    per_token = reinforce_losses(logprobs, torch.tensor([[1.0, 0.0, 1.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]), mask)
    assert per_token.tolist() == pytest.approx([4.0, 2.0, 0.0])


def test_softmax_bandit_matches_the_closed_form():
    """A softmax policy over 3 actions at logits 0 (π = 1/3 each), every action sampled twice, rewards r = 1, 2, 3
    (no baseline). ∇_θ log π(a) = e_a − π, so g = −r_a (e_a − π) and ‖e_a − π‖² = 2/3 for every a:
    Σ‖g‖² = 2 · (1 + 4 + 9) · 2/3 = 56/3. ḡ = −(1/3) Σ_a r_a (e_a − π) = −(1/3)(r − mean(r)) = (1/3, 0, −1/3),
    N‖ḡ‖² = 6 · 2/9 = 4/3, so tr Cov = (56/3 − 4/3) / 5 = 52/15. With the baseline b = mean(r) = 2 the
    advantages are −1, 0, 1: Σ‖g‖² = 2 · 2 · 2/3 = 8/3, the same ḡ, tr Cov = (8/3 − 4/3) / 5 = 4/15 —
    13 times less variance for the same mean gradient (the lesson of exercise 15)."""
    policy = torch.nn.Module()
    policy.logits = torch.nn.Parameter(torch.zeros(3))
    actions = torch.tensor([0, 0, 1, 1, 2, 2])
    rewards = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    results = {}
    for name, advantages in (("none", rewards), ("baseline", rewards - rewards.mean())):
        logprobs = torch.log_softmax(policy.logits, -1)[actions][:, None]  # (N, 1): one-token completions
        results[name] = policy_gradient_variance(policy, lambda rows: logprobs[rows],
                                                 advantages, torch.ones(6, 1), micro_size=6)
    assert results["none"]["grad_var"].item() == pytest.approx(52 / 15, rel=1e-6)
    assert results["baseline"]["grad_var"].item() == pytest.approx(4 / 15, rel=1e-6)
    assert results["none"]["grad_mean_norm_sq"].item() == pytest.approx(2 / 9, rel=1e-6)
    assert results["baseline"]["grad_mean_norm_sq"].item() == pytest.approx(2 / 9, rel=1e-6)


def test_one_sample_is_refused():
    w = torch.zeros(2, requires_grad=True)
    moments = GradientMoments([w])
    moments.add((w * torch.ones(2)).sum()[None])
    with pytest.raises(ValueError, match="at least 2 samples"):
        moments.metrics()


@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_recipes_log_it_with_peak_memory_and_a_summary(recipe, tmp_path):
    """`log_grad_variance: true` on both online recipes: grad_var = N × grad_var_of_mean over the step's N
    completions, every step; peak_memory_mb each step and in summary.json (the largest of the steps')."""
    import json

    from tether.config import load_config
    from tether.recipes import grpo, ppo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"repeat {i}:"}) + "\n" for i in range(4)))
    module, config_cls = (ppo, ppo.PPOConfig) if recipe == "ppo" else (grpo, grpo.GRPOConfig)
    module.train(load_config(config_cls, None, [
        f"data={prompts}", "model=tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1",
        f"rewards=[{{name: '{__file__}:digit_share'}}]", f"output_dir={tmp_path / 'run'}", "report_to=[]",
        "progress=false", "batch_size=4", "group_size=4", "max_completion_length=4", "max_steps=2",
        "log_grad_variance=true", "micro_batch_size=5", "kl_coef=0.01"]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["grad_var"] == pytest.approx(row["num_completions"] * row["grad_var_of_mean"], rel=1e-5)
        assert row["grad_var"] > 0 and row["grad_mean_norm_sq"] > 0 and row["peak_memory_mb"] > 100
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["peak_memory_mb"] >= max(r["peak_memory_mb"] for r in rows)


def digit_share(prompts, completions, **columns):
    return [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]
