"""Distillation: teacher traces → student SFT; the token-level KD loss against a reference computed by hand."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether import models
from tether.config import ConfigError, load_config
from tether.data.batching import BatchOrder, collate_sft
from tether.data.sft import build_sft_examples
from tether.models.tiny import tiny_tokenizer
from tether.recipes import distill

STUDENT = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1"
TEACHER = "tiny:hidden_size=48,intermediate_size=96,num_hidden_layers=1"
PAIRS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot", "bee": "buzz"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def config_for(tmp_path, **keys):
    base = {"model": STUDENT, "output_dir": str(tmp_path / "distill"), "batch_size": 4, "max_length": 32,
            "learning_rate": 1e-2, "progress": False, "report_to": []}
    return load_config(distill.DistillConfig, None, {**base, **keys})


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_kd_loss_at_step_0_equals_a_hand_computation(tmp_path, kind):
    """Step 1's logged losses come from the untouched models on the first batch, so they must equal
        nll = -1/|M| Σ_{(b,t) ∈ M} log p_s(y_{t+1} | y_≤t)
        kd  =  1/|M| Σ_{(b,t) ∈ M} Σ_v p_t(v) (log p_t(v) - log p_s(v))   (forward, both at temperature τ)
        kd  =  1/|M| Σ_{(b,t) ∈ M} Σ_v p_s(v) (log p_s(v) - log p_t(v))   (reverse)
    over the completion positions M, written here with explicit softmaxes (micro-batches of 2 are summed)."""
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": f"{a}:", "completion": s}) + "\n" for a, s in PAIRS.items()))
    teacher, _ = models.load(TEACHER, seed=0)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(20.0)  # logits x20: a peaked teacher, far from the near-uniform student
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    tau, coef = 2.0, 0.5
    config = config_for(tmp_path, traces=str(traces), teacher=str(tmp_path / "teacher"), kd_coef=coef, kd_kind=kind,
                        kd_temperature=tau, max_steps=3, micro_batch_size=2)
    distill.train(config)
    logged = read_jsonl(tmp_path / "distill" / "student" / "metrics.jsonl")

    student, tokenizer = models.load(STUDENT, seed=0)
    examples, _ = build_sft_examples([json.loads(line) for line in traces.read_text().splitlines()], tokenizer,
                                     source="traces", max_length=32)
    batch = collate_sft([examples[i] for i in BatchOrder(len(examples), 4, 0).batch(0)], tokenizer.pad_token_id)
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["loss_mask"]  # (B, T-1)
    targets = batch["input_ids"][:, 1:]
    nll = -(torch.log_softmax(s_logits, -1).gather(-1, targets[..., None])[..., 0] * mask).sum() / mask.sum()
    log_p_s, log_p_t = torch.log_softmax(s_logits / tau, -1), torch.log_softmax(t_logits / tau, -1)
    if kind == "forward":
        per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    else:
        per_token = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    kd = (per_token * mask).sum() / mask.sum()

    assert kd.item() > 0.5  # far from 0, so forward and reverse KL differ clearly
    assert logged[0]["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert logged[0]["kd_loss"] == pytest.approx(kd.item(), rel=1e-5)
    assert logged[0]["loss"] == pytest.approx(nll.item() + coef * kd.item(), rel=1e-5)
    assert all(line["kd_loss"] >= 0 for line in logged) and len(logged) == 3


def test_student_learns_the_teacher_traces(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}:", "animal": a}) + "\n" for a in PAIRS))
    config = config_for(tmp_path, data=str(prompts), teacher=TEACHER, max_steps=40, batch_size=6,
                        sampling={"temperature": 1.0, "max_new_tokens": 8})
    final = distill.train(config)

    traces = read_jsonl(tmp_path / "distill" / "traces.jsonl")
    assert [t["animal"] for t in traces] == list(PAIRS)  # one trace per prompt, input columns kept
    assert len({t["completion"] for t in traces}) == len(PAIRS)  # six different traces to learn
    losses = [line["loss"] for line in read_jsonl(tmp_path / "distill" / "student" / "metrics.jsonl")]
    assert losses[-1] < losses[0] / 3, (losses[0], losses[-1])  # the student's NLL on the traces falls
    assert final == tmp_path / "distill" / "final"
    AutoModelForCausalLM.from_pretrained(final)  # the link is a loadable Hugging Face folder


def test_kd_needs_a_shared_vocabulary_and_one_data_source():
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match="share a tokenizer"):
        distill.check_shared_vocab(tiny_tokenizer(), other)
    distill.check_shared_vocab(tiny_tokenizer(), tiny_tokenizer())
    with pytest.raises(ConfigError, match="either `data`"):
        load_config(distill.DistillConfig, None, {"data": "p.jsonl", "traces": "t.jsonl", "teacher": "tiny"})
    with pytest.raises(ConfigError, match="teacher"):
        load_config(distill.DistillConfig, None, {"traces": "t.jsonl", "kd_coef": 0.5})
