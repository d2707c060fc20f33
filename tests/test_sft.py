"""SFT end to end: the tiny model learns a task made here, exact resume, LoRA, the command line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.cli import main
from tether.config import load_config
from tether.recipes import sft
from tether.runtime.checkpoint import complete_checkpoints
from tether.runtime.run import Run

PAIRS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot", "bee": "buzz"}
TIMING_KEYS = {"step_time", "tokens_per_s", "peak_memory_mb", "peak_rss_mb"}


def write_task(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}:", "completion": s}) + "\n" for a, s in PAIRS.items()))
    return str(path)


def config_for(tmp_path, data, name, **overrides):
    base = {"model": "tiny:hidden_size=64,intermediate_size=128,num_hidden_layers=2", "data": data,
            "output_dir": str(tmp_path / name), "batch_size": 6, "max_steps": 60, "learning_rate": 1e-2,
            "warmup_steps": 5, "max_length": 32, "progress": False, "report_to": []}
    base.update(overrides)
    return load_config(sft.SFTConfig, None, base)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def greedy(folder, prompt, n=6):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_tiny_model_learns_and_generates_the_answers(tmp_path):
    data = write_task(tmp_path)
    final = sft.train(config_for(tmp_path, data, "learn"))
    metrics = read_metrics(tmp_path / "learn")
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert last < first / 10, (first, last)  # the loss falls by at least 10x
    assert {greedy(final, f"{a}:") for a in PAIRS} == set(PAIRS.values())
    assert (tmp_path / "learn" / "config.yaml").exists()
    assert list((tmp_path / "learn" / "tensorboard").glob("events.*")) == []  # report_to=[] → no TB
    assert all(k in metrics[0] for k in ("loss", "lr", "grad_norm", "tokens_per_s"))


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    data = write_task(tmp_path)
    straight = sft.train(config_for(tmp_path, data, "straight", max_steps=12, save_steps=6))

    class Interrupt(Exception):
        pass

    original = Run.end_step

    def stop_after_six(self, step, *args, **kwargs):
        row = original(self, step, *args, **kwargs)
        if step == 6:
            raise Interrupt  # the process dies right after the step-6 checkpoint
        return row

    monkeypatch.setattr(Run, "end_step", stop_after_six)
    with pytest.raises(Interrupt):
        sft.train(config_for(tmp_path, data, "resumed", max_steps=12, save_steps=6))
    monkeypatch.setattr(Run, "end_step", original)
    assert [p.name for p in complete_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step-6"]
    resumed = sft.train(config_for(tmp_path, data, "resumed", max_steps=12, save_steps=6, resume=True))

    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise on CPU
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "straight")) == strip(read_metrics(tmp_path / "resumed"))
    assert len(read_metrics(tmp_path / "resumed")) == 12


def test_keep_last_rotates_checkpoints(tmp_path):
    data = write_task(tmp_path)
    sft.train(config_for(tmp_path, data, "rot", max_steps=8, save_steps=2, keep_last=2))
    assert [p.name for p in complete_checkpoints(tmp_path / "rot" / "checkpoints")] == ["step-6", "step-8"]


def test_gradient_accumulation_matches_full_batch(tmp_path):
    data = write_task(tmp_path)
    full = sft.train(config_for(tmp_path, data, "full", max_steps=3))
    accum = sft.train(config_for(tmp_path, data, "accum", max_steps=3, micro_batch_size=2))
    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(accum).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_lora_sft_trains_only_adapters_and_saves_both(tmp_path):
    data = write_task(tmp_path)
    final = sft.train(config_for(tmp_path, data, "lora", max_steps=60, learning_rate=5e-2, **{"lora.r": 8,
                                 "lora.alpha": 16, "lora.target_modules": ["all-linear"]}))
    metrics = read_metrics(tmp_path / "lora")
    # LoRA on a randomly initialised base learns slowly; this checks the adapters do receive updates.
    assert metrics[-1]["loss"] < 0.9 * metrics[0]["loss"]
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert (final / "model.safetensors").exists()  # merged, loads without peft
    AutoModelForCausalLM.from_pretrained(final)


def test_command_line_runs_the_example_config(tmp_path, capsys):
    data = write_task(tmp_path)
    code = main(["sft", "--config", "examples/sft_tiny.yaml", f"data={data}", f"output_dir={tmp_path}/cli",
                 "max_steps=3", "save_steps=0", "progress=false"])
    assert code == 0
    assert (tmp_path / "cli" / "final" / "model.safetensors").exists()
    assert len(read_metrics(tmp_path / "cli")) == 3


def test_bad_data_stops_the_cli_with_file_row_field(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    code = main(["sft", f"data={path}", f"output_dir={tmp_path}/bad", "progress=false"])
    assert code == 2
    assert f"{path}, row 1, field 'completion': missing field" in capsys.readouterr().err
