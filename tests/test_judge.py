"""LLM judge: expected scores from next-token probabilities, worked by hand on fixed logits, and the real
forward read at the right position."""

import math

import pytest
import torch

from tether.models import load
from tether.rewards import get_reward
from tether.rewards.judge import Judge, expected_scores, make_judge_reward

TINY = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def fixed_logits(judge, weights: dict[str, float], rows: int, other: float = 0.0):
    """(rows, V) logits whose softmax gives each named token probability ∝ weight; `other` is the weight
    of one further token that is not a score token (mass the judge must ignore)."""
    vocab = len(judge.tokenizer)
    logits = torch.full((rows, vocab), -math.inf)
    for text, weight in weights.items():
        logits[:, judge.tokenizer.convert_tokens_to_ids(text)] = math.log(weight)
    if other:
        logits[:, judge.tokenizer.convert_tokens_to_ids("z")] = math.log(other)
    return logits


def test_pointwise_expected_score_by_hand(monkeypatch):
    """p(1..5) ∝ 1, 2, 3, 4, 0 → E[score] = (1·1 + 2·2 + 3·3 + 4·4 + 5·0) / 10 = 3.0, however much
    probability sits on tokens that are not scores (here 90% of it on "z")."""
    reward = make_judge_reward(model=TINY, device="cpu")
    weights = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 1e-30}
    monkeypatch.setattr(reward.judge, "next_token_logits", lambda texts: fixed_logits(reward.judge, weights,
                                                                                      len(texts), other=90))
    assert reward(["q1", "q2"], ["a1", "a2"]) == pytest.approx([3.0, 3.0])


def test_yes_no_is_the_probability_of_yes(monkeypatch):
    reward = make_judge_reward(model=TINY, scale="yes-no", score_tokens={"y": 1.0, "n": 0.0}, device="cpu")
    monkeypatch.setattr(reward.judge, "next_token_logits",
                        lambda texts: fixed_logits(reward.judge, {"y": 0.6, "n": 0.15}, len(texts), other=0.25))
    assert reward(["q"], ["a"]) == pytest.approx([0.8])  # 0.6 / (0.6 + 0.15)


def test_pairwise_preference_averages_both_orders(monkeypatch):
    """The completion as A: P(A) = 0.9; swapped (reference as A): P(A) = 0.3, so the completion, now B, is
    preferred with 0.7. Preference = (0.9 + 0.7) / 2 = 0.8. A row without a reference cannot be judged."""
    reward = make_judge_reward(model=TINY, mode="pairwise", device="cpu")
    calls = []

    def logits(texts):
        calls.append(texts)
        p_a = 0.9 if len(calls) == 1 else 0.3
        return fixed_logits(reward.judge, {"A": p_a, "B": 1 - p_a}, len(texts))

    monkeypatch.setattr(reward.judge, "next_token_logits", logits)
    result = reward(["q", "q2"], ["mine", "x"], reference=["theirs", None])
    assert result[0] == pytest.approx(0.8) and result[1] is None
    assert "Response A: mine" in calls[0][0] and "Response A: theirs" in calls[1][0]
    with pytest.raises(ValueError, match="'reference' column"):
        reward(["q"], ["a"])


def test_expected_scores_none_when_no_mass_on_score_tokens():
    probs = torch.tensor([[0.2, 0.2], [0.0, 0.0], [0.01, 0.0]])
    assert expected_scores(probs, [1.0, 0.0], min_mass=0.05) == [pytest.approx(0.5), None, None]


def test_real_forward_reads_the_next_token_of_each_prompt_despite_padding():
    model, tokenizer = load(TINY, seed=1)
    judge = Judge(model, tokenizer, ["1", "2", "3", "4", "5"], device="cpu", batch_size=3, chat_template="never")
    texts = ["Score:", "a much longer prompt. Score:", "x"]
    batched = judge.score_token_probs(texts)  # (3, 5), left-padded together
    ids = [tokenizer(t)["input_ids"] for t in texts]
    with torch.no_grad():
        alone = torch.stack([torch.softmax(model(input_ids=torch.tensor([i])).logits[0, -1], -1)[judge.token_ids]
                             for i in ids])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # The chat template wraps the text as a user turn and opens the assistant turn.
    chat = Judge(model, tokenizer, ["1"], device="cpu")
    assert chat.render("rate it").endswith("rate it<|im_end|>\n<|im_start|>assistant\n")


def test_registry_builds_the_judge_and_scores_lie_on_the_scale():
    reward = get_reward("judge", model=TINY, device="cpu")
    scores = reward(["what is 2+2?", "hi"], ["4", "hello"])
    assert len(scores) == 2 and all(1.0 <= s <= 5.0 for s in scores)


def test_multi_token_score_labels_are_refused():
    with pytest.raises(ValueError, match="'10' is 2 tokens"):
        make_judge_reward(model=TINY, score_tokens={"1": 1.0, "10": 10.0}, device="cpu")
