"""The padding-free (packed) forward, `tether.models.packed`, against the padded forward: the layout's blocks,
masks and output order by hand; log-probs, entropies and gradients of right-, left- and
prompt-left/completion-right-padded batches; shared-prompt batches (fixed and ragged lengths); a LoRA model;
when it does not apply; and whole SFT and DPO runs with it on and off."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tether.config import load_config
from tether.data.batching import collate_prompt_completion
from tether.models import packed
from tether.models.shared_prompt import _packed_layout, completion_logprobs
from tether.models.forward import model_token_logprobs
from tether.recipes import dpo, sft
from test_shared_prompt import make_model  # a small Llama; vocab >= 4096 takes the chunked LM-head path


def outputs_and_grads(model, fn, on: bool):
    """(outputs of fn(model, packing), gradients of a weighted sum of its first output) with packing on or off."""
    model.zero_grad()
    outputs = fn(model, on)
    weights = torch.linspace(-1, 1, outputs[0].numel()).view(outputs[0].shape)
    (outputs[0] * weights).sum().backward()
    return [o.detach() for o in outputs if o is not None], {n: p.grad.clone() for n, p in model.named_parameters()
                                                            if p.requires_grad}


def assert_same(model, fn):
    (a, a_grads), (b, b_grads) = outputs_and_grads(model, fn, True), outputs_and_grads(model, fn, False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    for name in b_grads:
        scale = b_grads[name].abs().max().clamp(min=1e-12)  # LoRA A: zero gradient while B is 0
        torch.testing.assert_close(a_grads[name] / scale, b_grads[name] / scale, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- layout


def test_layout_gathers_segments_into_two_padded_blocks():
    """Segments of 3 and 2 tokens without a prefix; of 4 after segment 0, 1 after segment 1, 0 (skipped) after 0.
    Tokens: segment 0 at 0-2, 1 at 3-4, 2 at 5-8, 3 at 9."""
    layout = packed.Layout.from_segments([3, 2, 4, 1, 0], [None, None, 0, 1, 0])
    assert layout.plain.tolist() == [[0, 1, 2], [3, 4, 4]]  # right-padded by repeating the last position
    assert layout.own.tolist() == [[5, 6, 7, 8], [9, 9, 9, 9]]
    assert layout.prefix.tolist() == [[0, 1, 2], [3, 3, 4]]  # left-padded: segment 1 has 2 tokens of 3
    causal = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert layout.mask[0, 0].int().tolist() == [[1, 1, 1] + row for row in causal]
    assert layout.mask[1, 0].int().tolist() == [[0, 1, 1] + row for row in causal]  # not the prefix's pad
    # outputs: the plain block's 2 x 3 first, then the prefixed block's 2 x 4
    assert layout.order.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]


def test_pack_rows_takes_every_real_token_row_by_row():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    index, layout = packed.pack_rows(mask)
    assert index.tolist() == [1, 2, 3, 4, 5, 12, 13, 14, 15]
    assert layout.plain.tolist() == [[0, 1, 2, 2], [3, 4, 4, 4], [5, 6, 7, 8]] and layout.own is None
    assert packed.pack_rows(torch.tensor([[1, 0, 1, 1]])) is None  # a hole: positions would differ


def test_shared_layout_puts_each_completion_after_its_prompt():
    """Prompts [5 6 7] and [8]; completions [9 10] and [11] of prompt 0, [12 13 14] of prompt 1."""
    batch = collate_prompt_completion([[5, 6, 7], [8]], [[9, 10], [11], [12, 13, 14]], [0, 0, 1], pad_id=0)
    tokens, positions, layout, states, targets = _packed_layout(batch)
    flat = batch["input_ids"].flatten()
    # prompts, then each row's completion without its last token ([11] has none: it is only a target)
    assert flat[tokens].tolist() == [5, 6, 7, 8, 9, 12, 13]
    assert positions.tolist() == [0, 1, 2, 0, 3, 1, 2]
    # row 0 is predicted from 7 (packed 2) then 9 (4); row 1 from 7; row 2 from 8 (3), 12 (5), 13 (6)
    assert states.tolist() == [2, 4, 2, 3, 5, 6]
    C = batch["completion_mask"].shape[1]
    assert targets.tolist() == [0, 1, C, 2 * C, 2 * C + 1, 2 * C + 2]
    assert layout.own.tolist() == [[4, 4], [5, 6]] and layout.prefix.tolist() == [[0, 1, 2], [3, 3, 3]]


# ----------------------------------------------------------------------------- equal to the padded forward


def padded_batch(side: str, vocab: int = 103):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 12, 1, 9])
    T = int(lengths.max())
    ids = torch.randint(3, vocab, (4, T), generator=generator)
    columns = torch.arange(T)[None]
    if side == "right":
        mask = columns < lengths[:, None]
    elif side == "left":
        mask = columns >= T - lengths[:, None]
    else:  # left-padded prompt of 4, right-padded completion: each row's real tokens are one run
        mask = (columns >= 4 - lengths[:, None].clamp(max=4)) & (columns < 4 + (lengths[:, None] - 4).clamp(min=0))
    return ids, mask.long()


@pytest.mark.parametrize("vocab", [103, 5000])
@pytest.mark.parametrize("side", ["right", "left", "middle"])
def test_token_logprobs_equal_padded(side, vocab):
    model = make_model(vocab)
    ids, mask = padded_batch(side, vocab)
    target_mask = torch.ones(4, ids.shape[1] - 1, dtype=torch.long)
    target_mask[:, :2] = 0  # a loss mask on top: those targets are 0 too
    assert_same(model, lambda m, packing: model_token_logprobs(m, ids, mask, temperature=0.7, return_entropy=True,
                                                               target_mask=target_mask, packing=packing))
    logprobs, _ = model_token_logprobs(model, ids, mask)
    assert (logprobs[mask[:, 1:] == 0] == 0).all()


@pytest.mark.parametrize("vocab", [103, 5000])
def test_fixed_length_groups_equal_padded(vocab):
    """GRPO's shape: prompts of 3, 3 and 5 tokens; 3 completions of 6 tokens each (5 input tokens)."""
    model = make_model(vocab)
    generator = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    prompts = [ids(3), ids(3), ids(5)]
    batch = collate_prompt_completion(prompts, [ids(6) for _ in range(9)], [i // 3 for i in range(9)], pad_id=0)
    layout = _packed_layout(batch)[2]
    assert layout.plain.shape == (3, 5) and layout.own.shape == (9, 5) and layout.prefix.shape == (9, 5)

    def forward(m, packing):
        if packed.unsupported_reason(m, packing) is None:
            return completion_logprobs(m, batch, temperature=0.7, entropy=True, packing=packing)
        P = batch["prompt_length"]  # the padded plain forward over every row's own copy of its prompt
        target_mask = torch.zeros_like(batch["attention_mask"][:, 1:])
        target_mask[:, P - 1:] = batch["completion_mask"]
        logprobs, entropy = model_token_logprobs(m, batch["input_ids"], batch["attention_mask"], temperature=0.7,
                                                 return_entropy=True, target_mask=target_mask, packing=packing)
        return logprobs[:, P - 1:], entropy[:, P - 1:]

    assert_same(model, forward)


def test_packed_attention_is_what_runs(monkeypatch):
    """Not a silent fallback: the forward goes through the packed attention, once per layer."""
    model = make_model(103)
    calls = []
    original = packed.packed_attention
    monkeypatch.setitem(packed.AttentionInterface._global_mapping, packed.ATTENTION,
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    ids, mask = padded_batch("right")
    model_token_logprobs(model, ids, mask)
    assert len(calls) == model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"  # restored after the call


def test_lora_model_packs_too():
    """PEFT wraps the linear layers; attention is the base model's, switched through the shared config."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(103), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert packed.unsupported_reason(model) is None
    ids, mask = padded_batch("left")
    assert_same(model, lambda m, packing: model_token_logprobs(m, ids, mask, packing=packing))


def test_where_it_does_not_apply():
    model = make_model(103)
    assert packed.unsupported_reason(model) is None
    assert packed.unsupported_reason(model, packing=False) == "padding_free is off"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    assert "model type 'gpt2'" in packed.unsupported_reason(gpt2)
    model.gradient_checkpointing_enable()  # the backward would re-run attention outside the packed call
    assert packed.unsupported_reason(model) == "gradient checkpointing"
    ids, mask = padded_batch("right")
    assert_same(model, lambda m, packing: model_token_logprobs(m, ids, mask, packing=packing))  # the padded forward runs: same results


# ----------------------------------------------------------------------------- recipes


def final_weights(recipe, config_cls, overrides, tmp_path, on: bool) -> dict:
    config = load_config(config_cls, None, {**overrides, "output_dir": str(tmp_path / str(on)), "padding_free": on,
                                            "max_steps": 3, "progress": False, "report_to": [], "max_length": 64})
    return AutoModelForCausalLM.from_pretrained(recipe.train(config)).state_dict()


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_runs_with_and_without_padding_equal(name, tmp_path):
    """Three optimizer steps on rows of mixed lengths: the same weights (1e-5) packed and padded."""
    rows = [{"prompt": "q" * (1 + i % 4), "chosen": "abcde" * (1 + i % 3), "rejected": "xyz" * (1 + (i * 2) % 5),
             "completion": "abcdefghij" * (1 + (i * 3) % 4)} for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe, config_cls = {"sft": (sft, sft.SFTConfig), "dpo": (dpo, dpo.DPOConfig)}[name]
    overrides = {"model": "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2", "data": str(data),
                 "batch_size": 6, "learning_rate": 1e-2}
    if name == "dpo":
        overrides.update(precompute_ref=False, learning_rate=1e-3)
    on, off = (final_weights(recipe, config_cls, overrides, tmp_path, flag) for flag in (True, False))
    for key, value in off.items():
        torch.testing.assert_close(on[key], value, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(on[key], value) for key, value in off.items())  # two paths, not one run twice
