"""Faults: non-finite steps are skipped and counted, K in a row stop the run; disk trouble keeps the last
checkpoint; SIGKILL at random points then resume gives the same weights and metrics as an unbroken run."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tether.config import load_config
from tether.recipes import sft
from tether.runtime import checkpoint as ckpt
from tether.runtime.optim import NonFiniteLossError, StepGuard

TIMING_KEYS = {"step_time", "tokens_per_s", "peak_memory_mb", "peak_rss_mb"}
MODEL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2"


def write_task(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_args(data, out, **extra):
    args = {"model": MODEL, "data": data, "output_dir": str(out), "batch_size": 4, "max_steps": 10,
            "learning_rate": 1e-2, "max_length": 32, "progress": False, "report_to": [], "save_steps": 2}
    args.update(extra)
    return args


def test_step_guard_skips_non_finite_and_stops_after_k():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    guard = StepGuard(max_in_a_row=3)
    before = model.weight.detach().clone()
    for _ in range(2):
        (model(torch.ones(1, 2)) * float("nan")).sum().backward()
        _, applied = guard.step(model, optimizer, scheduler, max_grad_norm=1.0)
        assert not applied
    assert torch.equal(model.weight, before) and guard.skipped == 2
    model(torch.ones(1, 2)).sum().backward()
    assert guard.step(model, optimizer, scheduler, max_grad_norm=1.0)[1] and guard.in_a_row == 0
    with pytest.raises(NonFiniteLossError, match="3 steps in a row had a non-finite loss"):
        for _ in range(3):
            (model(torch.ones(1, 2)) * float("inf")).sum().backward()
            guard.step(model, optimizer, scheduler, max_grad_norm=1.0)


def test_nan_loss_in_a_run_is_skipped_then_stops_keeping_last_good_checkpoint(tmp_path, monkeypatch):
    data = write_task(tmp_path)
    real_loss, calls = sft.sft_loss, {"n": 0}

    def poisoned(*args, **kwargs):  # finite for the first 4 steps, NaN from then on
        calls["n"] += 1
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * float("nan"), metrics) if calls["n"] > 4 else (loss, metrics)

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    config = load_config(sft.SFTConfig, None, sft_args(data, tmp_path / "nan", max_steps=20, keep_last=10))
    with pytest.raises(NonFiniteLossError, match="The last good checkpoint is kept"):
        sft.train(config)
    root = tmp_path / "nan" / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-2", "step-4", "step-6", "step-8"]
    # Skipped updates are never applied: checkpoints after step 4 hold the step-4 weights, all finite.
    good = load_file(str(root / "step-4" / "model" / "model.safetensors"))
    last = load_file(str(root / "step-8" / "model" / "model.safetensors"))
    assert all(torch.equal(good[k], last[k]) and torch.isfinite(last[k]).all() for k in good)
    metrics = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics if "skipped_steps" in m] == [1, 2, 3, 4]


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "the disk is full"),
                                          (errno.EROFS, "the file system is read-only")])
def test_disk_trouble_is_clear_and_keeps_previous_checkpoint(tmp_path, monkeypatch, code, reason):
    data = write_task(tmp_path)
    config = load_config(sft.SFTConfig, None, sft_args(data, tmp_path / "disk", max_steps=4))
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if "step-4" in str(path):
            raise OSError(code, os.strerror(code))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match=f"cannot write checkpoint step-4 in .*: {reason}; earlier checkpoints are intact"):
        sft.train(config)
    root = tmp_path / "disk" / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-2"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    assert load_file(str(root / "step-2" / "model" / "model.safetensors"))  # intact and readable


def test_half_written_checkpoint_is_ignored(tmp_path):
    (tmp_path / "step-9").mkdir()  # no trainer_state.pt: a kill during the write
    (tmp_path / ".tmp-step-11-123").mkdir()
    (tmp_path / "step-3").mkdir()
    (tmp_path / "step-3" / ckpt.STATE_FILE).write_bytes(b"x")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-3"


def _run_cli(args: dict, kill_after: float | None = None):
    cmd = [sys.executable, "-m", "tether", "sft"] + [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                                                     for k, v in args.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return
    # Kill once the run has really started training (its first metrics line), then after a seeded delay.
    metrics = args["output_dir"] + "/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.02)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_unbroken_run(tmp_path):
    data = write_task(tmp_path)
    straight = str(tmp_path / "straight")
    _run_cli(sft_args(data, straight, max_steps=16))
    reference = load_file(f"{straight}/final/model.safetensors")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    ref_metrics = strip(json.loads(x) for x in open(f"{straight}/metrics.jsonl").read().splitlines())
    rng = random.Random(1234)
    for trial in range(3):
        out = str(tmp_path / f"killed{trial}")
        _run_cli(sft_args(data, out, max_steps=16), kill_after=rng.uniform(0.0, 0.6))
        for _ in range(3):  # a resume may itself be killed; keep going until finished
            if os.path.exists(f"{out}/final/model.safetensors"):
                break
            _run_cli(sft_args(data, out, max_steps=16, resume=True))
        resumed = load_file(f"{out}/final/model.safetensors")
        assert all(torch.equal(reference[k], resumed[k]) for k in reference), f"trial {trial}"
        metrics = strip(json.loads(x) for x in open(f"{out}/metrics.jsonl").read().splitlines())
        assert metrics == ref_metrics, f"trial {trial}"
