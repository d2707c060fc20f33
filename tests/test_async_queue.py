"""The async rollout queue with a real built-in sampler on its own copy of the policy: batches come in step
order, each at most k weight pushes stale (k pushes when the trainer is the slower side: generation overlapped
with training; k = 0: always 0, synchronous), a batch is sampled from the weights of its recorded version
(checked against a fresh sampler on that version's weights), the worker never runs more than k batches ahead,
its errors reach the trainer, and close() stops it."""

import copy
import threading
import time

import pytest
import torch

from tether.models.tiny import tiny_model, tiny_tokenizer
from tether.rollout import BuiltinSampler, SamplingParams
from tether.rollout.async_queue import RolloutQueue

PARAMS = SamplingParams(temperature=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def perturbed(model, version: int):
    """The policy after `version` updates: a deterministic change of the output layer per update."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for v in range(version):
            model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape,
                                                  generator=torch.Generator().manual_seed(v)) * 0.5)
    return model


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_staleness_order_and_weights_of_each_batch(tok, ahead):
    start_model = tiny_model(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2, initializer_range=0.2)
    engine_model = copy.deepcopy(start_model)  # the sampler owns its weights
    sampler = BuiltinSampler(engine_model, tok)
    produced_at = {}  # step -> batches the trainer had taken when the worker began it
    taken = [0]

    def produce(step):
        produced_at[step] = taken[0]
        return sampler.generate(["hello", "ab"], PARAMS)

    rollouts = RolloutQueue(produce, ahead=ahead, start=0, stop=6)
    items = []
    for step in range(6):
        item = rollouts.get()
        taken[0] += 1
        items.append(item)
        time.sleep(0.3)  # the update: long enough for the worker to fill the queue meanwhile
        new_weights = perturbed(start_model, step + 1)
        rollouts.push_weights(lambda: engine_model.load_state_dict(new_weights.state_dict()))
    rollouts.close()

    assert [item.step for item in items] == list(range(6))
    staleness = [item.staleness for item in items]
    assert all(lag <= min(step, ahead) for step, lag in enumerate(staleness)), staleness  # at most k behind
    if ahead == 0:
        assert staleness == [0] * 6
    else:  # the worker ran ahead while the trainer slept: it overlapped generation with training
        assert staleness[-1] == ahead, staleness
    assert all(produced_at[step] >= step - ahead for step in range(6))  # never more than `ahead` in front
    for item in items:  # each batch is what its recorded weights give
        want = BuiltinSampler(perturbed(start_model, item.version), tok).generate(["hello", "ab"], PARAMS)
        assert item.rollout.completion_ids == want.completion_ids


def test_worker_error_reaches_the_trainer_and_close_stops_it():
    def produce(step):
        if step == 1:
            raise RuntimeError("reward server down")
        return step

    rollouts = RolloutQueue(produce, ahead=2, start=0, stop=5)
    assert rollouts.get().rollout == 0
    with pytest.raises(RuntimeError, match="reward server down"):
        rollouts.get()
    rollouts.close()

    blocked = RolloutQueue(lambda step: step, ahead=1, start=0, stop=100)
    assert blocked.get().rollout == 0
    blocked.close()
    assert not blocked._worker.is_alive()
    assert threading.active_count() >= 1
    with pytest.raises(ValueError, match="async_rollouts must be >= 0"):
        RolloutQueue(lambda step: step, ahead=-1, start=0, stop=1)
