"""Pairwise preference model (`tether pm`): antisymmetry holds exactly, the saved folder loads with transformers
alone and scores the same, and it learns a cyclic preference (a ≻ b, b ≻ c, c ≻ a) that no Bradley-Terry reward
model can: the reward model's best is 2/3 of the cycle, the preference model reaches every pair."""

import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tether.cli import main as cli_main
from tether.config import load_config
from tether.eval.cli import eval_main
from tether.models.preference import (MARKER_FILE, PreferenceScorer, collate_pair_orders, load_preference_model,
                                      preference_logits)
from tether.recipes import preference_model, reward_model

TINY = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
CYCLE = [(" rock", " scissors"), (" scissors", " paper"), (" paper", " rock")]  # (winner, loser)


def cycle_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "play:", "chosen": w, "rejected": l} for w, l in (rng.choice(CYCLE) for _ in range(n))]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_antisymmetry_is_exact():
    """d(x, a, b) = −d(x, b, a) bit for bit, so P(a ≻ b) + P(b ≻ a) = σ(d) + σ(−d) = 1 (to float rounding
    of σ)."""
    model, tokenizer = load_preference_model(TINY, seed=2)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # noqa: E731
    prompts = [encode("x:")[:-1]] * 3
    a, b = [encode(" rock"), encode(" ab"), encode(" long answer")], [encode(" paper"), encode(" abc"), encode(" z")]
    with torch.no_grad():
        forward = collate_pair_orders(prompts, a, b, tokenizer.pad_token_id)
        backward = collate_pair_orders(prompts, b, a, tokenizer.pad_token_id)
        d_ab = preference_logits(model.eval(), forward["input_ids"], forward["attention_mask"])
        d_ba = preference_logits(model, backward["input_ids"], backward["attention_mask"])
    assert d_ab.abs().min() > 1e-3  # not trivially zero
    assert torch.equal(d_ab, -d_ba)
    total = torch.sigmoid(d_ab.double()) + torch.sigmoid(d_ba.double())
    assert torch.allclose(total, torch.ones(3, dtype=torch.float64), atol=1e-15, rtol=0)


@pytest.mark.slow
def test_preference_model_learns_a_cycle_that_a_reward_model_cannot(tmp_path):
    """Both models, same size, same 96 pairs of the cycle rock ≻ scissors ≻ paper ≻ rock, 60 steps. No scalar
    score orders a cycle (at most 2 of its 3 pairs, tests/test_preference_game.py), so the RM's accuracy on the
    cycle's three pairs is ≤ 2/3; the preference model gets all three (measured: 1.0, P(winner ≻ loser)
    0.90-0.92)."""
    data = write(tmp_path / "pairs.jsonl", cycle_rows(96, seed=0))
    held_out = write(tmp_path / "held.jsonl", [{"prompt": "play:", "chosen": w, "rejected": l} for w, l in CYCLE])
    keys = {"model": TINY, "data": data, "eval_data": held_out, "max_steps": 60, "batch_size": 16,
            "learning_rate": 3e-3, "report_to": [], "progress": False, "max_length": 64}
    pm_final = preference_model.train(load_config(preference_model.PreferenceModelConfig, None, {
        **keys, "output_dir": str(tmp_path / "pm")}))
    reward_model.train(load_config(reward_model.RewardModelConfig, None, {**keys, "output_dir": str(tmp_path / "rm")}))
    pm_eval = json.loads((tmp_path / "pm" / "eval.json").read_text())
    rm_eval = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert rm_eval["accuracy"] <= 2 / 3 + 1e-6  # float32 mean
    assert pm_eval["accuracy"] >= 0.95 and pm_eval["prob_chosen"] >= 0.8

    # The saved folder: a sequence-classification model transformers loads alone, plus the marker file.
    assert (pm_final / MARKER_FILE).is_file()
    AutoModelForSequenceClassification.from_pretrained(pm_final)
    scorer = PreferenceScorer(pm_final)
    forward = scorer.probabilities(["play:"] * 3, [w for w, _ in CYCLE], [l for _, l in CYCLE])
    backward = scorer.probabilities(["play:"] * 3, [l for _, l in CYCLE], [w for w, _ in CYCLE])
    assert min(forward) >= 0.8
    assert [f + b for f, b in zip(forward, backward)] == pytest.approx([1.0] * 3, abs=1e-6)

    # `tether eval pm`: the same accuracies, side by side with the reward model, train and held-out.
    output = tmp_path / "eval_pm.json"
    assert eval_main(["pm", "--model", str(pm_final), "--data", held_out, "--train-data", data, "--reward-model",
                      str(tmp_path / "rm" / "final"), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["held_out"]["pm"]["accuracy"] == pytest.approx(pm_eval["accuracy"])
    assert report["held_out"]["rm"]["accuracy"] == pytest.approx(rm_eval["accuracy"])
    # On the unbalanced training pairs a scalar score can at best drop the rarest match-up.
    counts = [sum(r["chosen"] == w for r in cycle_rows(96, seed=0)) for w, _ in CYCLE]
    assert report["train"]["pm"]["accuracy"] >= 0.95
    assert report["train"]["rm"]["accuracy"] <= 1 - min(counts) / 96 + 1e-6


def test_pm_command_line_reports_bad_input_in_one_line(tmp_path, capsys):
    data = write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a" * 40, "rejected": "b" * 40}])
    code = cli_main(["pm", f"data={data}", f"model={TINY}", "max_length=64", "report_to=[]",
                     f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "row 0" in err and "max_length" in err and "Traceback" not in err
    assert cli_main(["pm", "eval_fracton=0.1"]) == 2
    assert "eval_fraction" in capsys.readouterr().err


def test_a_reward_model_folder_is_not_a_preference_model(tmp_path):
    from tether.models.value import load_reward_model

    model, tokenizer = load_reward_model(TINY)
    model.save_pretrained(tmp_path), tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="reward model folder"):
        load_preference_model(str(tmp_path))
    with pytest.raises(ValueError, match="not a preference model folder"):
        PreferenceScorer(tmp_path)
