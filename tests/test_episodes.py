"""Multi-turn episodes: the completion mask marks exactly the model-written tokens, the tensors line up with a
teacher-forced forward like a single-turn rollout's, budgets hold, and a fixed seed gives the same episodes."""

from __future__ import annotations

import pytest
import torch

from tether.envs import get_env
from tether.models.forward import completion_forward, model_token_logprobs
from tether.models.tiny import tiny_model, tiny_tokenizer
from tether.rollout import RolloutBatch, Sampler, SamplingParams, get_sampler
from tether.rollout.episodes import EpisodeBatch, concat_batches, generate_episodes, select_rows


class ScriptedSampler(Sampler):
    """A policy that writes given turns (the i-th call's text for each context), with log-prob −(k+1)/10 for its
    k-th token of the call, so that every value in the batch says where it came from."""

    def __init__(self, tokenizer, turns: list[str]):
        self.tokenizer, self.turns, self.calls = tokenizer, turns, 0

    def generate(self, prompts, params: SamplingParams) -> RolloutBatch:
        text = self.turns[self.calls]
        self.calls += 1
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        reason = "eos" if text.endswith("</s>") else "stop"
        rows = len(prompts) * params.n
        return RolloutBatch(prompt_ids=[list(p) for p in prompts], completion_ids=[ids] * rows,
                            completion_logprobs=[[-(k + 1) / 10 for k in range(len(ids))]] * rows,
                            finish_reasons=[reason] * rows, completions=[text] * rows,
                            prompt_index=[i for i in range(len(prompts)) for _ in range(params.n)])


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_scripted_episode_mask_is_exactly_the_model_tokens(tokenizer):
    """prompt "2*3=" ; model "<calculator>2*3</calculator>" (28 tokens: one per character) ; calculator
    "<output>6</output>" (18) ; model "<answer>6</answer></s>" (19: 18 characters and EOS).
    Hand-built mask: 28 ones, 18 zeros, 19 ones; log-probs −0.1…−2.8, 0 × 18, −0.1…−1.9."""
    sampler = ScriptedSampler(tokenizer, ["<calculator>2*3</calculator>", "<answer>6</answer></s>"])
    prompt = tokenizer("2*3=")["input_ids"]
    batch = generate_episodes(sampler, [prompt], [{"prompt": "2*3="}], get_env("calculator"),
                              SamplingParams(n=1, max_new_tokens=100), max_turns=4)
    expected_mask = [1] * 28 + [0] * 18 + [1] * 19
    assert batch.completion_masks == [expected_mask]
    assert batch.completions == ["<calculator>2*3</calculator><output>6</output><answer>6</answer>"]
    assert batch.turns[0] == [{"role": "model", "text": "<calculator>2*3</calculator>"},
                              {"role": "env", "text": "<output>6</output>"},
                              {"role": "model", "text": "<answer>6</answer>"}]
    assert (batch.tool_calls, batch.tool_errors, batch.finish_reasons) == ([1], [0], ["eos"])
    tensors = batch.to_tensors(tokenizer.pad_token_id)
    P = tensors["prompt_length"]
    assert tensors["completion_mask"][0].tolist() == expected_mask  # the online losses' mask
    assert tensors["attention_mask"][0, P:].tolist() == [1] * 65  # the observation stays in context
    expected_logprobs = [-(k + 1) / 10 for k in range(28)] + [0.0] * 18 + [-(k + 1) / 10 for k in range(19)]
    assert torch.allclose(tensors["sampling_logprobs"][0], torch.tensor(expected_logprobs))
    observation_ids = tokenizer("<output>6</output>", add_special_tokens=False)["input_ids"]
    assert tensors["input_ids"][0, P + 28:P + 46].tolist() == observation_ids


def test_max_turns_and_episode_budget(tokenizer):
    looping = ["<calculator>1+1</calculator>"] * 3
    batch = generate_episodes(ScriptedSampler(tokenizer, looping), [tokenizer("q")["input_ids"]], [{}],
                              get_env("calculator"), SamplingParams(n=2, max_new_tokens=200), max_turns=3)
    # 3 model turns of 28 tokens, 2 observations of 18 in between (the last turn's call is not run: no turns left)
    assert batch.num_turns == [3, 3] and [sum(m) for m in batch.completion_masks] == [84, 84]
    assert [len(ids) for ids in batch.completion_ids] == [84 + 36] * 2
    short = generate_episodes(ScriptedSampler(tokenizer, looping), [tokenizer("q")["input_ids"]], [{}],
                              get_env("calculator"), SamplingParams(n=1, max_new_tokens=40), max_turns=3)
    # the observation after turn one is cut at the 40-token episode budget and the episode ends there
    assert [len(ids) for ids in short.completion_ids] == [40] and short.finish_reasons == ["length"]
    assert short.completion_masks[0] == [1] * 28 + [0] * 12


@pytest.fixture(scope="module")
def policy(tokenizer):
    return tiny_model(tokenizer, seed=0)


class DigitEnv:
    """Every digit ends a turn (a random tiny model writes many); two observations, then done; a reward of
    the turn count at the end."""
    stop = [str(d) for d in range(10)]

    def __init__(self):
        self.turns = 0

    def reset(self, row):
        return "[" + row["tag"] + "]"

    def step(self, text):
        self.turns += 1
        return f"<obs{self.turns}>", (float(self.turns) if self.turns == 3 else None), self.turns == 3


def run_episodes(policy, tokenizer, seed):
    sampler = get_sampler("builtin", policy, tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in ("12+3=", "7*8=")]
    return generate_episodes(sampler, prompts, [{"tag": "a"}, {"tag": "bb"}], DigitEnv,
                             SamplingParams(n=3, max_new_tokens=50, seed=seed), max_turns=5, max_turn_tokens=12)


def test_episode_tensors_line_up_with_the_teacher_forced_forward(policy, tokenizer):
    """On the real sampler: the sampling log-probs of the model-written tokens equal a plain forward's over
    the padded (N, P+C) tensors, so the online losses read episodes exactly as single-turn rollouts."""
    batch = run_episodes(policy, tokenizer, seed=1)
    assert all(len(t) <= 12 for b in batch.turns for t in [x["text"] for x in b if x["role"] == "model"])
    assert all(len(ids) <= 50 for ids in batch.completion_ids)
    assert any(n > 1 for n in batch.num_turns)  # multi-turn episodes happened
    tensors = batch.to_tensors(tokenizer.pad_token_id)
    P, mask = tensors["prompt_length"], tensors["completion_mask"]
    with torch.no_grad():
        logprobs = model_token_logprobs(policy, tensors["input_ids"], tensors["attention_mask"])[0][:, P - 1:]
    assert torch.allclose(logprobs * mask, tensors["sampling_logprobs"], atol=1e-4)
    # The online recipes' scoring forward (each prompt encoded once for its 3 episodes) reads the same values.
    with torch.no_grad():
        online = completion_forward(policy, tensors)[0]  # (N, C)
    assert torch.allclose(online * mask, tensors["sampling_logprobs"], atol=1e-4)
    for row, turns in enumerate(batch.turns):  # observations (reset and step) are masked out, model text is not
        env_tokens = sum(len(t["text"]) for t in turns if t["role"] == "env")
        assert (mask[row] == 0).logical_and(tensors["attention_mask"][row, P:] == 1).sum() == env_tokens
        assert batch.env_rewards[row] == (3.0 if batch.num_turns[row] == 3 else None)


def test_fixed_seed_same_episodes(policy, tokenizer):
    first, again, other = (run_episodes(policy, tokenizer, seed) for seed in (5, 5, 6))
    assert first.completion_ids == again.completion_ids and first.turns == again.turns
    assert first.completion_logprobs == again.completion_logprobs
    assert first.completion_ids != other.completion_ids


def test_select_and_concat_keep_episode_fields(policy, tokenizer):
    batch = run_episodes(policy, tokenizer, seed=2)
    swapped = select_rows(batch, [1, 0])
    assert isinstance(swapped, EpisodeBatch) and swapped.completion_masks == batch.completion_masks[3:] + \
        batch.completion_masks[:3]
    whole = concat_batches([select_rows(batch, [0]), select_rows(batch, [1])])
    assert whole == batch
