"""The online-RL pieces shared by grpo and ppo (tether/online.py, tether/rollout/, tether/runtime/): RL prompt loading and validation,
the rollout → score step, dynamic sampling, the on-policy shortcut for π_old, the reference (none at β = 0,
the adapter-disabled base under LoRA), masks, whitening, samples.jsonl and resumable prompt order."""

import json
import logging
import math
import re

import pytest
import torch

from tether import models
from tether.config import load_config
from tether.data.loading import DataError
from tether.ops import masked_whiten
from tether import online
from tether.data.batching import derive_seed
from tether.models.forward import completion_forward
from tether.online import linear_schedule, old_logprobs
from tether.recipes import grpo, ppo
from tether.rollout.prompts import Prompt, PromptStream, load_prompts
from tether.rollout.rollout import Rollout, generate_and_score, rollout_tensors, sample_rollout
from tether.runtime.distributed import explained_variance, whiten
from tether.runtime.logger import SampleWriter
from tether.runtime.metrics import Timer
from tether.rewards import RewardSet
from tether.rollout import SamplingParams, get_sampler

TINY = "tiny:hidden_size=64,intermediate_size=128,num_hidden_layers=2"


@pytest.fixture(scope="module")
def tiny():
    return models.load(TINY, seed=0)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def digit_fraction(prompts, completions, **columns):
    return [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]


def rl_config(cls, tmp_path, data, *overrides):
    return load_config(cls, None, [
        f"data={data}", f"model={TINY}", f"rewards=[{{name: '{__file__}:digit_fraction'}}]",
        f"output_dir={tmp_path / 'run'}", "report_to=[]", "progress=false", "batch_size=4", "group_size=2",
        "max_completion_length=6", "max_steps=2", *overrides])


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("row, field, message", [
    ({"question": "hi"}, "prompt", "missing field"),
    ({"prompt": "   "}, "prompt", "non-empty string"),
    ({"prompt": 7}, "prompt", "non-empty string"),
    ({"prompt": [{"role": "assistant", "content": "hi"}]}, "prompt[0].role", "expected a user turn"),
])
def test_bad_prompt_rows_name_file_row_and_field(tmp_path, tiny, row, field, message):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(DataError, match=rf"p.jsonl, row 1, field '{re.escape(field)}': .*{message}"):
        load_prompts(str(path), tiny[1], max_prompt_length=32)


def test_overlong_prompts_are_dropped_truncated_or_rejected_and_counted(tmp_path, tiny, caplog):
    """Prompts of 3 and 12 characters with max_prompt_length=8 (the tiny tokenizer: one token per character,
    plus BOS). drop: only the short one is kept and the log counts 1 dropped; truncate: its last 8 tokens;
    error: a DataError naming the row. Dropped prompts never reach the sampler."""
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "abc"}, {"prompt": "abcdefghijkl"}])
    tokenizer = tiny[1]
    with caplog.at_level(logging.WARNING, logger="tether"):
        kept = load_prompts(str(path), tokenizer, max_prompt_length=8, overlong="drop")
    assert [p.row for p in kept] == [0]
    assert "1 dropped" in caplog.text and "rows [1]" in caplog.text
    truncated = load_prompts(str(path), tokenizer, max_prompt_length=8, overlong="truncate")
    assert truncated[1].ids == tokenizer("abcdefghijkl")["input_ids"][-8:] and truncated[1].prompt == "abcdefghijkl"
    with pytest.raises(DataError, match="row 1, field 'prompt'.*> max_prompt_length=8"):
        load_prompts(str(path), tokenizer, max_prompt_length=8, overlong="error")

    seen = []

    class Recording:
        def generate(self, prompts, params):
            seen.extend(prompts)
            return get_sampler("builtin", tiny[0], tokenizer).generate(prompts, params)

    sample_rollout(Recording(), RewardSet([digit_fraction]), kept, PromptStream(len(kept), 0),
                   SamplingParams(n=2, max_new_tokens=3), batch_size=4, seed=0, step=0, timer=Timer())
    assert len(seen) == 4 and all(len(ids) <= 8 for ids in seen)


def test_columns_and_completion_lengths_reach_reward_functions(tmp_path, tiny):
    """Every other column of the row goes to the reward functions (a column missing in a row is None), with
    the completion token ids and lengths (the `length` reward reads those); message-list prompts go through
    the chat template for sampling but reach the rewards as given."""
    messages = [{"role": "user", "content": "add"}]
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "x", "answer": "1", "topic": "a"},
                                             {"prompt": messages, "answer": "2"}])
    prompts = load_prompts(str(path), tiny[1], max_prompt_length=64)
    assert prompts[1].ids == tiny[1](tiny[1].apply_chat_template(messages, tokenize=False,
                                                                 add_generation_prompt=True),
                                     add_special_tokens=False)["input_ids"]
    calls = []

    def recorder(prompts, completions, **columns):
        calls.append((prompts, columns))
        return [0.0] * len(completions)

    rollout = generate_and_score(get_sampler("builtin", *tiny), RewardSet([recorder]), prompts,
                                 SamplingParams(n=2, max_new_tokens=4, seed=0), Timer())
    got_prompts, columns = calls[0]
    assert got_prompts == ["x", "x", messages, messages]
    assert columns["answer"] == ["1", "1", "2", "2"] and columns["topic"] == ["a", "a", None, None]
    assert columns["completion_lengths"] == [len(ids) for ids in rollout.samples.completion_ids]
    assert columns["completion_ids"] == rollout.samples.completion_ids


# ----------------------------------------------------------------------------- π_old and π_ref


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_sampling_logprobs_equal_recomputed_old_logprobs(tiny, temperature, top_k, top_p):
    """The on-policy shortcut is valid: the built-in sampler's log-probs (full distribution at the sampling
    temperature, even with top-k / top-p filtering) equal a teacher-forced forward of the same weights at
    the same temperature, within 1e-5 in float32, on every completion token."""
    model, tokenizer = tiny
    params = SamplingParams(n=4, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    samples = get_sampler("builtin", model, tokenizer).generate(
        [tokenizer(p)["input_ids"] for p in ["x", "hello", "1+1="]], params)
    batch = samples.to_tensors(tokenizer.pad_token_id)
    with torch.no_grad():
        recomputed, _, _ = completion_forward(model, batch, temperature=temperature)  # (N, C)
    torch.testing.assert_close(recomputed * batch["completion_mask"], batch["sampling_logprobs"], atol=1e-5, rtol=0)


def test_old_logprobs_forward_is_skipped_only_on_policy(tmp_path, tiny):
    """ppo_epochs=1 with one minibatch: π_old are the sampler's log-probs, no forward runs. Two epochs (or
    old_logprobs=recompute): one no-grad scoring pass, whose values match the sampler's (two model calls: the
    shared prompt once, then the completions, tether.models.shared_prompt). padding_free=false states which
    forward that is, the cached one: the packed forward would be one call."""
    model, tokenizer = tiny
    data = write_rows(tmp_path / "p.jsonl", [{"prompt": "x"}])
    samples = get_sampler("builtin", model, tokenizer).generate([tokenizer("x")["input_ids"]],
                                                                SamplingParams(n=3, max_new_tokens=5, seed=0))
    batch = samples.to_tensors(tokenizer.pad_token_id)
    forwards = []
    handle = model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        on_policy = old_logprobs(rl_config(grpo.GRPOConfig, tmp_path, data), model, batch, 8, 1.0)
        assert on_policy is batch["sampling_logprobs"] and not forwards
        for options in (["ppo_epochs=2"], ["old_logprobs=recompute"], ["num_minibatches=2"]):
            config = rl_config(grpo.GRPOConfig, tmp_path, data, "padding_free=false", *options)
            recomputed = old_logprobs(config, model, batch, 8, 1.0)
            torch.testing.assert_close(recomputed * batch["completion_mask"], on_policy, atol=1e-5, rtol=0)
        assert len(forwards) == 3 * 2
    finally:
        handle.remove()


@pytest.mark.parametrize("recipe", [grpo, ppo])
def test_beta_zero_builds_no_reference_and_runs_no_reference_forward(tmp_path, monkeypatch, recipe):
    """kl_coef=0: no reference model is constructed (constructing one fails this test) and no reference
    forward runs (no reference time, no KL metrics); with kl_coef > 0 there is one reference pass per step."""
    assert online.build_reference(torch.nn.Linear(1, 1), needed=False) is None
    data = write_rows(tmp_path / "p.jsonl", [{"prompt": "x"}, {"prompt": "yy"}])
    cls = grpo.GRPOConfig if recipe is grpo else ppo.PPOConfig
    real_reference = online.Reference

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference model was built with kl_coef=0")

    monkeypatch.setattr(online, "Reference", no_reference)
    recipe.train(rl_config(cls, tmp_path, data, "kl_coef=0"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("time/reference" not in row and "kl_ref" not in row for row in rows)

    passes = []

    class CountingReference(real_reference):
        def logprobs(self, *args, **kwargs):
            passes.append(1)
            return super().logprobs(*args, **kwargs)

    monkeypatch.setattr(online, "Reference", CountingReference)
    recipe.train(rl_config(cls, tmp_path, data, "kl_coef=0.1"))
    assert len(passes) == 2


def test_lora_reference_is_the_adapter_disabled_base(tiny):
    """Under LoRA no copy is made: π_ref is the policy with its adapter switched off, i.e. the base weights,
    while the policy itself (adapter on, trained away from zero here) differs."""
    from tether.models import LoraConfig

    policy, tokenizer = models.load(TINY, seed=0, lora=LoraConfig(r=4))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    reference = online.build_reference(policy, needed=True)
    assert reference.frozen is None
    samples = get_sampler("builtin", policy, tokenizer).generate([tokenizer("xy")["input_ids"]],
                                                                 SamplingParams(n=2, max_new_tokens=5, seed=0))
    batch = samples.to_tensors(tokenizer.pad_token_id)
    with torch.no_grad():
        base = completion_forward(tiny[0], batch)[0]
        lora = completion_forward(policy, batch)[0]
    ref = reference.logprobs(batch, micro_size=1, temperature=1.0)
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=0)
    assert (lora - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------- rollouts, masks, statistics


def test_dynamic_sampling_drops_flat_groups_and_refills(tmp_path, tiny):
    """Prompt "same" always scores 1.0 (a zero-variance group); the others score the digit share. Dynamic
    sampling keeps only groups with variance, drawing more prompts (the cursor moves past batch_size);
    when the tries run out the batch is filled with flat groups so its shape never changes."""
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "same"}] * 6 + [{"prompt": "x"}, {"prompt": "yy"}])
    prompts = load_prompts(str(path), tiny[1], max_prompt_length=16)

    def reward(prompts, completions, **columns):
        return [1.0 if p == "same" else d for p, d in zip(prompts, digit_fraction(prompts, completions))]

    sampler, rewards = get_sampler("builtin", *tiny), RewardSet([reward])
    params = SamplingParams(n=4, max_new_tokens=8, temperature=1.5)
    stream = PromptStream(len(prompts), seed=0)
    batch, sampled, metrics = sample_rollout(sampler, rewards, prompts, stream, params, batch_size=2, seed=0, step=0,
                                             timer=Timer(), dynamic_sampling=True, max_tries=20)
    assert len(batch.prompts) == 2 and batch.samples.n == 4 and len(batch.scores.total) == 8
    assert not any(batch.zero_variance_groups()) and all(p.prompt != "same" for p in batch.prompts)
    assert stream.cursor == 2 * metrics["sampling_tries"] > 2 and metrics["dynamic_sampling_filled_groups"] == 0
    assert len(sampled.prompts) == stream.cursor

    stream = PromptStream(len(prompts), seed=0)
    batch, _, metrics = sample_rollout(sampler, rewards, prompts, stream, params, batch_size=4, seed=0, step=0,
                                       timer=Timer(), dynamic_sampling=True, max_tries=1)
    assert len(batch.prompts) == 4 and metrics["dynamic_sampling_filled_groups"] == sum(batch.zero_variance_groups())


def test_rollout_select_concat_and_masks(tiny):
    """select/concat keep prompts, completions and every reward column aligned; loss_mask drops the
    completions no reward could judge (None) and, under mask_truncated, those cut at the length limit."""
    prompts = [Prompt("x", tiny[1]("x")["input_ids"], {}, 0), Prompt("y", tiny[1]("y")["input_ids"], {}, 1)]

    def reward(prompts, completions, **columns):
        return [None if i == 1 else float(i) for i in range(len(completions))]

    rollout = generate_and_score(get_sampler("builtin", *tiny), RewardSet([reward]), prompts,
                                 SamplingParams(n=3, max_new_tokens=2, seed=0), Timer())
    assert rollout.zero_variance_groups() == [False, False]
    swapped = Rollout.concat([rollout.select([1]), rollout.select([0])])
    assert [p.prompt for p in swapped.prompts] == ["y", "x"]
    assert swapped.scores.total == rollout.scores.total[3:] + rollout.scores.total[:3]
    assert swapped.samples.completion_ids == rollout.samples.completion_ids[3:] + rollout.samples.completion_ids[:3]
    assert swapped.samples.prompt_index == [0, 0, 0, 1, 1, 1]
    after_empty = Rollout.concat([rollout.select([]), rollout.select([1])])  # a dynamic-sampling round kept nothing
    assert after_empty.group_size == 3 and after_empty.samples.prompt_index == [0, 0, 0]
    assert math.isnan(rollout.rewards[1]) and rollout.rewards[2] == 2.0

    plain = rollout_tensors(rollout, tiny[1].pad_token_id, "cpu")
    assert plain["loss_mask"][1].sum() == 0 and torch.equal(plain["loss_mask"][0], plain["completion_mask"][0])
    filtered = rollout_tensors(rollout, tiny[1].pad_token_id, "cpu", mask_truncated=True)
    truncated = rollout.truncated
    assert torch.equal(filtered["loss_mask"].sum(-1) == 0, truncated | torch.isnan(rollout.rewards))


def test_whiten_and_explained_variance_hand_values():
    """whiten = ops.masked_whiten in one process. Explained variance: R = (1, 2, 3, 4), V = (1, 2, 3, 3)
    → Var(R − V) = Var(0, 0, 0, 1) = 0.25 (unbiased: 0.75/3), Var(R) = 5/3 → 1 − 0.25/(5/3) = 0.85."""
    values = torch.tensor([[1.0, 5.0, 2.0], [4.0, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(whiten(values, mask), masked_whiten(values, mask))
    returns, predicted = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1.0, 2.0, 3.0, 3.0]])
    assert float(explained_variance(predicted, returns, torch.ones(1, 4))) == pytest.approx(0.85)


def test_prompt_order_resumes_from_cursor_and_seeds_are_stable():
    """The prompt order is an endless seeded shuffle read from a cursor: a stream restarted at the saved
    cursor continues exactly; sampler seeds depend only on (seed, step, attempt, rank)."""
    first = PromptStream(5, seed=7)
    whole = first.take(3) + first.take(9)
    restarted = PromptStream(5, seed=7)
    restarted.cursor = 3
    assert restarted.take(9) == whole[3:]
    assert sorted(whole[:5]) == [0, 1, 2, 3, 4] and sorted(whole[5:10]) == [0, 1, 2, 3, 4]
    assert derive_seed(0, 5, 0, 0) == derive_seed(0, 5, 0, 0) != derive_seed(0, 5, 1, 0) != derive_seed(0, 6, 0, 0)
    assert [linear_schedule(1.0, 0.5, s, 4) for s in (0, 2, 4, 9)] == [1.0, 0.75, 0.5, 0.5]
    assert linear_schedule(1.0, None, 3, 4) == 1.0


def test_samples_file_keeps_only_steps_up_to_the_resumed_checkpoint(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"step": s, "completion": "c"}) + "\n" for s in (2, 4, 6)))
    SampleWriter(tmp_path, every=2, start_step=4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    SampleWriter(tmp_path, every=2, start_step=0)  # a fresh run starts a fresh file
    assert not path.exists()

