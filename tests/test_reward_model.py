"""Reward model, value model and `tether eval rm`: scalar heads read where they should be, saved folders load
with transformers alone and score the same, calibration by hand, and a tiny reward model that learns a hidden
rule ("the longer number wins") to >= 90% held-out accuracy."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tether.cli import main as cli_main
from tether.config import load_config
from tether.data.batching import pad
from tether.eval.reward_model import calibration_table, evaluate_margins
from tether.eval.reward_model import main as eval_rm_main
from tether.models import load
from tether.models.value import (
    RewardScorer,
    ValueHead,
    ValueModel,
    forward_with_values,
    from_causal_lm,
    load_reward_model,
    load_value_model,
    sequence_rewards,
)
from tether.data.splits import split_held_out
from tether.recipes.reward_model import RewardModelConfig, train
from tether.rewards import get_reward

TINY = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
SEQS = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]


def batch(sequences, pad_id=0, side="right"):
    return pad(sequences, pad_id, side), pad([[1] * len(s) for s in sequences], 0, side)


@pytest.fixture(scope="module")
def reward_model():
    model, tokenizer = load_reward_model(TINY, seed=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a head big enough to tell tokens apart
    return model.eval(), tokenizer


def test_reward_model_from_causal_lm_keeps_the_body():
    causal, tokenizer = load(TINY, seed=3)
    model = from_causal_lm(causal, pad_token_id=tokenizer.pad_token_id)
    ids, mask = batch(SEQS)
    body = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(body, expected)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id


def test_reward_is_read_at_the_last_non_padding_token(reward_model):
    model, tokenizer = reward_model
    ids, mask = batch(SEQS, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = sequence_rewards(model, ids, mask)  # (3,)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (3, T, H)
        last = mask.sum(-1) - 1
        by_hand = hidden[torch.arange(3), last] @ model.score.weight[0]
        alone = torch.stack([sequence_rewards(model, *batch([s], tokenizer.pad_token_id))[0] for s in SEQS])
    torch.testing.assert_close(rewards, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards, alone, atol=1e-5, rtol=0)  # padding does not change a score


def test_value_model_per_token_values_and_padding_sides(reward_model):
    model, tokenizer = reward_model
    value_model = ValueModel(model)
    right_ids, right_mask = batch(SEQS, tokenizer.pad_token_id)
    left_ids, left_mask = batch(SEQS, tokenizer.pad_token_id, side="left")
    with torch.no_grad():
        right = value_model(right_ids, right_mask)  # (3, T)
        left = value_model(left_ids, left_mask)
        rewards = sequence_rewards(model, right_ids, right_mask)
    T = right.shape[1]
    for b, seq in enumerate(SEQS):
        n = len(seq)
        torch.testing.assert_close(right[b, :n], left[b, T - n:], atol=1e-5, rtol=0)
        # A critic initialised from a reward model: its value at the last token is the reward.
        torch.testing.assert_close(right[b, n - 1], rewards[b], atol=1e-5, rtol=0)


def test_value_model_save_load_roundtrip(tmp_path, reward_model):
    model, tokenizer = reward_model
    ids, mask = batch(SEQS, tokenizer.pad_token_id)
    ValueModel(model).save_pretrained(tmp_path / "critic", tokenizer)
    loaded, _ = load_value_model(str(tmp_path / "critic"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), ValueModel(model)(ids, mask))
    # From a causal LM folder: the body is the LM's, the head is new and seeded.
    causal, _ = load(TINY, seed=5)
    causal.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    a, _ = load_value_model(str(tmp_path / "lm"), seed=0)
    b, _ = load_value_model(str(tmp_path / "lm"), seed=0)
    torch.testing.assert_close(a.model.model.embed_tokens.weight, causal.model.embed_tokens.weight)
    torch.testing.assert_close(a.model.score.weight, b.model.score.weight)


def test_value_head_on_a_shared_body(tmp_path):
    policy, tokenizer = load(TINY, seed=2)
    head = ValueHead.for_model(policy)
    ids, mask = batch(SEQS, tokenizer.pad_token_id, side="left")
    with torch.no_grad():
        logits, values = forward_with_values(policy, head, ids, mask)  # (B, T, V), (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        expected_logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        hidden = policy.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(values, hidden @ head.linear.weight[0])
    head.save(tmp_path)
    torch.testing.assert_close(ValueHead.load(tmp_path).linear.weight, head.linear.weight)


def test_reward_model_lora_trains_the_head():
    from tether.models import LoraConfig

    model, _ = load_reward_model(TINY, lora=LoraConfig(r=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)


def test_scorer_matches_a_direct_forward_and_ignores_batch_size(reward_model):
    model, tokenizer = reward_model
    prompts, completions = ["ab?", "c?", "hello"], ["yes", "no thanks", "x"]
    scores = RewardScorer(model, tokenizer, device="cpu", batch_size=2).score(prompts, completions)
    single = RewardScorer(model, tokenizer, device="cpu", batch_size=1).score(prompts, completions)
    by_hand = []
    for p, c in zip(prompts, completions):
        ids = tokenizer(p + c)["input_ids"] + [tokenizer.eos_token_id]  # string prompt + completion + EOS
        with torch.no_grad():
            by_hand.append(float(sequence_rewards(model, *batch([ids]))))
    assert scores == pytest.approx(by_hand, abs=1e-5) and single == pytest.approx(by_hand, abs=1e-5)


def test_split_held_out_is_seeded_and_disjoint():
    train_items, held = split_held_out(list(range(20)), 0.25, seed=3)
    assert len(held) == 5 and sorted(train_items + held) == list(range(20))
    assert split_held_out(list(range(20)), 0.25, seed=3) == (train_items, held)
    assert split_held_out(list(range(20)), 0.0, seed=3) == (list(range(20)), [])


# ----------------------------------------------------------------------------- eval rm


def test_calibration_table_by_hand():
    """margins 0, ln 3, -ln 3 → σ = 0.5, 0.75, 0.25. Each pair is counted as given (preferred = 1) and
    swapped (1 - σ, preferred = 0): predictions 0.5 0.75 0.25 | 0.5 0.25 0.75 with outcomes 1 1 1 | 0 0 0.
    Two bins: [0, .5) holds 0.25 (1), 0.25 (0) → predicted 0.25, observed 0.5;
    [.5, 1] holds 0.5 (1), 0.75 (1), 0.5 (0), 0.75 (0) → predicted 0.625, observed 0.5.
    ECE = 2/6 · 0.25 + 4/6 · 0.125 = 1/6."""
    rows, ece = calibration_table([0.0, math.log(3), -math.log(3)], bins=2)
    assert [r["count"] for r in rows] == [2, 4]
    assert rows[0]["predicted"] == pytest.approx(0.25) and rows[0]["observed"] == pytest.approx(0.5)
    assert rows[1]["predicted"] == pytest.approx(0.625) and rows[1]["observed"] == pytest.approx(0.5)
    assert ece == pytest.approx(1 / 6)
    result = evaluate_margins([0.0, math.log(3), -math.log(3)], bins=2)
    assert (result["accuracy"], result["ties"], result["mean_margin"]) == (pytest.approx(1 / 3), 1, pytest.approx(0))
    # Empty bins are reported, not dropped.
    rows, _ = calibration_table([10.0], bins=4)
    assert [r["count"] for r in rows] == [1, 0, 0, 1] and rows[1]["observed"] is None


def test_help_lists_the_options(capsys):
    assert cli_main(["rm", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("center_rewards_coef", "margin_column", "eval_fraction", "skip_bad_rows", "chat_template"):
        assert option in out


# ----------------------------------------------------------------------------- learning


def number_pairs(n, rng):
    """The hidden rule: of two numbers, the one with more digits is preferred."""
    rows = []
    for _ in range(n):
        a, b = rng.sample(range(1, 7), 2)
        longer, shorter = (str(rng.randint(10 ** (k - 1), 10 ** k - 1)) for k in (max(a, b), min(a, b)))
        rows.append({"prompt": "number:", "chosen": longer, "rejected": shorter})
    return rows


def test_reward_model_learns_a_hidden_rule_and_final_loads_with_transformers(tmp_path, capsys):
    rng = random.Random(0)
    for name, n in (("train", 256), ("eval", 64)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in number_pairs(n, rng)))
    config = load_config(RewardModelConfig, None, {
        "model": "tiny:hidden_size=64,intermediate_size=128,num_hidden_layers=2", "data": str(tmp_path / "train.jsonl"),
        "eval_data": str(tmp_path / "eval.jsonl"), "output_dir": str(tmp_path / "run"), "max_steps": 40,
        "batch_size": 16, "learning_rate": 3e-3, "max_length": 32, "report_to": [], "progress": False})
    final = train(config)

    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["accuracy"] >= 0.9 and result["margin"] > 1.0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected"} <= set(metrics[-1])
    assert metrics[-1]["loss"] < metrics[0]["loss"]

    # final/ is an ordinary transformers model that scores exactly as tether's scorer does.
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    scorer = RewardScorer(str(final), device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()][:8]
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    ids = [scorer.encode(p, c) for p, c in zip(prompts, completions)]
    with torch.no_grad():
        hf_scores = hf(*batch(ids, hf.config.pad_token_id)).logits[:, 0].tolist()
    assert scorer.score(prompts, completions) == pytest.approx(hf_scores, abs=1e-5)

    # The `reward_model` reward function and `tether eval rm` use the same scores.
    reward = get_reward("reward_model", path=str(final), device="cpu")
    assert reward(prompts, completions) == pytest.approx(hf_scores, abs=1e-5)
    out = tmp_path / "rm_eval.json"
    assert eval_rm_main(["--model", str(final), "--data", str(tmp_path / "eval.jsonl"), "--bins", "5",
                         "--output", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["accuracy"] == pytest.approx(result["accuracy"]) and len(report["calibration"]) == 5
    assert report["mean_margin"] == pytest.approx(result["margin"], abs=1e-4)
    assert "ECE" in capsys.readouterr().out
