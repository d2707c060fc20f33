"""The lean Llama-family decode step (`tether.rollout.llama_decode`) against the Hugging Face forward it replaces:
logits step by step on left-padded, repeated prompts for several configurations (GQA, multi-head, tied and untied
embeddings, an explicit head_dim, RoPE scalings, Qwen2's q/k/v biases, Mistral's sliding window), the sampler's
outputs with and without it, and a clear refusal of everything it does not reproduce. The fused C attention
(`tether/rollout/decode_attention.c`) and its PyTorch fallback are both checked, and the kernel alone against a
plain softmax attention on ragged shapes."""

import shutil
import tempfile

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM

from tether.models.tiny import tiny_model, tiny_tokenizer
from tether.rollout import BuiltinSampler, SamplingParams, llama_decode, native
from tether.rollout.llama_decode import LlamaDecoder, unsupported_reason

VOCAB = 50
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def build(cls, config_cls, seed=0, **overrides):
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = cls(config_cls(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # random norm weights and biases, so a mistake in either shows in the logits
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                parameter.uniform_(0.5, 1.5) if name.endswith("weight") else parameter.normal_(0, 0.5)
    torch.random.set_rng_state(generator_state)
    return model


CONFIGS = {
    "llama_gqa": lambda: build(LlamaForCausalLM, LlamaConfig),
    "llama_mha_untied": lambda: build(LlamaForCausalLM, LlamaConfig, num_key_value_heads=4, tie_word_embeddings=False),
    "llama_tied_head_dim": lambda: build(LlamaForCausalLM, LlamaConfig, head_dim=16, tie_word_embeddings=True),
    "llama_mqa": lambda: build(LlamaForCausalLM, LlamaConfig, num_key_value_heads=1),
    "rope_linear": lambda: build(LlamaForCausalLM, LlamaConfig,
                                 rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "rope_llama3": lambda: build(LlamaForCausalLM, LlamaConfig, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
    "rope_yarn": lambda: build(LlamaForCausalLM, LlamaConfig, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}),
    "qwen2_qkv_bias": lambda: build(Qwen2ForCausalLM, Qwen2Config),
    "mistral_window": lambda: build(MistralForCausalLM, MistralConfig, sliding_window=64),
}


def left_padded(prompts, pad_id, total):
    """input_ids (U, P), attention_mask (U, total) with generated positions already 1, position_ids (U, P)."""
    P = max(map(len, prompts))
    input_ids = torch.full((len(prompts), P), pad_id)
    attention_mask = torch.zeros(len(prompts), total, dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, P - len(ids):] = torch.tensor(ids)
        attention_mask[i, P - len(ids):] = 1
    return input_ids, attention_mask, (attention_mask[:, :P].cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("native_attention", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_steps_equal_hf_forward(name, native_attention):
    """Prompts of lengths 3, 7, 5 (left-padded), each repeated twice as the sampler does, then 12 steps with
    random tokens: every step's logits equal the Hugging Face forward over its own DynamicCache within 1e-5,
    with the attention in C and in PyTorch ops."""
    model = CONFIGS[name]()
    assert unsupported_reason(model, 32) is None
    prompts = [[1, 5, 9], [2, 4, 6, 8, 10, 12, 14], [3, 3, 7, 11, 13]]
    steps, repeats = 12, 2
    input_ids, attention_mask, positions = left_padded(prompts, 0, 7 + steps)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (steps, len(prompts) * repeats), generator=generator)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids, attention_mask=attention_mask[:, :7], position_ids=positions,
              past_key_values=cache, use_cache=True)
        attention_mask = attention_mask.repeat_interleave(repeats, 0)
        decoder = LlamaDecoder(model, 7 + steps, native_attention=native_attention)
        assert decoder.native == (native_attention and native.library() is not None)
        decoder.load_cache(cache, attention_mask, repeats=repeats)
        cache.batch_repeat_interleave(repeats)
        position = positions[:, -1].repeat_interleave(repeats) + 1
        for step in range(steps):
            expected = model(input_ids=tokens[step, :, None], attention_mask=attention_mask[:, :8 + step],
                             position_ids=position[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(decoder.step(tokens[step], position), expected, atol=1e-5, rtol=1e-5)
            position = position + 1


@pytest.mark.parametrize("native_attention", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("repeats", [1, 3])
def test_select_rows_keeps_their_cache(repeats, native_attention):
    """Dropping rows mid-way (finished samples) leaves the kept rows' logits as before; with repeated prompts
    the prompt-shared cache is first unfolded into one row per sample."""
    model = CONFIGS["llama_gqa"]()
    input_ids, attention_mask, positions = left_padded([[1, 2, 3], [4, 5], [6]], 0, 10)
    attention_mask = attention_mask.repeat_interleave(repeats, 0)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids, attention_mask=attention_mask[::repeats, :3], position_ids=positions,
              past_key_values=cache, use_cache=True)
        full = LlamaDecoder(model, 10, native_attention=native_attention)
        part = LlamaDecoder(model, 10, native_attention=native_attention)
        for decoder in (full, part):
            decoder.load_cache(cache, attention_mask, repeats=repeats)
        position = positions[:, -1].repeat_interleave(repeats) + 1
        tokens = torch.arange(7, 7 + 3 * repeats)
        full.step(tokens, position), part.step(tokens, position)
        keep = torch.tensor([0, 3 * repeats - 1])
        part.select(keep)
        for step in (1, 2):
            torch.testing.assert_close(part.step(tokens[keep], position[keep] + step),
                                       full.step(tokens, position + step)[keep], atol=1e-6, rtol=1e-6)


def test_sampler_same_outputs_with_and_without_lean_decode():
    """Sampling (temperature 0.9, top-k), EOS finishing with row dropping, stop strings and min_new_tokens: the
    same completions, finish reasons and log-probs (1e-5) as the model's own forward."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2).eval()
    prompts = ["a", "hello wor", "1+2=3, 4"]
    eos = tok.convert_tokens_to_ids("e")
    cases = [SamplingParams(temperature=0.9, top_k=20, n=3, max_new_tokens=24, seed=2),
             SamplingParams(temperature=1.0, n=4, max_new_tokens=16, min_new_tokens=4, seed=3, stop=["ab", "x"])]
    for params in cases:
        outputs = [BuiltinSampler(model, tok, eos_token_ids=[eos], drop_finished_fraction=0.0,
                                  lean_decode=lean).generate(prompts, params) for lean in (True, False)]
        lean, plain = outputs
        assert lean.completion_ids == plain.completion_ids
        assert lean.finish_reasons == plain.finish_reasons and set(lean.finish_reasons) - {"length"}
        torch.testing.assert_close(torch.tensor(sum(lean.completion_logprobs, [])),
                                   torch.tensor(sum(plain.completion_logprobs, [])), atol=1e-5, rtol=0)


def test_unsupported_models_are_refused_with_a_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert "model type 'gpt2'" in unsupported_reason(gpt2)
    dynamic = build(LlamaForCausalLM, LlamaConfig, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                     "rope_theta": 10000.0})
    assert "rope_type 'dynamic'" in unsupported_reason(dynamic)
    assert "o_proj" in unsupported_reason(build(LlamaForCausalLM, LlamaConfig, attention_bias=True))
    assert "bfloat16" in unsupported_reason(build(LlamaForCausalLM, LlamaConfig).to(torch.bfloat16))
    mistral = CONFIGS["mistral_window"]()
    assert unsupported_reason(mistral, 64) is None and "sliding-window" in unsupported_reason(mistral, 65)
    assert "hidden_act" in unsupported_reason(build(LlamaForCausalLM, LlamaConfig, hidden_act="gelu"))


def test_weight_copies_limit_counts_every_projection(monkeypatch):
    # The tiny model (hidden 128, 4 heads and 2 kv heads of 32, MLP 384, 4 layers): per layer q and o 128 x 128,
    # k and v 64 x 128, gate, up and down 384 x 128, all copied transposed: 196,608 floats, 3 MB for 4 layers.
    model = tiny_model(tiny_tokenizer())
    copies = 4 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 384 * 128) * 4
    assert copies == 3 * 2**20
    monkeypatch.setattr(llama_decode, "MAX_COPY_BYTES", copies)
    assert unsupported_reason(model) is None
    monkeypatch.setattr(llama_decode, "MAX_COPY_BYTES", copies - 1)
    assert "weight copies would take 3 MB" in unsupported_reason(model)


def test_lora_model_is_refused_and_sampled_through_its_forward():
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    model = tiny_model(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "PEFT" in unsupported_reason(lora)
    assert "not a plain linear layer" in unsupported_reason(lora.get_base_model())
    batch = BuiltinSampler(lora, tok).generate(["ab"], SamplingParams(temperature=0, max_new_tokens=4))
    assert len(batch.completion_ids[0]) == 4


def reference_attention(q, keys, values, bias):
    """softmax(q k^T + bias) v, row by row: q (G, d), keys / values (T, d), bias (T,) -> (G, d)."""
    return torch.softmax(q @ keys.T + bias, dim=-1) @ values


@pytest.mark.parametrize("G,d", [(2, 32), (3, 24), (1, 64), (4, 128)])
def test_native_kernel_equals_plain_attention(G, d):
    """The C kernel alone on ragged shapes: 3 prompts x 3 samples (odd row counts), G query heads per kv head
    (odd G included), head sizes on the unrolled paths (32, 64, 128) and the generic one (24), prompts of 5
    positions with masked ones (bias -inf), 7 own positions. It writes the new key and value into the cache
    first; the outputs equal a plain softmax attention over prompt + own positions within 1e-5."""
    if native.library() is None:
        pytest.skip("no C compiler")
    U, n, kv, P, c = 3, 3, 2, 5, 7
    heads, Tp, Tc = kv * G, native.padded(P), native.padded(c)
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(U * n, heads + 2 * kv, d, generator=generator)
    prompt = torch.randn(2, U, kv, Tp * d, generator=generator)
    own = torch.randn(2, U, kv, n, Tc * d, generator=generator)
    bias = torch.zeros(U, P)
    bias[0, :2] = bias[2, 0] = float("-inf")  # left padding of prompts 0 and 2
    before = own.clone()
    out = native.decode_attention(qkv, prompt, P, bias, own, c, heads, kv, d, torch.empty(n * G * (P + c)))

    prompt_keys, prompt_values = prompt[0].unflatten(-1, (d, Tp)), prompt[1].unflatten(-1, (Tp, d))
    own_keys, own_values = own[0].unflatten(-1, (d, Tc)), own[1].unflatten(-1, (Tc, d))
    for u in range(U):
        for j in range(n):
            b = u * n + j
            for h in range(kv):
                new_key, new_value = qkv[b, heads + h], qkv[b, heads + kv + h]
                torch.testing.assert_close(own_keys[u, h, j, :, c - 1], new_key, rtol=0, atol=0)
                torch.testing.assert_close(own_values[u, h, j, c - 1], new_value, rtol=0, atol=0)
                keys = torch.cat([prompt_keys[u, h, :, :P].T, own_keys[u, h, j, :, :c].T])  # (P + c, d)
                values = torch.cat([prompt_values[u, h, :P], own_values[u, h, j, :c]])
                expected = reference_attention(qkv[b, h * G:(h + 1) * G], keys, values,
                                               torch.cat([bias[u], torch.zeros(c)]))
                torch.testing.assert_close(out[b].view(heads, d)[h * G:(h + 1) * G], expected, atol=1e-5, rtol=1e-5)
    written = torch.zeros_like(own, dtype=torch.bool)
    written[0].unflatten(-1, (d, Tc))[..., c - 1] = True
    written[1].unflatten(-1, (Tc, d))[..., c - 1, :] = True
    assert torch.equal(own[~written], before[~written])  # nothing else in the cache changed


def test_native_kernel_falls_back_without_a_compiler(monkeypatch, tmp_path):
    """With no usable compiler (or TETHER_NATIVE=0) `library()` is None, decoders use the PyTorch attention and
    sampling gives the same tokens; with one, the kernel builds into $TETHER_CACHE and loads."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2).eval()
    params = SamplingParams(temperature=1.0, n=3, max_new_tokens=12, seed=4)
    with_kernel = BuiltinSampler(model, tok).generate(["ab", "hello"], params)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that always fails
    assert native.library() is None and not LlamaDecoder(model, 16).native
    without = BuiltinSampler(model, tok).generate(["ab", "hello"], params)
    assert without.completion_ids == with_kernel.completion_ids
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("TETHER_NATIVE", "0")
    monkeypatch.delenv("CC")
    assert native.library() is None
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        return
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("TETHER_NATIVE", "1")
    assert native.library() is not None and LlamaDecoder(model, 16).native
    assert list((tmp_path / "native").glob("decode_attention-*.so"))
    # An unwritable cache folder (here a file stands where the folder should be): built in a private
    # temporary folder for this process, never loaded from a shared one.
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "not-a-folder"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native, "_tried", False)
    assert native.library() is not None
    assert list((tmp_path / "tmp").glob("tether-native-*/decode_attention-*.so"))


def test_native_kernel_refuses_out_of_range_arguments():
    """The wrapper checks what the kernel trusts (shapes, lengths within the padded caches, scratch size) and
    says which: the C code itself does no bounds checks."""
    if native.library() is None:
        pytest.skip("no C compiler")
    U, n, kv, G, d = 2, 2, 1, 2, 8
    qkv = torch.zeros(U * n, kv * G + 2 * kv, d)
    prompt, own = torch.zeros(2, U, kv, 16 * d), torch.zeros(2, U, kv, n, 16 * d)
    bias, scratch = torch.zeros(U, 16), torch.zeros(n * G * 32)
    args = dict(heads=kv * G, kv_heads=kv, head_dim=d, scratch=scratch)
    assert native.decode_attention(qkv, prompt, 16, bias, own, 16, **args).shape == (U * n, kv * G * d)
    with pytest.raises(ValueError, match="positions out of the cache"):
        native.decode_attention(qkv, prompt, 17, bias, own, 1, **args)
    with pytest.raises(ValueError, match="positions out of the cache"):
        native.decode_attention(qkv, prompt, 3, bias, own, 17, **args)
    with pytest.raises(ValueError, match="one row"):  # no own part: one row per prompt
        native.decode_attention(qkv, prompt, 3, bias, None, 0, **args)
    with pytest.raises(ValueError, match="scratch too small"):
        native.decode_attention(qkv, prompt, 16, bias, own, 16, **{**args, "scratch": torch.zeros(10)})
    with pytest.raises(ValueError, match="float32"):
        native.decode_attention(qkv.double(), prompt, 3, bias, own, 1, **args)
    with pytest.raises(ValueError, match="head size 12"):
        native.decode_attention(torch.zeros(U * n, 4, 12), torch.zeros(2, U, kv, 16 * 12), 3, bias,
                                torch.zeros(2, U, kv, n, 16 * 12), 1, **{**args, "head_dim": 12})
