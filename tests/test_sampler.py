"""The built-in sampler against slow references: a cache-free greedy loop, teacher-forced log-probs,
hand-worked filters, chi-square frequency checks; plus finish reasons, seeding and `tether generate`."""

import importlib.util
import json
import math

import pytest
import torch

from tether.models.tiny import tiny_model, tiny_tokenizer
from tether.models.forward import model_token_logprobs
from tether.rollout import BuiltinSampler, SamplingParams, filter_logits, get_sampler, select_tokens

PROMPTS = ["a", "hello wor", "1+2=3, 4"]  # different lengths: the batch is left-padded


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2).eval()


@pytest.fixture(scope="module")
def gpt2(tok):
    """Absolute position embeddings: wrong position_ids under left padding change its outputs (RoPE would
    hide a constant shift)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.3,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    torch.random.set_rng_state(generator_state)
    return model


def encode(tok, text):
    return tok(text)["input_ids"]


def naive_greedy(model, prompt_ids, eos_ids, max_new_tokens):
    """Argmax decoding by re-running the full forward on the growing sequence (no cache, no padding)."""
    ids, out, logprobs = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
            if token in eos_ids:
                break
    return out, logprobs


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square(df) at p = 0.001 (z = 3.09), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over the tokens with probability > 0, and its degrees of freedom."""
    kept = probs > 0
    expected = probs[kept] * counts.sum()
    return float(((counts[kept] - expected) ** 2 / expected).sum()), int(kept.sum()) - 1


def stop_prefix_length(tok, ids, stop):
    """Reference: the fewest tokens whose decoded text contains `stop`, or None."""
    for length in range(1, len(ids) + 1):
        if stop in tok.decode(ids[:length], skip_special_tokens=True):
            return length
    return None


# --------------------------------------------------------------------------- greedy and log-probs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_cache_free_argmax_loop_with_left_padding(arch, request, tok):
    model = request.getfixturevalue("model" if arch == "llama" else "gpt2")
    sampler = BuiltinSampler(model, tok)
    batch = sampler.generate(PROMPTS, SamplingParams(temperature=0, n=2, max_new_tokens=12))
    assert batch.prompt_index == [0, 0, 1, 1, 2, 2]
    for row, i in enumerate(batch.prompt_index):
        expected, expected_logprobs = naive_greedy(model, encode(tok, PROMPTS[i]), sampler.eos_ids, 12)
        assert batch.completion_ids[row] == expected
        torch.testing.assert_close(torch.tensor(batch.completion_logprobs[row]), torch.tensor(expected_logprobs),
                                   atol=1e-5, rtol=0)


def test_greedy_equals_hf_generate(model, tok):
    prompt_ids = [encode(tok, p) for p in PROMPTS]
    P = max(map(len, prompt_ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompt_ids])
    attention_mask = (torch.arange(P) >= torch.tensor([P - len(p) for p in prompt_ids])[:, None]).long()
    hf = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=10,
                        min_new_tokens=10, eos_token_id=None, pad_token_id=tok.pad_token_id)[:, P:]
    batch = get_sampler("builtin", model, tok).generate(prompt_ids, SamplingParams(temperature=0, max_new_tokens=10,
                                                                                   ignore_eos=True))
    assert batch.completion_ids == hf.tolist()


def test_sampling_logprobs_equal_teacher_forced_forward(model, tok):
    """Sampled with top-k/top-p on, the stored log-probs are of the full distribution at temperature 0.7:
    the same as a padded teacher-forced forward, and as each copy of a shared prompt encoded alone."""
    params = SamplingParams(temperature=0.7, top_k=30, top_p=0.9, n=3, max_new_tokens=10, seed=1)
    batch = BuiltinSampler(model, tok).generate(PROMPTS, params)
    tensors = batch.to_tensors(tok.pad_token_id)
    P = tensors["prompt_length"]
    with torch.no_grad():
        logprobs, _ = model_token_logprobs(model, tensors["input_ids"], tensors["attention_mask"], temperature=0.7)
    mask = tensors["completion_mask"].bool()
    assert mask.sum(-1).tolist() == [len(c) for c in batch.completion_ids]
    torch.testing.assert_close(logprobs[:, P - 1:][mask], tensors["sampling_logprobs"][mask], atol=1e-5, rtol=0)
    assert (tensors["sampling_logprobs"][~mask] == 0).all()

    with torch.no_grad():  # every sample on its own: no padding, no shared prefill
        for row, i in enumerate(batch.prompt_index):
            ids = batch.prompt_ids[i] + batch.completion_ids[row]
            alone = torch.log_softmax(model(torch.tensor([ids])).logits[0].float() / 0.7, -1)
            targets = torch.tensor(batch.completion_ids[row])
            expected = alone[len(batch.prompt_ids[i]) - 1:-1].gather(-1, targets[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(batch.completion_logprobs[row]), expected, atol=1e-5, rtol=0)


def test_to_tensors_layout(model, tok):
    """Prompt left-padded to P, completion right-padded to C; masks match the token counts."""
    batch = BuiltinSampler(model, tok).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, seed=0, stop=["e"]))
    t = batch.to_tensors(tok.pad_token_id)
    P = max(len(p) for p in batch.prompt_ids)
    assert t["prompt_length"] == P
    assert t["input_ids"].shape == (6, P + max(len(c) for c in batch.completion_ids))
    for row, i in enumerate(batch.prompt_index):
        prompt, completion = batch.prompt_ids[i], batch.completion_ids[row]
        assert t["input_ids"][row, P - len(prompt):P].tolist() == prompt
        assert t["input_ids"][row, P:P + len(completion)].tolist() == completion
        assert t["attention_mask"][row].sum() == len(prompt) + len(completion)
    assert t["prompt_index"].tolist() == batch.prompt_index


# --------------------------------------------------------------------------- finishing


def test_eos_finishes_samples_and_is_cut_from_text(model, tok):
    """Same seed, no row dropping: draws are identical until a row hits the new EOS id."""
    params = SamplingParams(n=2, max_new_tokens=16, seed=3, ignore_eos=True)
    free = BuiltinSampler(model, tok, drop_finished_fraction=2.0).generate(PROMPTS, params)
    eos = free.completion_ids[0][5]
    params.ignore_eos = False
    batch = BuiltinSampler(model, tok, drop_finished_fraction=2.0, eos_token_ids=[eos]).generate(PROMPTS, params)
    for row, ids in enumerate(free.completion_ids):
        if eos in ids:
            end = ids.index(eos) + 1
            assert batch.finish_reasons[row] == "eos"
            assert batch.completion_ids[row] == ids[:end]
            assert batch.completions[row] == tok.decode(ids[:end - 1], skip_special_tokens=True)
        else:
            assert batch.finish_reasons[row] == "length"
            assert batch.completion_ids[row] == ids
    assert batch.finish_reasons[0] == "eos" and len(batch.completion_ids[0]) <= 6


def test_ignore_eos_and_min_new_tokens(model, tok):
    free = BuiltinSampler(model, tok).generate(["x"], SamplingParams(n=4, max_new_tokens=12, seed=5,
                                                                     ignore_eos=True))
    eos = free.completion_ids[0][1]
    sampler = BuiltinSampler(model, tok, eos_token_ids=[eos])
    ignored = sampler.generate(["x"], SamplingParams(n=4, max_new_tokens=12, seed=5, ignore_eos=True))
    assert ignored.finish_reasons == ["length"] * 4 and all(len(c) == 12 for c in ignored.completion_ids)

    batch = sampler.generate(["x"], SamplingParams(n=8, max_new_tokens=12, seed=5, min_new_tokens=6))
    for ids, reason in zip(batch.completion_ids, batch.finish_reasons):
        assert eos not in ids[:6] and len(ids) >= 6
        assert reason == ("eos" if ids[-1] == eos else "length")


def test_max_new_tokens_gives_length(model, tok):
    batch = BuiltinSampler(model, tok, eos_token_ids=[]).generate(PROMPTS, SamplingParams(max_new_tokens=7))
    assert batch.finish_reasons == ["length"] * 3 and [len(c) for c in batch.completion_ids] == [7, 7, 7]


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_truncate_text_and_tokens(model, tok, include):
    """Same seed, no row dropping: draws are identical until a sample completes the stop string."""
    params = SamplingParams(n=3, max_new_tokens=20, seed=7)
    sampler = BuiltinSampler(model, tok, eos_token_ids=[], drop_finished_fraction=2.0)
    free = sampler.generate(PROMPTS, params)
    stop = free.completions[0][3:5]  # two characters that row 0 produces after a few tokens
    params.stop, params.include_stop_str_in_output = [stop, "never-produced"], include
    batch = sampler.generate(PROMPTS, params)
    assert batch.finish_reasons[0] == "stop"
    for row, ids in enumerate(free.completion_ids):
        length = stop_prefix_length(tok, ids, stop)
        if length is None:
            assert batch.finish_reasons[row] == "length" and batch.completion_ids[row] == ids
            continue
        assert batch.finish_reasons[row] == "stop"
        assert batch.completion_ids[row] == ids[:length]  # up to the token that completed the stop
        text = free.completions[row]
        cut = text.index(stop) + (len(stop) if include else 0)
        assert batch.completions[row] == text[:cut]


# --------------------------------------------------------------------------- filtering and frequencies


def test_filter_logits_hand_worked():
    """p = [.40, .30, .15, .10, .05].
    top_k=2 keeps {0,1}. top_p=0.7: mass ranked above each token is 0, .4, .7, ... and a token is kept while
    that mass < 0.7, so {0,1}; top_p=0.71 keeps {0,1,2}. min_p=0.3: threshold .3 * .4 = .12 keeps {0,1,2}.
    top_k=4 then top_p=0.8: renormalised [.421, .316, .158, .105], mass above = 0, .421, .737, .895 -> {0,1,2};
    then min_p=0.5 on [.47, .35, .18]: threshold .235 -> {0,1}."""
    logits = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05]]).log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.7) == [0, 1]
    assert kept(top_p=0.71) == [0, 1, 2]
    assert kept(min_p=0.3) == [0, 1, 2]
    assert kept(top_k=4, top_p=0.8) == [0, 1, 2]
    assert kept(top_k=4, top_p=0.8, min_p=0.5) == [0, 1]
    assert kept(top_p=0.01) == [0]  # the top token always survives
    assert filter_logits(logits) is logits


@pytest.mark.parametrize("filters", [dict(top_k=4), dict(top_p=0.75), dict(min_p=0.2), dict()])
def test_draw_frequencies_match_filtered_distribution(filters):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0])
    params = SamplingParams(temperature=0.8, **filters)
    N = 20_000
    tokens, logprobs = select_tokens(logits.expand(N, -1), params, torch.Generator().manual_seed(0))
    target = filter_logits((logits / 0.8)[None], **filters).softmax(-1)[0]
    counts = torch.bincount(tokens, minlength=len(logits)).float()
    assert counts[target == 0].sum() == 0
    statistic, df = chi_square(counts, target)
    assert statistic < chi_square_critical(df), (statistic, df, counts, target)
    torch.testing.assert_close(logprobs, torch.log_softmax(logits / 0.8, -1)[tokens])


def test_model_sampling_frequencies_with_shared_prefill(model, tok):
    """3000 samples of one prompt (one prefill, repeated cache): first-token frequencies follow
    softmax(filtered logits / T) of a direct forward."""
    params = SamplingParams(temperature=0.15, top_p=0.9, top_k=12, n=3000, max_new_tokens=1, seed=11)
    batch = BuiltinSampler(model, tok).generate(["2+2="], params)
    with torch.no_grad():
        logits = model(torch.tensor([encode(tok, "2+2=")])).logits[:, -1].float()
    target = filter_logits(logits / 0.15, top_k=12, top_p=0.9).softmax(-1)[0]
    counts = torch.bincount(torch.tensor([c[0] for c in batch.completion_ids]), minlength=len(target)).float()
    assert counts[target == 0].sum() == 0
    statistic, df = chi_square(counts, target)
    assert df >= 2 and statistic < chi_square_critical(df), (statistic, df)


# --------------------------------------------------------------------------- seeding, modes, invariances


def test_seeded_reproducible_and_global_rng_untouched(model, tok):
    sampler = BuiltinSampler(model, tok)
    params = SamplingParams(n=2, max_new_tokens=10, seed=123)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = sampler.generate(PROMPTS, params)
    assert torch.equal(torch.get_rng_state(), state)
    again = sampler.generate(PROMPTS, params)
    assert first.completion_ids == again.completion_ids
    assert first.completion_logprobs == again.completion_logprobs
    other = sampler.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=124))
    assert other.completion_ids != first.completion_ids


def test_training_mode_restored(model, tok):
    model.train()
    try:
        BuiltinSampler(model, tok).generate(["a"], SamplingParams(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


def test_greedy_same_with_or_without_dropping_rows_and_chunking(model, tok):
    """Dropping finished rows from the cache and splitting prompts into chunks change nothing (greedy)."""
    params = SamplingParams(temperature=0, n=2, max_new_tokens=12)
    reference = BuiltinSampler(model, tok, drop_finished_fraction=2.0).generate(PROMPTS, params)
    eos = reference.completion_ids[2][3]  # ends prompt 1 early, the others maybe not
    outputs = [BuiltinSampler(model, tok, eos_token_ids=[eos], **kw).generate(PROMPTS, params)
               for kw in (dict(drop_finished_fraction=2.0), dict(drop_finished_fraction=0.0), dict(batch_size=1))]
    assert outputs[0].finish_reasons[2] == "eos"
    for other in outputs[1:]:
        assert other.completion_ids == outputs[0].completion_ids
        assert other.finish_reasons == outputs[0].finish_reasons
        torch.testing.assert_close(torch.tensor(sum(other.completion_logprobs, [])),
                                   torch.tensor(sum(outputs[0].completion_logprobs, [])), atol=1e-5, rtol=0)


def test_params_validation_and_unknown_engine(model, tok):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="builtin"):
        get_sampler("hf", model, tok)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_missing_is_a_clear_error(model, tok):
    with pytest.raises(ImportError, match=r"pip install 'tether\[vllm\]' on CUDA, or on CPU run "
                                          r"scripts/install_vllm.sh"):
        get_sampler("vllm", model, tok)


# --------------------------------------------------------------------------- tether generate


def test_generate_command_writes_jsonl(tmp_path, capsys):
    from tether.generate import encode_prompt, generate_main
    from tether.models import load

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "3+4=", "answer": "7"}, {"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = ["--model", "tiny", "--prompts", str(prompts), "--n", "2", "--temperature", "0",
            "--max-new-tokens", "6", "--output", str(out)]
    assert generate_main(args) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 4
    assert [r["index"] for r in written] == [0, 1, 0, 1]
    assert [r["answer"] for r in written] == ["7", "7", "x", "x"]
    assert written[2]["prompt"] == rows[1]["prompt"]
    assert all(r["finish_reason"] in ("stop", "eos", "length") for r in written)

    model, tokenizer = load("tiny")
    ids = [encode_prompt(tokenizer, r["prompt"], "auto") for r in rows]
    assert ids[1][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # the chat template was applied
    greedy = BuiltinSampler(model, tokenizer).generate(ids, SamplingParams(temperature=0, n=2, max_new_tokens=6))
    assert [r["completion"] for r in written] == greedy.completions

    assert generate_main(["--model", "tiny", "--prompt", "3+4=", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["completion"] == written[0]["completion"] and line["index"] == 0


def test_generate_command_bad_row_names_file_row_field(tmp_path, capsys):
    from tether.generate import generate_main

    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    assert generate_main(["--model", "tiny", "--prompts", str(prompts)]) == 2
    assert "bad.jsonl, row 1, field 'prompt'" in capsys.readouterr().err


def test_inverse_cdf_draw_follows_unnormalised_weights_and_never_draws_a_zero(monkeypatch):
    from tether.rollout.sampler import draw

    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.5, 0.0])  # zeros first, between and last
    N = 20_000
    tokens = draw(weights.expand(N, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=len(weights)).float()
    assert counts[weights == 0].sum() == 0
    statistic, df = chi_square(counts, weights / weights.sum())
    assert df == 2 and statistic < chi_square_critical(df), (statistic, counts)
    # u rounded up to the total (the largest uniform times the total) lands on the last nonzero weight, not past it
    monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: torch.ones(shape, dtype=torch.float64))
    assert draw(weights[None], torch.Generator()).tolist() == [4]
