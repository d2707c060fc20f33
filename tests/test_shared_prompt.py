"""Prompt-shared training forwards (`tether.models.shared_prompt`) against the plain forward over every row's own
copy of its prompt: GRPO's completion log-probs, entropies and gradients, DPO's pair log-probs and gradients,
with left-padded prompts of different lengths, right-padded completions, shuffled rows, a temperature, the
logits path (small vocabulary) and the chunked-head path (vocabulary >= 4096). Both ways of sharing are
checked, the packed forward (`tether.models.packed`) and the cached one, against the padded plain forward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tether.models.forward as online
from tether.data.preference import PreferencePair
from tether.data.batching import collate_prompt_completion
from tether.models.shared_prompt import completion_logprobs, shares_prompts
from tether.models.tiny import tiny_model, tiny_tokenizer
from tether.rollout import RolloutBatch


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_model(vocab: int):
    """A small Llama; vocab >= 4096 takes the chunked LM-head path (ops.FUSED_HEAD_MIN_VOCAB)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    torch.random.set_rng_state(generator_state)
    return model.train()


def rollout_tensors(vocab: int, group_size: int = 3) -> dict:
    """Prompts of 2, 6 and 4 tokens, G completions each of 1 to 9 tokens, rows shuffled (prompt_index says which
    prompt a row holds)."""
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, vocab, (n,), generator=generator).tolist()

    prompts = [ids(2), ids(6), ids(4)]
    lengths = [1, 9, 5, 3, 7, 9, 2, 6, 4][:3 * group_size]
    batch = RolloutBatch(prompt_ids=prompts, completion_ids=[ids(n) for n in lengths],
                         completion_logprobs=[[0.0] * n for n in lengths], finish_reasons=["length"] * len(lengths),
                         completions=[""] * len(lengths), prompt_index=[i for i in range(3) for _ in range(group_size)])
    tensors = batch.to_tensors(pad_id=0)
    return online.take(tensors, torch.randperm(len(lengths), generator=generator))


def run_both(model, forward, weights, recipe=online, padding_free=True):
    """{shared: (outputs, gradients)} of `forward(model, packing)` with prompt sharing on (packed with
    `padding_free`, else cached) and off (the padded plain forward, packing off) in `recipe`."""
    results = {}
    for shared in (True, False):
        model.zero_grad()
        original = recipe.shares_prompts
        if not shared:
            recipe.shares_prompts = lambda *args, **kwargs: False
        try:
            outputs = forward(model, padding_free and shared)
        finally:
            recipe.shares_prompts = original
        (outputs[0] * weights).sum().backward()
        results[shared] = ([o.detach() for o in outputs if o is not None],
                           {name: p.grad.clone() for name, p in model.named_parameters()})
    return results


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("vocab", [103, 5000])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_grpo_forward_equals_plain_forward(vocab, entropy_grad, padding_free):
    """Same log-probs and entropies (1e-5) and the same gradient of a weighted sum of log-probs (2e-5 relative):
    the shared prompt's gradient is the sum over the rows that read it."""
    model = make_model(vocab)
    batch = rollout_tensors(vocab)
    assert shares_prompts(model, batch["prompt_index"])
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(1))

    def forward(m, packing):
        logprobs, entropy, _ = online.completion_forward(m, batch, temperature=0.7, entropy=True,
                                                         entropy_grad=entropy_grad, packing=packing)
        return logprobs + (entropy if entropy_grad else 0), entropy

    results = run_both(model, forward, weights, padding_free=padding_free)
    (shared, shared_grads), (plain, plain_grads) = results[True], results[False]
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (shared[0][batch["completion_mask"] == 0] == 0).all()
    for name in plain_grads:
        scale = plain_grads[name].abs().max()
        torch.testing.assert_close(shared_grads[name] / scale, plain_grads[name] / scale, atol=2e-5, rtol=0)


@pytest.mark.parametrize("padding_free", [True, False])
def test_dpo_pair_logps_equal_plain_forward(tok, padding_free):
    """Chosen and rejected reading one encoding of their prompt: the same summed log-probs, lengths and
    gradients as the (2B, T) right-padded forward."""
    model = tiny_model(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2).train()
    generator = torch.Generator().manual_seed(0)

    def ids(low, high):
        return torch.randint(6, 90, (int(torch.randint(low, high, (1,), generator=generator)),),
                             generator=generator).tolist()

    pairs = [PreferencePair(ids(2, 9), ids(1, 12), ids(1, 12)) for _ in range(5)]
    results = run_both(model, lambda m, packing: online.pair_logps(m, pairs, tok.pad_token_id, "cpu", packing=packing),
                       torch.linspace(-1, 1, 10), padding_free=padding_free)
    ((a, a_lengths), a_grads), ((b, b_lengths), b_grads) = results[True], results[False]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    assert a_lengths.tolist() == b_lengths.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids)
                                                                                            for p in pairs]
    for name in b_grads:
        scale = b_grads[name].abs().max()
        torch.testing.assert_close(a_grads[name] / scale, b_grads[name] / scale, atol=2e-5, rtol=0)


@pytest.mark.parametrize("padding_free", [True, False])
def test_one_token_completions_need_no_completion_pass(padding_free):
    """Every completion one token long: all of them are predicted from the prompt's last position."""
    model = make_model(103)
    batch = collate_prompt_completion([[5, 6, 7], [8]], [[9], [10], [11], [12]], [0, 0, 1, 1], pad_id=0)
    logprobs, _ = completion_logprobs(model, batch, packing=padding_free)
    with torch.no_grad():
        for row, (prompt, token) in enumerate([([5, 6, 7], 9), ([5, 6, 7], 10), ([8], 11), ([8], 12)]):
            expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)[token]
            torch.testing.assert_close(logprobs[row, 0].detach(), expected, atol=1e-6, rtol=0)


def test_no_completion_tokens_leaves_it_to_the_plain_forward():
    """Every completion empty: nothing to score, so the plain forward runs (it keeps the empty loss in the graph)."""
    batch = collate_prompt_completion([[5, 6, 7]], [[], []], [0, 0], pad_id=0)
    assert completion_logprobs(make_model(103), batch) is None


def test_collate_matches_rollout_layout():
    prompts, completions, index = [[1, 2], [3, 4, 5]], [[6], [7, 8, 9], [10, 11]], [0, 1, 1]
    ours = collate_prompt_completion(prompts, completions, index, pad_id=0)
    rollout = RolloutBatch(prompts, completions, [[0.0] * len(c) for c in completions], ["length"] * 3, [""] * 3,
                           index).to_tensors(pad_id=0)
    for key in ("input_ids", "attention_mask", "completion_mask", "prompt_index", "prompt_length"):
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(rollout[key])), key


def test_sharing_is_off_when_it_cannot_apply():
    model = make_model(103)
    assert not shares_prompts(model, torch.tensor([0, 1, 2]))  # every prompt once: nothing to share
    assert shares_prompts(model, torch.tensor([0, 1, 1]))
    assert shares_prompts(model, torch.tensor([0, 1, 1]), packing=False)  # the cached way applies
    model.gradient_checkpointing_enable()  # turns the KV cache off in training, and packing with it
    assert not shares_prompts(model, torch.tensor([0, 1, 1]))
