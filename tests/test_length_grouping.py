"""Length-grouped micro-batches (`data.batching.length_groups`): the grouping worked out by hand, and SFT trained
with its micro-batches split by length equals SFT without the split (the loss divides by global token counts)."""

import json

import torch
from transformers import AutoModelForCausalLM

from tether import models, supervised
from tether.config import load_config
from tether.data.batching import grouped_micro_batches, length_groups
from tether.recipes import sft


def test_length_groups_hand_worked():
    """Lengths [10, 2, 3, 9], sorted 2, 3, 9, 10. Padded tokens: one group 4 x 10 = 40; {2,3} {9,10}: 2 x 3 +
    2 x 10 = 26; three groups 25; four 24. Plus call_cost per group: c = 5 gives 45, 36, 40, 44 -> two groups;
    c = 14 gives 54, 54 (a tie: fewer groups) -> one; c = 13 -> 53 vs 52 -> two; c = 0.5 -> four."""
    lengths = [10, 2, 3, 9]
    assert length_groups(lengths, 5) == [[1, 2], [3, 0]]
    assert length_groups(lengths, 14) == [[0, 1, 2, 3]]  # one group keeps the given order
    assert length_groups(lengths, 13) == [[1, 2], [3, 0]]
    assert length_groups(lengths, 0.5) == [[1], [2], [3], [0]]
    assert length_groups(lengths, 0.5, max_groups=2) == [[1, 2], [3, 0]]
    assert length_groups(lengths, float("inf")) == [[0, 1, 2, 3]]
    assert length_groups([7], 0) == [[0]]


def test_grouped_micro_batches_cover_each_index_once():
    lengths = {i: (i * 37) % 50 + 1 for i in range(100, 112)}
    groups = grouped_micro_batches(list(lengths), 4, lengths, call_cost=2.0)
    assert sorted(i for group in groups for i in group) == sorted(lengths)
    assert all(len(group) <= 4 for group in groups)
    micro = [set(m) for m in (list(lengths)[i:i + 4] for i in range(0, 12, 4))]
    assert all(any(set(group) <= m for m in micro) for group in groups)  # a group never mixes micro-batches


def test_sft_with_length_groups_equals_without(tmp_path, monkeypatch):
    """Rows of 3 to 40 characters; every split is forced (call cost 0): the weights after 3 steps equal those
    of the unsplit run (1e-5), and the split did happen (more forwards, of fewer rows)."""
    rows = [{"prompt": "q" * (1 + i % 4), "completion": "abcdefghij" * (1 + (i * 3) % 4)} for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(models, "forward_call_cost", lambda model, device: 0.0)
    batch_rows = []
    collate = supervised.collate_sft  # the SFT loop the recipe runs
    monkeypatch.setattr(supervised, "collate_sft", lambda examples, pad: batch_rows.append(len(examples)) or
                        collate(examples, pad))
    finals = {}
    for grouping in (True, False):
        config = load_config(sft.SFTConfig, None, {
            "model": "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2", "data": str(data),
            "output_dir": str(tmp_path / str(grouping)), "batch_size": 6, "max_steps": 3, "learning_rate": 1e-2,
            "max_length": 64, "progress": False, "report_to": [], "length_grouping": grouping,
            "padding_free": False})  # grouping is for the padded forward
        batch_rows.clear()
        finals[grouping] = AutoModelForCausalLM.from_pretrained(sft.train(config)).state_dict()
        if grouping:
            assert len(batch_rows) > 3 and max(batch_rows) < 6
        else:
            assert batch_rows == [6, 6, 6]
    for name, value in finals[False].items():
        torch.testing.assert_close(finals[True][name], value, atol=1e-5, rtol=1e-4)
