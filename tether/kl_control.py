"""KL-coefficient controllers for online RL: a fixed beta, or one steered toward a target KL.

Stateful, so kept apart from the pure losses in `tether.losses`. A recipe reads
`controller.beta`, calls `update(kl, n_steps)` once per step with the mean sequence KL
(`tether.losses.sequence_kl`), and saves `state_dict()` in its checkpoint. Imports only torch.
"""

from __future__ import annotations

from torch import Tensor


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT's fixed penalty)."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """KL coefficient steered toward a target KL (Ziegler et al. 2019, section 2.2).

    mode="proportional" (Ziegler et al.): error = clip(KL / target - 1, -0.2, 0.2),
        beta <- beta * (1 + error * n_steps / horizon).
    mode="simple" (Schulman et al. 2017, section 4): beta <- 2 beta if KL > 1.5 target,
        beta / 2 if KL < target / 1.5, else unchanged.
    """

    MODES = ("proportional", "simple")
    MAX_ERROR = 0.2  # Ziegler et al. 2019 clip the proportional error to +-0.2

    def __init__(self, init_beta: float, target: float, horizon: int, mode: str = "proportional"):
        if mode not in self.MODES:
            raise ValueError(f"unknown KL controller mode {mode!r}; valid: {', '.join(self.MODES)}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"KL target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.beta, self.target, self.horizon, self.mode = float(init_beta), float(target), horizon, mode

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        kl = float(current_kl)
        if self.mode == "proportional":
            error = min(max(kl / self.target - 1, -self.MAX_ERROR), self.MAX_ERROR)
            self.beta *= 1 + error * n_steps / self.horizon
        elif kl > 1.5 * self.target:
            self.beta *= 2
        elif kl < self.target / 1.5:
            self.beta /= 2
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])  # target/horizon/mode come from the run's config

