"""Peak memory (tether.runtime.memory) and `tether sweep`'s checks and summary, on synthetic run folders (the
end-to-end sweeps are the slow exercise tests in test_exercises.py)."""

import json
import subprocess
import sys

import pytest

from tether.cli import main
from tether.sweep import gold_metric, run_dir_name, summarise, tail_means


PEAK_PROBE = """
import torch
from tether.runtime.memory import peak_memory, peak_rss_mb
before = peak_rss_mb()
block = torch.ones(64 * 2 ** 20)  # 256 MiB of float32, every page written
after = peak_memory("cpu")["peak_memory_mb"]
del block
print(before, after, peak_rss_mb())
"""


def test_peak_rss_grows_with_a_touched_allocation():
    """Filling 256 MiB raises the process's peak RSS by about that much (a high-water mark). In a fresh process:
    in the test process an earlier test's peak may already lie above anything this one allocates."""
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True).stdout
    before, after, later = map(float, out.split())
    assert after - before > 200
    assert later >= after - 1  # a high-water mark: the freed block still counts (the kernel updates it
    # lazily, so it can read a few pages lower than RSS read while the block was held: measured 0.16 MiB)


def write_run(folder, rows, eval_result=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_result:
        (folder / "eval.json").write_text(json.dumps(eval_result))


def test_summary_takes_tail_means_finds_gold_and_plots(tmp_path):
    """Ten steps; tail 0.2 averages the last two: KL 8 and 10 → 9. The gold metric is found by name."""
    runs = []
    for beta, scale in (("0", 10.0), ("0.1", 1.0)):
        rows = [{"step": s, "kl_ref_seq": scale * s, "reward_mean": s / 10, "peak_memory_mb": 400.0 + s,
                 "reward/gold_rewards/mean": -s if beta == "0" else s} for s in range(1, 11)]
        folder = tmp_path / run_dir_name("kl_coef", beta)
        write_run(folder, rows, {"eval/total/mean": 0.5})
        runs.append({"value": beta, "output_dir": str(folder), "returncode": 0, "wall_time_s": 1.0})
    summary = summarise(tmp_path, "grpo", "kl_coef", runs, tail=0.2)
    first, second = summary["runs"]
    assert first["final"]["kl_ref_seq"] == pytest.approx((90 + 100) / 2)
    assert second["final"]["kl_ref_seq"] == pytest.approx((9 + 10) / 2)
    assert first["final"]["reward_mean"] == pytest.approx(0.95)
    assert first["final"]["gold"] == pytest.approx(-9.5) and second["final"]["gold"] == pytest.approx(9.5)
    assert first["gold_metric"] == "reward/gold_rewards/mean"
    assert first["peak_memory_mb"] == 410.0 and first["eval"] == {"eval/total/mean": 0.5}
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"][1]["final"]["gold"] == pytest.approx(9.5)


def test_helpers():
    assert tail_means([{"step": 1, "a": 1.0}, {"step": 2, "a": 3.0, "b": 5}], 0.5) == {"a": 3.0, "b": 5.0}
    assert tail_means([{"step": 1, "a": 1.0}, {"step": 2, "a": 3.0}], 1.0) == {"a": 2.0}
    assert gold_metric([{"reward/total/mean": 1, "reward/my_gold/mean": 2}]) == "reward/my_gold/mean"
    assert gold_metric([{"reward/total/mean": 1}]) is None
    assert run_dir_name("rewards[0].weight", "1/2") == "rewards_0_.weight=1_2"


@pytest.mark.parametrize("argv, message", [
    (["sweep", "grpo", "--key", "kl_coeff", "--values", "0", "1", "rewards=[{name: math}]", "data=x.jsonl"],
     "kl_coeff"),
    (["sweep", "grpo", "--key", "kl_coef", "--values", "0", "-1", "rewards=[{name: math}]", "data=x.jsonl"],
     "kl_coef"),
    (["sweep", "grpo", "--key", "kl_coef", "--values", "0", "0", "rewards=[{name: math}]"], "repeats"),
    (["sweep", "grpx", "--key", "kl_coef", "--values", "0"], "unknown recipe"),
    (["sweep", "grpo", "--key", "output_dir", "--values", "a"], "output_dir"),
])
def test_bad_sweeps_stop_before_any_run(argv, message, capsys, tmp_path, monkeypatch):
    """A bad key, value, recipe or a repeated value: one line naming it, exit code 2, no run folder."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
