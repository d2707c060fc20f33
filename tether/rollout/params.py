"""How to sample: `SamplingParams` (what an engine's `generate` takes) and `SamplingConfig`, the `sampling:`
config section that builds it. Plain Python (no torch), so configs can hold and validate it before torch loads."""

from __future__ import annotations

from dataclasses import dataclass, field

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
class SamplingConfig:
    """How completions are sampled (the `sampling:` section of best-of-n, rft and distill; the online recipes build `SamplingParams` from their own keys)."""

    n: int = 4
    """Samples per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (then all n samples are the same)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = off)."""
    min_p: float = 0.0
    """Drop tokens below min_p × the top token's probability (0 = off)."""
    max_new_tokens: int = 256
    """Most tokens per completion."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (cut from the text)."""
    batch_size: int = 16
    """Prompts per generate call (each with n samples)."""

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, max_new_tokens=self.max_new_tokens, stop=self.stop, seed=seed)

    def validate(self) -> None:
        try:
            self.params(seed=0)
        except ValueError as err:
            raise ConfigError(f"config section 'sampling': {err}") from None
        if self.batch_size < 1:
            raise ConfigError(f"config key 'sampling.batch_size': must be >= 1, got {self.batch_size}")
