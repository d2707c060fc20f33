"""`tether demo rlhf` and `tether demo dpo` at reduced size learn what they claim, measured by the hidden gold rule.

The gold rule (+1 per good word, −1 per bad word) labels the preference pairs and judges every policy; no
trainer sees it. The SFT policy says good and bad words alike (gold ≈ 0), so a gain of 1.0 means the policy
now says, on average, one more good word than bad per answer than it did. Every policy is judged on fresh
samples at temperature 1 (16 per topic, 128 in all; the gold std is ≈ 1.3, so one mean's standard error
is ≈ 0.12 and the bounds below sit many errors away from the measured values in docs/demo.md).
"""

import json

import pytest

from tether.demo import rlhf


def check_outputs(folder, summary, images):
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["results"].keys() == summary["results"].keys()
    assert saved["seed"] == 0 and saved["wall_time_s"] > 0
    assert (folder / "report.html").stat().st_size > 0
    for image in images:
        assert (folder / image).stat().st_size > 0, image


@pytest.mark.slow
def test_rlhf_demo_learns_and_shows_over_optimisation(tmp_path):
    summary = rlhf.run(str(tmp_path), seed=0, size="small", which="rlhf")
    check_outputs(tmp_path, summary, ["gold_vs_kl.png", "proxy_vs_kl.png", "gold_training.png"])
    results = summary["results"]
    sft = results["sft"]

    # The reward model learned the gold ranking of pairs it never saw (chance is 0.5).
    assert summary["reward_model"]["held_out_accuracy"] >= 0.9

    # With the KL penalty, PPO and GRPO against the learned reward raise the GOLD reward well above SFT's.
    for name in ("ppo_beta0.05", "grpo_beta0.05"):
        assert results[name]["gold"] >= sft["gold"] + 1.5, (name, results[name], sft)
        assert results[name]["proxy"] >= sft["proxy"] + 3.0, (name, results[name], sft)

    # Without it (β = 0) the policy over-optimises the proxy: it ends with a proxy reward at least as high as
    # the penalised run's, far from π_sft, while its gold reward has fallen from its peak back to SFT's level.
    hacked, kept = results["grpo_beta0"], results["grpo_beta0.05"]
    trajectory = summary["over_optimisation"]["grpo_beta0"]
    assert hacked["proxy"] >= kept["proxy"] - 0.1
    assert trajectory["proxy_gain_after_peak"] > 0
    assert trajectory["peak_gold"] >= hacked["gold"] + 0.5
    assert hacked["gold"] <= sft["gold"] + 0.75
    assert hacked["gold"] <= kept["gold"] - 1.5
    assert hacked["kl"] >= 3 * kept["kl"]


@pytest.mark.slow
def test_dpo_demo_compares_methods_by_gold_reward(tmp_path):
    summary = rlhf.run(str(tmp_path), seed=0, size="small", which="dpo")
    check_outputs(tmp_path, summary, [])
    results = summary["results"]
    assert list(results) == ["sft", "dpo", "ppo", "grpo", "best_of_8"]
    sft = results["sft"]
    # Every method improves the gold reward over the SFT policy it starts from (or samples from).
    assert results["dpo"]["gold"] >= sft["gold"] + 1.0, results["dpo"]
    assert results["best_of_8"]["gold"] >= sft["gold"] + 1.0, results["best_of_8"]
    for name in ("ppo", "grpo"):
        assert results[name]["gold"] >= sft["gold"] + 1.5, (name, results[name])
    # Best-of-N stays close to π_sft: KL = log N − (N−1)/N ≈ 1.2 nats for N = 8.
    assert results["best_of_8"]["kl"] == pytest.approx(1.204, abs=1e-3)
