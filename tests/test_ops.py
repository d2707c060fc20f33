"""tether.ops: chunked log-probs / entropy against the obvious full-vocab versions, padding
invariance on a tiny Llama, masked statistics and `aggregate` on hand values, and the
micro-batch invariance of `aggregate` with global counts."""

import math

import pytest
import torch

from tether.ops import (
    aggregate,
    entropy_from_logits,
    kl_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    token_logprobs,
)
from tether.models.forward import model_token_logprobs


def naive_token_logprobs(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels >= 0, picked, torch.zeros_like(picked))


# --------------------------------------------------------------------------- (a) hand values


def test_token_logprobs_hand_value():
    """logits (0, ln 2, ln 5) -> softmax (1, 2, 5) / 8; label 1 -> log(2/8) = log 0.25;
    label -100 (ignored) -> 0.0."""
    logits = torch.tensor([[[0.0, math.log(2), math.log(5)], [1.0, 2.0, 3.0]]])  # (1, 2, 3)
    labels = torch.tensor([[1, -100]])
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[math.log(0.25), 0.0]]))


def test_entropy_hand_value():
    """Uniform over 4 -> ln 4; one-hot-ish (0, -inf-like) -> ~0."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -1e4, -1e4, -1e4]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4), 0.0]]))


def test_kl_from_logits_hand_value():
    """p = (1/2, 1/2), q = (1/4, 3/4): KL(p||q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841."""
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75]]]))
    torch.testing.assert_close(kl_from_logits(p, q), torch.tensor([[0.5 * math.log(4 / 3)]]))


def test_masked_stats_hand_values():
    """values (1, 2, 3, NaN) with mask (1, 1, 1, 0): sum 6, mean 2,
    var unbiased = (1 + 0 + 1) / 2 = 1, population = 2/3; whiten -> (-1, 0, 1, 0)."""
    values = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_sum(values, mask).item() == 6.0
    assert masked_mean(values, mask).item() == 2.0
    assert masked_var(values, mask).item() == pytest.approx(1.0)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    # shift_mean=False keeps the mean: (-1, 0, 1) + 2
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]))
    # an empty mask gives 0, not NaN
    assert masked_mean(values, torch.zeros(4)).item() == 0.0
    # per-row
    torch.testing.assert_close(
        masked_mean(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 1], [0, 1]]), dim=-1),
        torch.tensor([2.0, 7.0]),
    )


VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0]])  # (2, 4)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


def test_aggregate_modes_hand_values():
    """row 0: sum 10 over 4 tokens (mean 2.5); row 1: sum 30 over 2 tokens (mean 15).
    token_mean = 40 / 6; seq_mean_token_mean = (2.5 + 15) / 2 = 8.75;
    token_sum_norm with max_len 8 = 40 / (8 * 2) = 2.5."""
    assert aggregate(VALUES, MASK, "token_mean").item() == pytest.approx(40 / 6)
    assert aggregate(VALUES, MASK, "seq_mean_token_mean").item() == pytest.approx(8.75)
    assert aggregate(VALUES, MASK, "token_sum_norm", max_len=8).item() == pytest.approx(2.5)
    # explicit global counts replace the local ones
    assert aggregate(VALUES, MASK, "token_mean", num_tokens=10).item() == pytest.approx(4.0)
    assert aggregate(VALUES, MASK, "seq_mean_token_mean", num_seqs=5).item() == pytest.approx(17.5 / 5)


def test_aggregate_errors_and_empty_mask():
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(VALUES, MASK, "sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(VALUES, MASK, "token_sum_norm")
    empty = torch.zeros_like(MASK)
    for mode in ("token_mean", "seq_mean_token_mean"):
        assert aggregate(VALUES, empty, mode).item() == 0.0


# --------------------------------------------------------------------------- (b) slow references


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
def test_chunked_token_logprobs_match_naive(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 3).to(dtype)  # 15 rows: 4 and 7 do not divide it
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 2] = -100
    expected = naive_token_logprobs(logits, labels)
    out = token_logprobs(logits, labels, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        entropy_from_logits(logits, chunk_size=chunk_size),
        -(torch.log_softmax(logits.float(), -1).exp() * torch.log_softmax(logits.float(), -1)).sum(-1),
        rtol=0, atol=1e-5,
    )


def test_chunked_gradients_match_naive():
    """Checkpointed chunks give the same gradient as the full-vocab computation,
    for log-probs (with an ignored label), entropy and temperature."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 3, 6, generator=g)
    labels = torch.randint(0, 6, (2, 3), generator=g)
    labels[1, 0] = -100
    weights = torch.randn(2, 3, generator=g)

    def loss(fn):
        x = base.clone().requires_grad_(True)
        (fn(x) * weights).sum().backward()
        return x.grad

    fast = loss(lambda x: token_logprobs(x, labels, chunk_size=4, temperature=0.7)
                + entropy_from_logits(x, chunk_size=4, temperature=0.7))
    slow = loss(lambda x: naive_token_logprobs(x / 0.7, labels)
                + -(torch.log_softmax(x / 0.7, -1).exp() * torch.log_softmax(x / 0.7, -1)).sum(-1))
    torch.testing.assert_close(fast, slow)
    assert fast[1, 0].abs().sum() > 0  # entropy still has a gradient where the label is ignored


# --------------------------------------------------------------------------- (c) invariances


@pytest.fixture(scope="module")
def tiny_models():
    """A tiny Llama (rotary positions: only offsets matter) and a tiny GPT-2 (learned
    absolute positions: left padding breaks it unless position_ids start at 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    return {"llama": llama.eval(), "gpt2": gpt2.eval()}


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    torch.testing.assert_close(position_ids_from_mask(mask), torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_model_token_logprobs_padding_invariant(tiny_models, arch, side):
    """Each sequence alone and inside a padded batch gets the same per-token log-probs and
    entropy; positions whose target is padding are exactly 0."""
    model = tiny_models[arch]
    sequences = [[3, 14, 15, 9, 26, 5], [7, 1, 8], [2, 4, 42, 11]]
    T, pad = max(map(len, sequences)), 0
    input_ids = torch.full((len(sequences), T), pad)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(T - len(seq), T) if side == "left" else slice(0, len(seq))
        input_ids[i, span], mask[i, span] = torch.tensor(seq), 1

    with torch.no_grad():
        batch_lp, batch_ent = model_token_logprobs(model, input_ids, mask, temperature=0.9,
                                                   chunk_size=5, return_entropy=True)
        assert batch_lp.shape == (3, T - 1)
        for i, seq in enumerate(sequences):
            ids = torch.tensor([seq])
            alone_lp, alone_ent = model_token_logprobs(model, ids, torch.ones_like(ids), temperature=0.9,
                                                       return_entropy=True)
            n = len(seq) - 1
            span = slice(T - 1 - n, T - 1) if side == "left" else slice(0, n)
            torch.testing.assert_close(batch_lp[i, span], alone_lp[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(batch_ent[i, span], alone_ent[0], rtol=0, atol=1e-5)
            outside = torch.ones(T - 1, dtype=torch.bool)
            outside[span] = False
            assert (batch_lp[i, outside] == 0).all() and (batch_ent[i, outside] == 0).all()
        # alone: the same as a direct log_softmax of the model's logits at temperature 0.9
        ids = torch.tensor([sequences[0]])
        logits = model(input_ids=ids).logits[:, :-1] / 0.9
        expected = naive_token_logprobs(logits, ids[:, 1:])
        torch.testing.assert_close(model_token_logprobs(model, ids, torch.ones_like(ids), temperature=0.9)[0],
                                   expected, rtol=0, atol=1e-5)
    assert model_token_logprobs(model, ids, torch.ones_like(ids))[1] is None


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_aggregate_microbatches_sum_to_full_batch(mode):
    """Split 4 ragged sequences into micro-batches of 1 and 3: with the GLOBAL token and
    sequence counts, the micro-batch losses add up to the full-batch loss (OpenRLHF's test)."""
    g = torch.Generator().manual_seed(2)
    values = torch.randn(4, 6, generator=g)
    mask = (torch.arange(6) < torch.tensor([[6], [2], [4], [1]])).long()  # ragged lengths
    full = aggregate(values, mask, mode, max_len=6)
    counts = dict(num_tokens=mask.sum(), num_seqs=4, max_len=6)
    parts = aggregate(values[:1], mask[:1], mode, **counts) + aggregate(values[1:], mask[1:], mode, **counts)
    torch.testing.assert_close(parts, full)
    # and the local (wrong) counts would NOT in general give the same value for token_mean
    if mode == "token_mean":
        local = aggregate(values[:1], mask[:1], mode) + aggregate(values[1:], mask[1:], mode)
        assert not torch.allclose(local, full)
