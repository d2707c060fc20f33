"""Exercise 16: the PPO clipped objective on synthetic ratios. For A = +1 and A = −1 and ratios ρ from 0.5 to
1.5, the surrogate min(ρA, clip(ρ, 1−ε, 1+ε)A) (tether.losses.clipped_policy_loss, minus its loss) and its
gradient dL/dρ: the objective stops growing past 1+ε when A > 0 (and below 1−ε when A < 0), where the
gradient is exactly 0, so one update cannot push the ratio further out.

    python examples/exercises/ex16_ppo_clip.py [--out runs/exercises/ex16]
"""

import argparse
import json
import math
from pathlib import Path

import torch

from tether.demo.report import plot_series
from tether.losses import clipped_policy_loss

EPS = 0.2


def clip_point(ratio: float, advantage: float, eps: float = EPS) -> tuple[float, float]:
    """The objective J = −L = min(ρA, clip(ρ, 1−ε, 1+ε)A) of one token at ratio ρ, and dJ/dρ."""
    logprobs = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)  # (1, 1); old = 0
    loss, _ = clipped_policy_loss(logprobs, torch.zeros_like(logprobs), torch.tensor([advantage]),
                                  torch.ones_like(logprobs), clip_low=eps, clip_high=eps)
    (-loss).backward()
    return -loss.item(), logprobs.grad.item() / ratio  # dJ/dρ = (dJ/d log ρ) / ρ


def run(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ratios = [round(0.5 + 0.05 * i, 2) for i in range(21)]  # 0.5 .. 1.5
    result = {"ratios": ratios}
    for advantage in (1.0, -1.0):
        points = [clip_point(r, advantage) for r in ratios]
        result[f"A={advantage:+g}"] = {"objective": [p[0] for p in points], "gradient": [p[1] for p in points]}
    series = {f"objective, {k}": (result["ratios"], v["objective"]) for k, v in result.items() if k != "ratios"}
    result["plot"] = str(plot_series(out / "ppo_clip.png", f"PPO clipped objective, ε = {EPS}", series,
                                     xlabel="ratio ρ = π/π_old", ylabel="min(ρA, clip(ρ)A)"))
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/exercises/ex16")
    summary = run(Path(parser.parse_args().out))
    for key in ("A=+1", "A=-1"):
        print(key, "ρ:", " ".join(f"{r:.2f}" for r in summary["ratios"][::4]))
        print("   dJ/dρ:", " ".join(f"{g:+.2f}" for g in summary[key]["gradient"][::4]))
