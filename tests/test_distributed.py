"""Data-parallel training under torchrun (2 gloo processes on CPU).

Each test starts `python -m torch.distributed.run --nproc_per_node 2 -m tether ...` and compares it with one
process doing the same global batches: losses and weights must agree (the loss is a mean over the global
batch's tokens, so splitting it over ranks or micro-batches changes only float rounding), checkpoints must
move between 1 rank and 2 FSDP ranks, and a rank that dies or hangs must stop the job with a clear error.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.config import ConfigError, load_config
from tether.recipes import sft
from tether.runtime import distributed

MODEL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2"
PAIRS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot", "bee": "buzz",
         "pig": "oink", "ant": "tick"}
# A constant learning rate: the schedule then does not depend on max_steps, so a run cut short at step 2 and
# resumed with max_steps=4 follows the same path as one run of 4 steps.
SFT_KEYS = {"model": MODEL, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant",
            "max_length": 32, "save_steps": 2, "keep_last": 3, "progress": False, "report_to": []}
TOLERANCE = 1e-5
REFERENCE_STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}" for k, v in values.items()]


def torchrun_command(command: str, values: dict, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "tether", command,
            *overrides(values)]


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(command: str, values: dict, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_command(command, values, nproc), env=worker_env(), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb), set(wa) ^ set(wb)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def max_loss_diff(a: list[dict], b: list[dict]) -> float:
    assert [row["step"] for row in a] == [row["step"] for row in b]
    return max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("task")
    (folder / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a}:", "completion": s}) + "\n" for a, s in PAIRS.items()))
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory) -> Path:
    """One process, REFERENCE_STEPS steps, checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("reference")
    sft.train(load_config(sft.SFTConfig, None, {**SFT_KEYS, "data": str(task), "output_dir": str(run_dir),
                                                "max_steps": REFERENCE_STEPS}))
    return run_dir


def test_two_ddp_ranks_equal_one_process(task, reference, tmp_path):
    """Same global batches of 4: one process (2 micro-batches of 2) vs 2 DDP ranks (2 micro-batches of 1 each)."""
    run_dir = tmp_path / "ddp"
    torchrun("sft", {**SFT_KEYS, "data": task, "output_dir": run_dir, "max_steps": 4})
    metrics = read_metrics(run_dir)
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]  # one line per step: only rank 0 writes
    loss_diff = max_loss_diff(metrics, read_metrics(reference)[:4])
    weight_diff = max_weight_diff(run_dir / "final", reference / "checkpoints" / "step-4" / "model")
    print(f"DDP 2 ranks vs 1 process: max |Δloss| {loss_diff:.2e}, max |Δweight| {weight_diff:.2e}")
    assert loss_diff < TOLERANCE and weight_diff < TOLERANCE
    assert [row["num_tokens"] for row in metrics] == [row["num_tokens"] for row in read_metrics(reference)[:4]]


@pytest.mark.slow
def test_fsdp_checkpoints_move_between_one_and_two_ranks(task, reference, tmp_path):
    """1 process (steps 0-2) → 2 FSDP ranks (2-4) → 1 process (4-6) equals one uninterrupted process."""
    run_dir = tmp_path / "fsdp"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-2", run_dir / "checkpoints" / "step-2")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in read_metrics(reference)[:2]))

    torchrun("sft", {**SFT_KEYS, "data": task, "output_dir": run_dir, "max_steps": 4, "resume": True,
                     "distributed.strategy": "fsdp"})
    fsdp_weight_diff = max_weight_diff(run_dir / "final", reference / "checkpoints" / "step-4" / "model")
    assert max_weight_diff(run_dir / "checkpoints" / "step-4" / "model", run_dir / "final") == 0
    state = torch.load(run_dir / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and all(isinstance(k, str) for k in state["optimizer"]["state"])

    final = sft.train(load_config(sft.SFTConfig, None, {**SFT_KEYS, "data": str(task), "output_dir": str(run_dir),
                                                        "max_steps": REFERENCE_STEPS, "resume": True}))
    weight_diff = max_weight_diff(final, reference / "final")
    loss_diff = max_loss_diff(read_metrics(run_dir), read_metrics(reference))
    print(f"1 → 2 FSDP ranks → 1 vs uninterrupted: max |Δweight| after FSDP {fsdp_weight_diff:.2e}, "
          f"at the end {weight_diff:.2e}; max |Δloss| {loss_diff:.2e}")
    assert fsdp_weight_diff < TOLERANCE and weight_diff < TOLERANCE and loss_diff < TOLERANCE


# ----------------------------------------------------------------------------- preferences

@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_two_ddp_ranks_equal_one_process_for_dpo(tmp_path, loss):
    """Precomputed reference log-probs (each rank computes a share of the table) and, for KTO, the reference
    point z averaged over the global batch."""
    from tether.recipes import dpo

    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}?", "chosen": s, "rejected": s[::-1] + "!"}) + "\n" for a, s in PAIRS.items()))
    keys = {"model": MODEL, "data": tmp_path / "pairs.jsonl", "loss": loss, "batch_size": 4, "micro_batch_size": 2,
            "learning_rate": 1e-2, "lr_scheduler": "constant", "max_length": 32, "max_steps": 4, "progress": False,
            "report_to": []}
    one = dpo.train(load_config(dpo.DPOConfig, None, overrides({**keys, "output_dir": tmp_path / "one"})))
    torchrun("dpo", {**keys, "output_dir": tmp_path / "two"})
    loss_diff = max_loss_diff(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"))
    weight_diff = max_weight_diff(tmp_path / "two" / "final", one)
    print(f"{loss} 2 DDP ranks vs 1 process: max |Δweight| {weight_diff:.2e}, max |Δloss| {loss_diff:.2e}")
    # One process packs 2 pairs per forward, each rank 1 (models.packed): the matmuls round differently, and
    # 4 Adam steps at lr 1e-2 carry that to ~1e-5 in the weights (1.3e-5 measured), 1e-3 of one step's size.
    assert loss_diff < TOLERANCE and weight_diff < 3 * TOLERANCE


# ----------------------------------------------------------------------------- online RL

GRPO_REWARD = """
def prompt_length_and_variety(prompts, completions, **columns):
    return [(len(prompt) + len(set(text))) / 8 for prompt, text in zip(prompts, completions)]
"""


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_process_for_grpo(tmp_path):
    """GRPO with greedy sampling (top_k=1), so both runs sample the same completions whatever the split, and the
    reinforce estimator, whose running-mean baseline must be taken over the global batch."""
    from tether.recipes import grpo

    (tmp_path / "reward.py").write_text(GRPO_REWARD)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": word}) + "\n" for word in ["cat", "dog", "ox", "bee", "a", "owl", "pig", "hen"]))
    keys = {"model": MODEL, "data": tmp_path / "prompts.jsonl", "batch_size": 4, "group_size": 2,
            "max_completion_length": 6, "top_k": 1, "advantage": "reinforce", "kl_coef": 0.04,
            "rewards": f"[{{name: '{tmp_path / 'reward.py'}:prompt_length_and_variety'}}]", "learning_rate": 1e-2,
            "lr_scheduler": "constant", "max_steps": 3, "sample_steps": 0, "progress": False, "report_to": []}
    one = grpo.train(load_config(grpo.GRPOConfig, None, overrides({**keys, "output_dir": tmp_path / "one"})))
    torchrun("grpo", {**keys, "output_dir": tmp_path / "two"})
    one_metrics, two_metrics = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    loss_diff = max_loss_diff(two_metrics, one_metrics)
    reward_diff = max(abs(a["reward_mean"] - b["reward_mean"]) for a, b in zip(one_metrics, two_metrics))
    weight_diff = max_weight_diff(tmp_path / "two" / "final", one)
    print(f"GRPO 2 DDP ranks vs 1 process: max |Δloss| {loss_diff:.2e}, |Δreward_mean| {reward_diff:.2e}, "
          f"max |Δweight| {weight_diff:.2e}")
    assert loss_diff < TOLERANCE and reward_diff < TOLERANCE and weight_diff < TOLERANCE


def test_minibatches_are_the_same_on_any_number_of_ranks(monkeypatch):
    """24 completions in 3 minibatches: gathered over 2 or 4 simulated ranks (rank r holds global rows r·n ..),
    each minibatch's rows are one process's. A minibatch takes one row of every 3 consecutive ones, in a
    seeded order; with 5 rows per rank (3 does not divide 5) the ranks' minibatches still have equal sizes."""
    from tether.online import minibatches

    whole = [sorted(rows.tolist()) for rows in minibatches(24, 3, seed=7)]
    assert sorted(sum(whole, [])) == list(range(24))
    assert all(len({row // 3 for row in rows}) == 8 for rows in whole)  # one row from each run of 3
    assert all(len({row % 3 for row in rows}) > 1 for rows in whole)  # shuffled: not rows 0, 3, 6, ...
    for ranks in (2, 4):
        n, parts = 24 // ranks, [[], [], []]
        for r in range(ranks):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            for m, rows in enumerate(minibatches(n, 3, seed=7)):
                parts[m] += [r * n + i for i in rows.tolist()]
        assert [sorted(rows) for rows in parts] == whole, ranks
    sizes = set()
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        sizes.add(tuple(len(rows) for rows in minibatches(5, 3, seed=7)))
    assert sizes == {(2, 2, 1)}


PPO_REWARD = GRPO_REWARD


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_process_for_ppo(tmp_path):
    """PPO with a separate critic: the critic is a second DDP model with its own optimizer, the advantages are
    whitened over the global batch, the adaptive KL controller reads the global KL, and two shuffled minibatches
    per epoch must hold the same completions whatever the number of ranks. Sampling at temperature 1, 2 prompts
    per sampler call (generation_batch_size): each call is seeded by its prompts' place in the global batch,
    so both runs sample the same completions."""
    from tether.recipes import ppo

    (tmp_path / "reward.py").write_text(PPO_REWARD)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": word}) + "\n" for word in ["cat", "dog", "ox", "bee", "a", "owl", "pig", "hen"]))
    keys = {"model": MODEL, "data": tmp_path / "prompts.jsonl", "batch_size": 4, "group_size": 2,
            "max_completion_length": 6, "generation_batch_size": 2, "ppo_epochs": 2, "num_minibatches": 2,
            "kl_coef": 0.05,
            "kl_controller": "adaptive_proportional", "kl_target": 0.01, "kl_horizon": 100,
            "rewards": f"[{{name: '{tmp_path / 'reward.py'}:prompt_length_and_variety'}}]", "learning_rate": 1e-2,
            "lr_scheduler": "constant", "max_steps": 3, "sample_steps": 1, "progress": False, "report_to": []}
    one = ppo.train(load_config(ppo.PPOConfig, None, overrides({**keys, "output_dir": tmp_path / "one"})))
    torchrun("ppo", {**keys, "output_dir": tmp_path / "two"})
    one_metrics, two_metrics = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    diffs = {key: max(abs(a[key] - b[key]) for a, b in zip(one_metrics, two_metrics))
             for key in ["loss", "policy_loss", "value_loss", "reward_mean", "adv_std", "kl_coef"]}
    weight_diff = max_weight_diff(tmp_path / "two" / "final", one)
    critic_diff = max_weight_diff(tmp_path / "two" / "critic", one.parent / "critic")
    print(f"PPO 2 DDP ranks vs 1 process: {', '.join(f'max |Δ{k}| {v:.2e}' for k, v in diffs.items())}, "
          f"max |Δweight| policy {weight_diff:.2e}, critic {critic_diff:.2e}")
    assert [row["step"] for row in two_metrics] == [1, 2, 3]
    assert len({row["kl_coef"] for row in one_metrics}) == 3  # the adaptive β moved every step
    # The same completions, all of them in samples.jsonl (rank 0 writes both ranks'), and real draws: the two
    # completions of a prompt differ.
    samples = (tmp_path / "two" / "samples.jsonl").read_text()
    assert samples == (tmp_path / "one" / "samples.jsonl").read_text()
    rows = [json.loads(line) for line in samples.splitlines()]
    assert len(rows) == 3 * 8 and sum(a["completion"] != b["completion"] for a, b in zip(rows[::2], rows[1::2])) > 6
    assert max(diffs.values()) < TOLERANCE and weight_diff < TOLERANCE and critic_diff < TOLERANCE


# ----------------------------------------------------------------------------- sampling recipes

# The reward of best-of-n and rft: the completion's length, None (cannot judge) for the prompt "skip".
LENGTH_REWARD = """
def length(prompts, completions, **columns):
    return [None if p == "skip" else float(len(c)) for p, c in zip(prompts, completions)]
"""
WORDS = ["cat", "dog", "ox", "skip", "bee", "owl", "pig"]  # 7 prompts: chunks of 2 split 4 + 3 over 2 ranks


@pytest.fixture
def prompts(tmp_path) -> Path:
    (tmp_path / "reward.py").write_text(LENGTH_REWARD)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": word, "id": i}) + "\n" for i, word in enumerate(WORDS)))
    return tmp_path / "prompts.jsonl"


def sampling_keys(tmp_path) -> dict:
    """Temperature-1 sampling, 2 prompts per generate call: each rank samples whole chunks, seeded as one
    process seeds them, so the samples are the same; a rank-dependent seed would change them."""
    return {"sampling.n": 3, "sampling.max_new_tokens": 8, "sampling.temperature": 1.0, "sampling.batch_size": 2,
            "seed": 3, "rewards": f"[{{name: '{tmp_path / 'reward.py'}:length'}}]"}


def test_rank_shares_of_the_samples_add_up_to_one_process(prompts, monkeypatch):
    """`sample_share` on 3 simulated ranks: 7 rows in chunks of 2 → rows 0-3, 4-5 and 6; put together in rank
    order they are exactly one process's samples (nothing duplicated or dropped, the same draws)."""
    from tether import models
    from tether.data.loading import load_rows
    from tether.eval.generation import sample_rows, sample_share
    from tether.rollout import SamplingParams

    model, tokenizer = models.load(MODEL, seed=0)
    rows, params = load_rows(str(prompts)), SamplingParams(n=3, max_new_tokens=8, temperature=1.0, seed=3)
    whole = sample_rows(model, tokenizer, rows, params, batch_size=2)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares, completions, prompt_index = [], [], []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        share, batch = sample_share(model, tokenizer, rows, params, batch_size=2)
        shares.append(share)
        completions += batch.completions
        prompt_index += [share.start + p for p in batch.prompt_index]
    assert shares == [range(0, 4), range(4, 6), range(6, 7)]
    assert (completions, prompt_index) == (whole.completions, whole.prompt_index)
    assert len(set(whole.completions)) > len(rows)  # real draws, not one repeated completion


def test_two_ranks_evaluate_like_one_process(prompts, tmp_path):
    """`tether eval` under torchrun: each rank samples and scores its chunks, rank 0 writes the whole result, and
    it is the result of one process (pass@k, maj@k, every sample), with 7 prompts dealt 4 + 3 over the ranks."""
    from tether import cli

    calls = tmp_path / "calls.txt"  # the reward writes how many completions each call scored
    (tmp_path / "counting.py").write_text(LENGTH_REWARD.replace(
        "    return", f"    open({str(calls)!r}, 'a').write(str(len(completions)) + '\\n')\n    return"))
    args = ["--model", MODEL, "--data", str(prompts), "--num-samples", "3", "--k", "1", "3", "--temperature", "1.0",
            "--max-new-tokens", "8", "--batch-size", "2", "--seed", "3", "--correct-threshold", "4",
            "--rewards", f"{tmp_path / 'counting.py'}:length"]
    assert cli.main(["eval", *args, "--output", str(tmp_path / "one.json")]) == 0
    assert calls.read_text().split() == ["21"]
    calls.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "tether", "eval", *args, "--output", str(tmp_path / "two.json")]
    result = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("samples per prompt") == 1  # one table, from rank 0
    assert sorted(calls.read_text().split()) == ["12", "9"]  # each rank scored its own 4 + 3 prompts x 3
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert two == one
    assert [s["prompt_index"] for s in two["samples"]] == [p for p in range(len(WORDS)) for _ in range(3)]
    assert 0 < two["metrics"]["pass@3"] < 1 and len({s["completion"] for s in two["samples"]}) > len(WORDS)


def test_two_ranks_generate_the_same_file_as_one_process(prompts, tmp_path):
    """`tether generate` under torchrun: each rank samples whole batches (7 prompts in batches of 2: 4 + 3), rank 0
    writes every row in prompt order, once: the output is line for line one process's."""
    from tether import cli

    args = ["--model", MODEL, "--prompts", str(prompts), "--num-samples", "2", "--temperature", "1.0",
            "--max-new-tokens", "8", "--batch-size", "2", "--seed", "5"]
    assert cli.main(["generate", *args, "--output", str(tmp_path / "one.jsonl")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "tether", "generate", *args]  # to stdout: rank 1 prints none
    result = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines == (tmp_path / "one.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(row["id"], row["index"]) for row in rows] == [(i, j) for i in range(len(WORDS)) for j in range(2)]
    assert len({row["completion"] for row in rows}) > len(WORDS)


def test_shard_chunks_deals_whole_chunks(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    for count, chunk, expected in [(10, 2, [(0, 4), (4, 8), (8, 10)]), (7, 4, [(0, 4), (4, 7), (7, 7)]),
                                   (0, 2, [(0, 0)] * 3), (9, 1, [(0, 3), (3, 6), (6, 9)])]:
        shares = []
        for r in range(3):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            share = distributed.shard_chunks(count, chunk)
            shares.append((share.start, share.stop))
        assert shares == expected, (count, chunk)


def test_two_ranks_write_the_same_best_of_n_files_as_one_process(prompts, tmp_path):
    from tether.recipes import best_of_n

    keys = {"model": MODEL, "data": prompts, "write_all": True, **sampling_keys(tmp_path)}
    best_of_n.run(load_config(best_of_n.BestOfNConfig, None, overrides({**keys, "output_dir": tmp_path / "one"})))
    torchrun("best-of-n", {**keys, "output_dir": tmp_path / "two"})
    for name in ["best.jsonl", "all.jsonl", "summary.json"]:
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    every = [json.loads(line) for line in (tmp_path / "two" / "all.jsonl").read_text().splitlines()]
    assert [row["id"] for row in every] == [i for i in range(len(WORDS)) for _ in range(3)]  # each prompt once
    best = [json.loads(line) for line in (tmp_path / "two" / "best.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in best] == [w for w in WORDS if w != "skip"]
    assert len({row["completion"] for row in every}) > len(WORDS)


def test_two_ranks_equal_one_process_for_rft(prompts, tmp_path):
    """One round: the same samples.jsonl and kept.jsonl, then the round's SFT on 2 DDP ranks."""
    from tether.recipes import rft

    # Adam moves every weight by ~lr whatever its gradient's size, so a weight whose gradient is ~1e-7 carries
    # that gradient's float rounding (sums in another order on 2 ranks) into its update at ~lr × 1e-3: 1e-3
    # keeps that under TOLERANCE while every weight still moves ~3e-3, far above it.
    keys = {"model": MODEL, "data": prompts, "top_k": 1, "batch_size": 2, "max_steps": 3, "learning_rate": 1e-3,
            "lr_scheduler": "constant", "max_length": 32, "progress": False, "report_to": [],
            **sampling_keys(tmp_path)}
    one = rft.train(load_config(rft.RFTConfig, None, overrides({**keys, "output_dir": tmp_path / "one"})))
    torchrun("rft", {**keys, "output_dir": tmp_path / "two"})
    for name in ["round-1/samples.jsonl", "round-1/kept.jsonl"]:
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    kept = [json.loads(line) for line in (tmp_path / "two" / "round-1" / "kept.jsonl").read_text().splitlines()]
    assert [row["id"] for row in kept] == [i for i, w in enumerate(WORDS) if w != "skip"]  # top_k=1: one each
    loss_diff = max_loss_diff(read_metrics(tmp_path / "two" / "round-1" / "sft"),
                              read_metrics(tmp_path / "one" / "round-1" / "sft"))
    weight_diff = max_weight_diff(tmp_path / "two" / "final", one)
    print(f"RFT 2 DDP ranks vs 1 process: max |Δloss| {loss_diff:.2e}, max |Δweight| {weight_diff:.2e}")
    assert loss_diff < TOLERANCE and weight_diff < TOLERANCE


def test_two_ranks_equal_one_process_for_distill(tmp_path):
    """Teacher traces sampled in shares (the same traces.jsonl), then token-level KD on 2 DDP ranks."""
    from tether.recipes import distill

    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a}:", "animal": a}) + "\n" for a in PAIRS))
    keys = {"model": MODEL, "teacher": "tiny:hidden_size=48,intermediate_size=96,num_hidden_layers=1",
            "data": tmp_path / "prompts.jsonl", "kd_coef": 0.5, "batch_size": 4, "micro_batch_size": 2,
            "max_steps": 3, "learning_rate": 1e-3, "lr_scheduler": "constant", "max_length": 32,  # 1e-3: see rft
            "sampling.max_new_tokens": 8, "sampling.batch_size": 3, "progress": False, "report_to": []}
    one = distill.train(load_config(distill.DistillConfig, None, overrides({**keys, "output_dir": tmp_path / "one"})))
    torchrun("distill", {**keys, "output_dir": tmp_path / "two"})
    traces = (tmp_path / "two" / "traces.jsonl").read_text()
    assert traces == (tmp_path / "one" / "traces.jsonl").read_text()
    assert [json.loads(line)["animal"] for line in traces.splitlines()] == list(PAIRS)
    one_metrics, two_metrics = read_metrics(tmp_path / "one" / "student"), read_metrics(tmp_path / "two" / "student")
    diffs = {key: max(abs(a[key] - b[key]) for a, b in zip(one_metrics, two_metrics))
             for key in ["loss", "nll", "kd_loss"]}
    weight_diff = max_weight_diff(tmp_path / "two" / "final", one)
    print(f"distill (KD) 2 DDP ranks vs 1 process: {', '.join(f'max |Δ{k}| {v:.2e}' for k, v in diffs.items())}, "
          f"max |Δweight| {weight_diff:.2e}")
    assert [row["step"] for row in two_metrics] == [1, 2, 3] and min(row["kd_loss"] for row in two_metrics) > 0
    assert max(diffs.values()) < TOLERANCE and weight_diff < TOLERANCE


# ----------------------------------------------------------------------------- failures

def start_long_run(task, run_dir: Path, timeout_s: float) -> tuple[subprocess.Popen, Path]:
    log_file = run_dir.parent / f"{run_dir.name}.log"
    command = torchrun_command("sft", {**SFT_KEYS, "data": task, "output_dir": run_dir, "max_steps": 100_000,
                                       "save_steps": 0, "distributed.timeout_s": timeout_s})
    with open(log_file, "w") as out:
        job = subprocess.Popen(command, env=worker_env(), stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert job.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
        time.sleep(0.2)
    return job, log_file


def worker_pid(job: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=`rank`."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == job.pid:
                children.append(int(entry.name))
                if f"RANK={rank}".encode() in entry.joinpath("environ").read_bytes().split(b"\0"):
                    return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue  # not a process, or it has just exited
    raise AssertionError(f"no worker with RANK={rank} among torchrun's children {children}")


def stop_job(job: subprocess.Popen) -> None:
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker pids in /proc")
def test_killed_rank_ends_the_job(task, tmp_path):
    timeout_s = 60
    job, log_file = start_long_run(task, tmp_path / "killed", timeout_s)
    try:
        os.kill(worker_pid(job, rank=1), signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = job.wait(timeout=timeout_s + 60)
        elapsed = time.monotonic() - killed_at
    finally:
        stop_job(job)
    output = log_file.read_text()
    print(f"rank 1 killed: job exited with {returncode} after {elapsed:.1f} s")
    assert returncode != 0 and elapsed < timeout_s
    # torchrun names the rank that died first and how.
    assert "Root Cause" in output and "SIGKILL" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker pids in /proc")
def test_hung_rank_times_out_with_a_clear_message(task, tmp_path):
    """SIGSTOP freezes rank 1 (alive, silent): rank 0's next collective must give up after distributed.timeout_s."""
    timeout_s = 5
    message = f"rank 0: collective timed out after {timeout_s} s — another rank died or hung"
    job, log_file = start_long_run(task, tmp_path / "hung", timeout_s)
    hung = worker_pid(job, rank=1)
    try:
        os.kill(hung, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while message not in log_file.read_text() and time.monotonic() - stopped_at < timeout_s + 60:
            time.sleep(0.2)
        elapsed = time.monotonic() - stopped_at
        # torchrun now sends SIGTERM to the frozen rank, which acts on it once it runs again.
        os.kill(hung, signal.SIGCONT)
        returncode = job.wait(timeout=60)
    finally:
        stop_job(job)
    print(f"rank 1 frozen: rank 0 reported the timeout after {elapsed:.1f} s; job exited with {returncode}")
    assert message in log_file.read_text(), log_file.read_text()[-3000:]
    assert timeout_s <= elapsed < timeout_s + 30 and returncode != 0


def test_failure_message_names_the_rank_and_the_cause(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "_timeout_s", 30.0)
    timed_out = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv "
                             "operation to complete")
    assert distributed.failure_message(timed_out).startswith(
        "rank 1: collective timed out after 30 s — another rank died or hung; see its log")
    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")
    assert "lost the connection to another rank" in distributed.failure_message(lost)
    assert distributed.failure_message(RuntimeError("shape mismatch")) is None
    assert distributed.failure_message(ValueError("Timed out in gloo")) is None


def test_distributed_config_is_checked():
    config = load_config(sft.SFTConfig, None, {"distributed.strategy": "fsdp", "distributed.timeout_s": 30})
    assert (config.distributed.strategy, config.distributed.timeout_s) == ("fsdp", 30.0)
    with pytest.raises(ConfigError, match="distributed.strategy"):
        load_config(sft.SFTConfig, None, {"distributed.strategy": "zero3"})
    with pytest.raises(ConfigError, match="distributed.timeout_s"):
        load_config(sft.SFTConfig, None, {"distributed.timeout_s": 0})
