"""Faults in the preference and online-RL recipes, and safe loading.

- SIGKILL then resume, for DPO and GRPO as real `python -m tether` processes: kills at seeded points, inside a
  checkpoint write, and (GRPO) on both sides of epoch boundaries, with a run that ends mid-epoch. The
  resumed run's final weights equal the unbroken run's bitwise, and metrics.jsonl (and samples.jsonl) are
  equal except timing.
- Resume trims metrics.jsonl / samples.jsonl safely: a torn last line is dropped, and a crash during the
  trim loses no line.
- keep_last rotation never deletes the last complete checkpoint, whatever fails during the next save.
- GRPO's loss is finite, with finite gradients, when completions are empty or carry no loss tokens.
- trainer_state.pt is read with torch.load(weights_only=True): a pickled object in it is refused, not run.
- A user's reward file is executed only when the config names it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from tether import models, online
from tether.config import load_config
from tether.recipes import grpo, sft
from tether.recipes.grpo import GRPOConfig, grpo_loss
from tether.models.forward import take
from tether.online import global_counts
from tether.runtime.logger import SampleWriter
from tether.rewards import RewardSet
from tether.rollout import RolloutBatch
from tether.runtime import checkpoint as ckpt
from tether.runtime.logger import RunLogger
from tether.runtime.optim import build_optimizer, build_scheduler

MODEL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2"
TIMING_KEYS = {"step_time", "tokens_per_s", "peak_memory_mb", "peak_rss_mb"}  # and every "time/..." key


# ----------------------------------------------------------------------------- kill and resume, as processes


@dataclass(frozen=True)
class Kill:
    """Where to SIGKILL one run of `tether <recipe>`.

    External (the default): `delay` seconds after `when(output_dir)` first holds (polled every millisecond).
    Internal (`in_save_of=N`): the process kills itself inside the write of checkpoint step-N, after the model
    folder and half of trainer_state.pt are on disk: a kill in the middle of a checkpoint, every time.
    """

    when: Callable[[Path], bool] = lambda out: metrics_lines(out) >= 1
    delay: float = 0.0
    in_save_of: int | None = None


def metrics_lines(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def checkpoint_complete(step: int) -> Callable[[Path], bool]:
    return lambda out: (out / "checkpoints" / f"step-{step}" / ckpt.STATE_FILE).is_file()


# Run by `python -c` for an internal kill: torch.save of checkpoint step-N's trainer state writes the whole
# file, cuts it to half its size and SIGKILLs its own process, which then never renames the folder.
KILL_IN_SAVE = """
import os, signal, sys
import torch

step, real_save = os.environ["TETHER_TEST_KILL_IN_SAVE"], torch.save

def save_then_die(obj, path, *args, **kwargs):
    if os.path.basename(os.path.dirname(str(path))).startswith(f".tmp-step-{step}-"):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

torch.save = save_then_die
from tether.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class CliResult:
    returncode: int
    stderr: str
    leftovers: list[str]
    """Temporary checkpoint folders in checkpoints/ when the process ended (a write it never finished)."""

    @property
    def resumed_from(self) -> int | None:
        """The step this run resumed from (0: resume=true found no checkpoint); None if it did not resume."""
        if "no complete checkpoint" in self.stderr:
            return 0
        match = re.search(r"resumed from .* \(step (\d+)\)", self.stderr)
        return int(match.group(1)) if match else None


def run_cli(recipe: str, args: dict, kill: Kill | None = None, *, timeout: float = 300) -> CliResult:
    """`python -m tether <recipe> key=value ...` in a fresh process (one thread, offline), killed as `kill`
    says; without `kill` it must succeed. Returns its exit code (-9 when killed) and stderr."""
    out = Path(args["output_dir"])
    overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kill is not None and kill.in_save_of is not None:
        cmd = [sys.executable, "-c", KILL_IN_SAVE, recipe, *overrides]
        env["TETHER_TEST_KILL_IN_SAVE"] = str(kill.in_save_of)
    else:
        cmd = [sys.executable, "-m", "tether", recipe, *overrides]
    err_path = out.parent / f".{out.name}-stderr-{time.monotonic_ns()}.txt"
    with open(err_path, "w+b") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            if kill is not None and kill.in_save_of is None:
                deadline = time.monotonic() + timeout
                while proc.poll() is None and not kill.when(out):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"kill condition never held for {cmd}")
                    time.sleep(0.001)
                time.sleep(kill.delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        leftovers = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))
        result = CliResult(proc.returncode, err.read().decode(errors="replace"), leftovers)
    if kill is None or result.returncode != -signal.SIGKILL:
        assert result.returncode == 0, f"tether {recipe} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def kill_and_resume(recipe: str, args: dict, kills: list[Kill]) -> list[CliResult]:
    """Run `tether <recipe>` in `args["output_dir"]` once per kill (the first run fresh, the others with
    resume=true), each killed as its Kill says, then once more with resume=true to the end. A run that
    finishes before its kill lands ends the sequence early. Returns every run's result, in order."""
    results = []
    for i, kill in enumerate(kills):
        results.append(run_cli(recipe, {**args, "resume": i > 0}, kill))
        if results[-1].returncode == 0:
            return results
    return results + [run_cli(recipe, {**args, "resume": True})]


def read_rows(path: Path, drop_timing: bool = True) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if drop_timing:
        rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time/")} for r in rows]
    return rows


def assert_same_run(straight: Path, resumed: Path) -> None:
    """Final weights bitwise equal; metrics.jsonl equal except timing; samples.jsonl (if any) equal."""
    reference = load_file(str(straight / "final" / "model.safetensors"))
    weights = load_file(str(resumed / "final" / "model.safetensors"))
    assert reference.keys() == weights.keys()
    different = [k for k in reference if not torch.equal(reference[k], weights[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    assert read_rows(resumed / "metrics.jsonl") == read_rows(straight / "metrics.jsonl")
    if (straight / "samples.jsonl").exists():
        assert (resumed / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()
    assert not list((resumed / "checkpoints").glob(".tmp-*")), "a killed write's temporary folder was left behind"


@pytest.mark.slow
def test_dpo_sigkill_at_seeded_points_and_inside_a_checkpoint_then_resume_equals_unbroken_run(tmp_path):
    """12 pairs, 4 per step (an epoch is 3 steps), 8 steps, a checkpoint every 2. First run: SIGKILL at a
    seeded moment after a seeded step. Its resume: killed inside the write of checkpoint step-6 (model on
    disk, trainer state half written), so the next resume starts from step-4. Then run to the end."""
    rng = random.Random(20240611)
    pairs = tmp_path / "pairs.jsonl"
    rows = []
    for _ in range(12):
        word = "".join(rng.choice("abcdef") for _ in range(3))
        rows.append({"prompt": f"{word}?", "chosen": f"yes {word}", "rejected": "no"})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = {"model": MODEL, "data": str(pairs), "batch_size": 4, "max_steps": 8, "save_steps": 2, "keep_last": 2,
            "max_length": 32, "learning_rate": 1e-2, "progress": False, "report_to": []}
    run_cli("dpo", {**args, "output_dir": str(tmp_path / "straight")})

    after_step = rng.randint(1, 4)
    kills = [Kill(when=lambda out: metrics_lines(out) >= after_step, delay=rng.uniform(0.0, 0.05)),
             Kill(in_save_of=6)]
    first, *resumes = kill_and_resume("dpo", {**args, "output_dir": str(tmp_path / "killed")}, kills)
    if resumes:  # (on a starved machine the first run may finish before its kill lands)
        assert first.returncode == -signal.SIGKILL and resumes[0].resumed_from in (0, 2, 4, 6)
    if len(resumes) == 2:  # the second run reached checkpoint 6 and died writing it: step-4 is the latest
        assert resumes[0].returncode == -signal.SIGKILL and resumes[1].resumed_from == 4
        assert [name.rsplit("-", 1)[0] for name in resumes[0].leftovers] == [".tmp-step-6"]
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.slow
def test_grpo_sigkill_mid_epoch_and_at_an_epoch_boundary_then_resume_equals_unbroken_run(tmp_path):
    """6 prompts, 4 per step: an epoch is 1.5 steps, so the prompt cursor crosses epoch boundaries inside
    steps 2 and 5 and exactly at the ends of steps 3 and 6; 7 steps end mid-epoch. A checkpoint every 2.
    First run: killed inside the write of checkpoint step-4, so it resumes from step-2 (cursor 8, mid-epoch)
    and replays across three epoch boundaries. That run: killed a seeded moment after checkpoint step-6 is
    complete (cursor 24, exactly 4 epochs), so the last run resumes at an epoch boundary and ends mid-epoch."""
    rng = random.Random(7)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "x" * (1 + i % 3), "answer": str(i)}) + "\n" for i in range(6)))
    reward = tmp_path / "reward.py"
    reward.write_text("def digits(prompts, completions, **columns):\n"
                      "    return [sum(c.isdigit() for c in t) / len(t) if t else 0.0 for t in completions]\n")
    args = {"model": MODEL, "data": str(prompts), "rewards": [{"name": f"{reward}:digits"}], "batch_size": 4,
            "group_size": 2, "max_steps": 7, "save_steps": 2, "keep_last": 2, "max_prompt_length": 8,
            "max_completion_length": 6, "max_length": 16, "learning_rate": 1e-2, "sample_steps": 1,
            "progress": False, "report_to": []}
    run_cli("grpo", {**args, "output_dir": str(tmp_path / "straight")})

    kills = [Kill(in_save_of=4), Kill(when=checkpoint_complete(6), delay=rng.uniform(0.0, 0.01))]
    first, *resumes = kill_and_resume("grpo", {**args, "output_dir": str(tmp_path / "killed")}, kills)
    assert first.returncode == -signal.SIGKILL and [n.rsplit("-", 1)[0] for n in first.leftovers] == [".tmp-step-4"]
    assert resumes[0].resumed_from == 2  # cursor 8: two prompts into the second epoch
    if len(resumes) == 2:  # killed after checkpoint 6 (cursor 24, four whole epochs) and before the end
        assert resumes[1].resumed_from == 6
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


def step_lines(steps, torn: bool = False) -> str:
    text = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)
    return text + ('{"step": 7, "loss": 0.1' if torn else "")  # a line cut short by a crash mid-write


def trim_on_resume(kind: str, run_dir: Path, start_step: int) -> None:
    """What a run resumed from checkpoint `start_step` does to its per-step log file on start."""
    if kind == "metrics":
        RunLogger(run_dir, total_steps=10, start_step=start_step, report_to=[], progress=False).close()
    else:
        SampleWriter(run_dir, 1, start_step=start_step)


@pytest.mark.parametrize("kind", ["metrics", "samples"])
def test_resume_drops_a_torn_last_line_of_the_step_logs(tmp_path, kind):
    """A SIGKILL inside a long write (or a full disk) leaves the last line of metrics.jsonl / samples.jsonl
    cut short. Resuming from step 4 keeps lines 1-4 and drops the rest, torn line included, instead of
    failing on it with a JSONDecodeError."""
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(step_lines(range(1, 7), torn=True))
    trim_on_resume(kind, tmp_path, 4)
    assert path.read_text() == step_lines(range(1, 5))


@pytest.mark.parametrize("kind", ["metrics", "samples"])
def test_a_crash_while_trimming_the_step_logs_on_resume_loses_no_line(tmp_path, monkeypatch, kind):
    """Resume trims the lines after the checkpoint. If the process dies halfway through that rewrite, the
    file still holds every line up to the checkpoint, so the next resume gives the same file."""
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(step_lines(range(1, 7)))

    class Killed(BaseException):
        pass

    real_write_text = Path.write_text

    def write_half_then_die(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", write_half_then_die)
        with pytest.raises(Killed):
            trim_on_resume(kind, tmp_path, 4)
    trim_on_resume(kind, tmp_path, 4)
    assert path.read_text() == step_lines(range(1, 5))


# ----------------------------------------------------------------------------- keep_last rotation


def tiny_training_state(seed: int):
    """A tiny model one AdamW step away from its start: (model, tokenizer, optimizer, scheduler)."""
    model, tokenizer = models.load(MODEL, seed=seed)
    optimizer = build_optimizer(model.parameters(), learning_rate=1e-2, weight_decay=0.0, betas=[0.9, 0.999])
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=0, schedule="cosine")
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    return model, tokenizer, optimizer, scheduler


def fail_model_write(monkeypatch):
    def failing(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_model_folder", failing)


def fail_state_write_halfway(monkeypatch, error=OSError(errno.EIO, os.strerror(errno.EIO))):
    real = torch.save

    def failing(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)
        raise error

    monkeypatch.setattr(ckpt.torch, "save", failing)


def fail_rename(monkeypatch):
    def failing(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(ckpt.os, "replace", failing)


@pytest.mark.parametrize("inject", [fail_model_write, fail_state_write_halfway, fail_rename,
                                    lambda mp: fail_state_write_halfway(mp, RuntimeError("pickling failed"))],
                         ids=["model-write", "state-write", "rename", "non-os-error"])
def test_keep_last_one_keeps_the_previous_checkpoint_when_the_next_save_fails(tmp_path, monkeypatch, inject):
    """keep_last=1: step-2 is written; the save of step-4 fails (model write, half-written trainer state,
    the rename, or an error that is not an OSError). step-2 is still the one complete checkpoint, and it loads
    back the exact weights, optimizer moments, scheduler and step."""
    model, tokenizer, optimizer, scheduler = tiny_training_state(seed=0)
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 2, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                         keep_last=1, extra={"prompt_cursor": 8})
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]

    model(input_ids=torch.tensor([[4, 5]])).logits.sum().backward()  # the weights move on before step 4
    optimizer.step()
    scheduler.step()
    with monkeypatch.context() as patch:
        inject(patch)
        with pytest.raises((OSError, RuntimeError)):
            ckpt.save_checkpoint(root, 4, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                 scheduler=scheduler, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-2"]
    assert ckpt.latest_checkpoint(root).name == "step-2"

    fresh, _, fresh_optimizer, fresh_scheduler = tiny_training_state(seed=1)
    step, extra = ckpt.load_checkpoint(root / "step-2", model=fresh, optimizer=fresh_optimizer,
                                       scheduler=fresh_scheduler)
    assert step == 2 and extra == {"prompt_cursor": 8}
    assert all(torch.equal(saved_weights[k], v) for k, v in fresh.state_dict().items())
    assert all(torch.equal(m, fresh_optimizer.state[p]["exp_avg"])
               for m, p in zip(saved_moments, fresh.parameters()))
    assert fresh_scheduler.state_dict()["last_epoch"] == 1

    # The next save that succeeds rotates step-2 out and clears what the failed writer left behind.
    ckpt.save_checkpoint(root, 6, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                         keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-6"]


def test_rotation_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    """A run started again (resume=false) in an old output_dir finds the old run's step-8 there. Rotation
    orders by step number, so with keep_last=1 it used to delete the step-2 it had just written and keep
    the stale step-8. The checkpoint just written is always kept."""
    model, tokenizer, optimizer, scheduler = tiny_training_state(seed=0)
    root = tmp_path / "checkpoints"
    stale = ckpt.save_checkpoint(root, 8, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                 scheduler=scheduler, keep_last=1)
    written = ckpt.save_checkpoint(root, 2, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                   scheduler=scheduler, keep_last=1)
    assert written.is_dir() and ckpt.complete_checkpoints(root) == [written] and not stale.exists()
    for keep_last in (2, 3):  # larger windows keep the new checkpoint and the newest others
        ckpt.save_checkpoint(root, 4, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                             keep_last=keep_last)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-2", "step-4"]


# ----------------------------------------------------------------------------- GRPO on empty completions


def rollout_batch(completion_ids: list[list[int]], tokenizer) -> dict:
    """Tensors of 2 prompts × 2 completions with the given completion ids (sampling log-probs -1 each)."""
    samples = RolloutBatch(prompt_ids=[[5, 6, 7], [8, 9]], completion_ids=completion_ids,
                           completion_logprobs=[[-1.0] * len(c) for c in completion_ids],
                           finish_reasons=["length"] * 4, completions=[""] * 4, prompt_index=[0, 0, 1, 1])
    return samples.to_tensors(tokenizer.pad_token_id)


@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
@pytest.mark.parametrize("case", ["zero-length", "all-masked"])
def test_grpo_loss_is_finite_for_empty_or_fully_masked_completions(case, aggregation, importance_level):
    """zero-length: every completion has 0 tokens, so C = 0 and the batch holds no completion token at all;
    all-masked: completions have tokens but the loss mask is all zero (every one truncated under
    mask_truncated, or none judged). The loss (clipped surrogate + β·KL + entropy bonus) is exactly 0,
    every metric finite, and backward gives finite (zero) gradients, in one batch and split in two."""
    model, tokenizer = models.load(MODEL, seed=0)
    completions = [[], [], [], []] if case == "zero-length" else [[11], [12, 13, 14], [15, 16], [17]]
    batch = rollout_batch(completions, tokenizer)
    batch["loss_mask"] = torch.zeros_like(batch["completion_mask"])  # (N, C)
    batch["old_logprobs"] = batch["sampling_logprobs"]
    batch["ref_logprobs"] = batch["sampling_logprobs"] - 0.5
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    config = load_config(GRPOConfig, None, ["rewards=[{name: math}]", f"loss_aggregation={aggregation}",
                                            f"importance_level={importance_level}", "kl_coef=0.1",
                                            "entropy_coef=0.01", "dual_clip=3.0", "max_completion_length=4"])
    counts = global_counts(batch, torch.arange(4), config.max_completion_length)
    for micro_index in ([0, 1, 2, 3], [0, 1]):
        model.zero_grad()
        loss, terms, metrics = grpo_loss(model, take(batch, torch.tensor(micro_index)), config, beta=0.1,
                                         counts=counts, temperature=1.0)
        loss.backward()
        assert loss.item() == 0.0
        assert all(math.isfinite(float(v)) for v in [*terms.values(), *metrics.values()])
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_grpo_run_with_only_empty_completions_trains_on_finite_numbers(tmp_path, monkeypatch):
    """A sampler that returns nothing but empty, truncated completions (as an engine may at a tight length
    budget): two GRPO steps with a reference and an entropy bonus log a 0 loss and finite gradient norms and
    skip no optimizer step."""

    class EmptySampler:
        def generate(self, prompts, params):
            n = len(prompts) * params.n
            return RolloutBatch(prompt_ids=[list(p) for p in prompts], completion_ids=[[] for _ in range(n)],
                                completion_logprobs=[[] for _ in range(n)], finish_reasons=["length"] * n,
                                completions=[""] * n, prompt_index=[i for i in range(len(prompts))
                                                                    for _ in range(params.n)])

        def load_weights(self, model):
            pass

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "x" * (1 + i)}) + "\n" for i in range(4)))
    reward = tmp_path / "reward.py"
    reward.write_text("def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n")
    monkeypatch.setattr(online, "build_sampler", lambda config, model, tokenizer: EmptySampler())
    grpo.train(load_config(GRPOConfig, None, [
        f"data={data}", f"model={MODEL}", f"rewards=[{{name: '{reward}:length'}}]", f"output_dir={tmp_path / 'run'}",
        "report_to=[]", "progress=false", "batch_size=2", "group_size=2", "max_steps=2", "max_prompt_length=8",
        "max_completion_length=4", "max_length=16", "kl_coef=0.1", "entropy_coef=0.01"]))
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert row["loss"] == 0.0 and row["completion_length_max"] == 0.0 and row["truncated_frac"] == 1.0
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in row.values()), row
        assert "skipped_steps" not in row


# ----------------------------------------------------------------------------- safe loading


class SideEffect:
    """Unpickling this runs os.mkdir(marker): what an attacker's trainer_state.pt would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_trainer_state_holding_a_pickled_object_is_refused_on_resume(tmp_path):
    """A checkpoint whose trainer_state.pt carries a pickled object (whose unpickling would create a
    folder) is refused by resume=true with an UnpicklingError: it is read with weights_only=True and the
    object's code never runs."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1)}) + "\n" for a in range(8)))
    args = {"model": MODEL, "data": str(data), "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 2,
            "save_steps": 2, "max_length": 16, "progress": False, "report_to": []}
    sft.train(load_config(sft.SFTConfig, None, args))
    state_file = tmp_path / "run" / "checkpoints" / "step-2" / ckpt.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "code-ran"
    state["extra"]["payload"] = SideEffect(str(marker))
    torch.save(state, state_file)

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        sft.train(load_config(sft.SFTConfig, None, {**args, "max_steps": 4, "resume": True}))
    assert not marker.exists()
    torch.load(state_file, weights_only=False)  # proof that the payload is live: unsafe loading runs it
    assert marker.is_dir()


def test_user_reward_file_runs_only_when_named(tmp_path, monkeypatch):
    """Two reward files beside the data, each recording its import in a marker file. A GRPO config that
    names only built-in rewards imports neither; naming one imports that one, once, and never its neighbour."""
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    for name in ("chosen_reward", "other_reward"):
        (tmp_path / f"{name}.py").write_text(
            "from pathlib import Path\n"
            f"_marker = Path(__file__).with_suffix('.imported')\n"
            "_marker.write_text(_marker.read_text() + 'x' if _marker.exists() else 'x')\n"
            "def score(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)  # a user running tether in that folder: its files are on hand, not named
    base = [f"data={data}", f"model={MODEL}", f"output_dir={tmp_path / 'run'}", "report_to=[]"]

    config = load_config(GRPOConfig, None, [*base, "rewards=[{name: math}, {name: format}]"])
    RewardSet(config.rewards)
    assert not list(tmp_path.glob("*.imported"))

    config = load_config(GRPOConfig, None, [*base, "rewards=[{name: 'chosen_reward.py:score'}]"])
    rewards = RewardSet(config.rewards)
    assert rewards(["1+1="], ["2"]).total == [1.0]
    assert (tmp_path / "chosen_reward.imported").read_text() == "x"  # imported once, for validation and use
    assert not (tmp_path / "other_reward.imported").exists()


def test_a_fresh_run_refuses_an_output_dir_holding_an_earlier_runs_checkpoints(tmp_path):
    """Started again with resume=false, a run would write its checkpoints beside the old run's, and a later
    resume=true could pick up the old run's higher step. It stops at once with a message naming the folder, the
    checkpoint and both ways out; resume=true continues the old run; a run that kept no checkpoints is no
    obstacle."""
    from tether.config import ConfigError

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    keys = {"model": "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1", "data": str(data),
            "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 2, "save_steps": 1,
            "report_to": [], "progress": False}
    sft.train(load_config(sft.SFTConfig, None, keys))
    with pytest.raises(ConfigError, match=r"resume.*checkpoints holds a checkpoint of an earlier run \(step-2\)"):
        sft.train(load_config(sft.SFTConfig, None, keys))
    sft.train(load_config(sft.SFTConfig, None, {**keys, "resume": True, "max_steps": 3}))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step-3"
    no_checkpoints = {**keys, "output_dir": str(tmp_path / "plain"), "save_steps": 0}
    sft.train(load_config(sft.SFTConfig, None, no_checkpoints))
    sft.train(load_config(sft.SFTConfig, None, no_checkpoints))  # nothing to mix up: it runs again
