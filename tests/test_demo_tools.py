"""`tether demo tools` at reduced size (10 GRPO steps instead of 40): the calculator is what makes the task
solvable, before and after RL, and the policy calls it.

Greedy accuracy on 100 held-out problems (a standard error of about 0.04 near 0.2). Measured at the default
size, seed 0 (docs/tools.md): with the calculator 0.22 after SFT and 0.27 after GRPO (0.14 with lr 5e-4 and
temperature 0.7), without it 0.01 and 0.02; tool-call rate 1.0. The bounds sit well inside those gaps. Only seed 0 was measured; the
3-seed margins the issue asks for are not yet measured. Slow: about 4-6 minutes on one thread.
"""

import json

import pytest

from tether.demo import tools


@pytest.mark.slow
def test_tools_demo_the_calculator_is_what_solves_the_task(tmp_path):
    summary = tools.run(str(tmp_path), seed=0, size="small")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary and saved["held_out_problems"] == 100
    assert (tmp_path / "report.html").stat().st_size > 0
    for model in ("sft", "grpo"):
        result = summary[model]
        assert result["accuracy_with_tool"] >= result["accuracy_without_tool"] + GAP, summary
    assert summary["grpo"]["tool_call_rate"] >= 0.9, summary
    samples = [json.loads(line) for line in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert any("<output>" in t["text"] for s in samples for t in s["episode"]["turns"] if t["role"] == "env")


GAP = 0.06
