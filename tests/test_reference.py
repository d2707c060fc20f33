"""π_ref (tether/models/reference.py), shared by the DPO and online recipes: a frozen copy keeps the starting
policy's log-probs while the policy trains; under LoRA it is the base model with the adapter disabled (no
copy), after which the adapter and the train mode are back; β = 0 or a reference-free loss builds none."""

import pytest
import torch

from tether import models
from tether.config import load_config
from tether.models import LoraConfig
from tether.models.reference import Reference
from tether.models.forward import model_token_logprobs
from tether import online
from tether.recipes import dpo, grpo

TINY = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


@pytest.fixture(scope="module")
def batch():
    tokenizer = models.load_tokenizer(TINY)
    encoded = tokenizer(["the cat sat", "a dog ran far away"], padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]  # (2, T), (2, T)


def logprobs(model, batch) -> torch.Tensor:
    """Next-token log-probs (2, T-1) of `batch` under `model`, without gradients."""
    with torch.no_grad():
        return model_token_logprobs(model, *batch)[0]


def test_frozen_copy_keeps_the_starting_policy_while_the_policy_trains(batch):
    policy, _ = models.load(TINY, seed=1)
    start = logprobs(policy, batch)
    reference = Reference.from_policy(policy)
    assert reference.frozen is not policy and not any(p.requires_grad for p in reference.frozen.parameters())

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(3):  # maximise the batch's likelihood: the policy moves, π_ref must not
        loss = -model_token_logprobs(policy, *batch)[0].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert (logprobs(policy, batch) - start).abs().max() > 1e-2
    torch.testing.assert_close(reference.logps(model_token_logprobs, *batch), start, atol=1e-6, rtol=0)


def test_lora_reference_is_the_adapter_disabled_base_and_restores_the_policy(batch):
    policy, _ = models.load(TINY, seed=1, lora=LoraConfig(r=4))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))  # a trained adapter
    base, _ = models.load(TINY, seed=1)
    adapted = logprobs(policy, batch)
    policy.train()

    reference = Reference.from_policy(policy)
    assert reference.frozen is None  # no second copy of the model
    ref = reference.logps(model_token_logprobs, *batch)

    torch.testing.assert_close(ref, logprobs(base, batch), atol=1e-5, rtol=0)
    assert (adapted - ref).abs().max() > 1e-2
    assert policy.training  # the train mode is restored ...
    torch.testing.assert_close(logprobs(policy, batch), adapted)  # ... and so is the adapter
    assert not ref.requires_grad


def test_the_unchanged_policy_itself_when_no_copy_is_asked_for(batch):
    """DPO precomputes every reference log-prob before the first update, so it needs no copy."""
    policy, _ = models.load(TINY, seed=1)
    reference = Reference.from_policy(policy, frozen_copy=False)
    assert reference.frozen is None
    torch.testing.assert_close(reference.logps(model_token_logprobs, *batch), logprobs(policy, batch))


def test_no_reference_at_beta_zero_or_for_reference_free_losses(monkeypatch):
    def no_copy(*args, **kwargs):
        raise AssertionError("a reference was built where none is needed")

    monkeypatch.setattr(Reference, "from_policy", no_copy)
    monkeypatch.setattr(models, "load", no_copy)
    policy = torch.nn.Linear(1, 1)
    config = load_config(grpo.GRPOConfig, None, {"kl_coef": 0.0, "rewards": [{"name": "length"}]})
    assert not config.kl_needed()
    assert online.build_reference(policy, config.kl_needed()) is None
    for loss in dpo.REFERENCE_FREE:
        assert dpo.build_reference(load_config(dpo.DPOConfig, None, {"loss": loss}), policy, "cpu") is None
