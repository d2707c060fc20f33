"""The benchmark's fast paths equal the slow, obvious versions they replace.

- `ops.linear_token_logprobs` (chunked LM head, no (N, V) logits) against `ops.token_logprobs` on the full logits:
  values, entropy and gradients (hidden and weight), with a temperature, ignored labels and several chunks;
- `models.forward.model_token_logprobs` through the fused head against the logits path on a real model, with left padding
  and a target mask;
- `sampler.draw_inverse_cdf` draws with the softmax's frequencies (banned ids never), on vocabularies with a
  partial last block, and returns the log-prob of the full distribution.
"""

import pytest
import torch

from tether import ops
from tether.models import forward
from tether.models.tiny import tiny_model, tiny_tokenizer
from tether.rollout import sampler


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_token_logprobs_equals_full_logits(temperature, monkeypatch):
    monkeypatch.setattr(ops, "HEAD_CHUNK_BYTES", 4 * 50 * 7)  # 7 rows per chunk: several chunks
    torch.manual_seed(0)
    B, T, H, V = 3, 11, 8, 50
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100
    labels[2, -3:] = -100
    upstream = torch.randn(B, T)

    fast, entropy = ops.linear_token_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True)
    (fast * upstream).sum().backward()
    fast_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.T
    slow = ops.token_logprobs(logits, labels, temperature=temperature)
    (slow * upstream).sum().backward()
    slow_entropy = ops.entropy_from_logits(logits.detach(), temperature=temperature) * (labels >= 0)

    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, slow_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grads[1], weight.grad, rtol=1e-5, atol=1e-5)


def test_model_token_logprobs_fused_head_equals_logits_path(monkeypatch):
    monkeypatch.setattr(ops, "FUSED_HEAD_MIN_VOCAB", 1)  # the tiny model's ~100 tokens take the fused path too
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    input_ids = torch.randint(10, len(tokenizer), (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    target_mask = torch.ones(3, 8, dtype=torch.long)
    target_mask[0, :4] = 0

    fast, fast_entropy = forward.model_token_logprobs(model, input_ids, attention_mask, return_entropy=True,
                                                  target_mask=target_mask)
    fast.sum().backward()
    fast_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    assert ops.plain_lm_head(model) is not None
    monkeypatch.setattr(ops, "plain_lm_head", lambda model: None)  # force the logits path
    slow, slow_entropy = forward.model_token_logprobs(model, input_ids, attention_mask, return_entropy=True)
    keep = (target_mask.bool() & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()).float()
    (slow * keep).sum().backward()

    torch.testing.assert_close(fast, slow * keep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_entropy, slow_entropy * keep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocab", [5, 1500, 3000])
def test_inverse_cdf_frequencies_and_logprobs(vocab):
    torch.manual_seed(1)
    scaled = torch.randn(1, vocab) * 2
    banned = torch.tensor([0, vocab - 1])
    n = 20_000
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = sampler.draw_inverse_cdf(scaled.expand(n, vocab).contiguous(), generator, banned)

    probs = torch.softmax(scaled[0], -1)
    allowed = probs.clone()
    allowed[banned] = 0
    allowed /= allowed.sum()
    frequencies = torch.bincount(tokens, minlength=vocab).float() / n
    assert frequencies[banned].sum() == 0
    # within 5 standard errors everywhere (a per-entry bound over at most 3000 entries)
    assert ((frequencies - allowed).abs() <= 5 * (allowed * (1 - allowed) / n).sqrt() + 1e-4).all()
    torch.testing.assert_close(logprobs, torch.log_softmax(scaled[0], -1)[tokens], rtol=1e-5, atol=1e-5)
