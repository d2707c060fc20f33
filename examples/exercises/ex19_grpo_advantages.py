"""Exercise 19: group-normalised advantages (tether.advantages.grpo_advantages, Shao et al. 2024, eq. 3).
Two prompts, G = 4 completions each: above their group's mean reward → A > 0, below → A < 0, and a group
whose completions all score the same teaches nothing (A = 0).

    python examples/exercises/ex19_grpo_advantages.py
"""

import torch

from tether.advantages import get_advantage_estimator

rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,    # prompt 1: two right, two wrong
                        0.2, 0.9, 0.5, 0.4,    # prompt 2: graded rewards
                        1.0, 1.0, 1.0, 1.0])   # prompt 3: all equal
advantages, metrics = get_advantage_estimator("grpo")(rewards, 4)
if __name__ == "__main__":
    for group in range(3):
        rows = slice(4 * group, 4 * group + 4)
        mean = rewards[rows].mean().item()
        print(f"prompt {group + 1}: mean reward {mean:.2f}")
        for r, a in zip(rewards[rows].tolist(), advantages[rows].tolist()):
            where = "above" if r > mean else "below" if r < mean else "at"
            print(f"    reward {r:.2f}  advantage {a:+.3f}  ({where} the mean)")
