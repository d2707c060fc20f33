"""Config keys shared by the online RL recipes (grpo, ppo, ...): sampling, KL, the PPO-style update."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tether.config import ConfigError, TrainConfig, check_rewards
from tether.envs import BUILTIN_ENVS, FORMATS, get_env
from tether.rollout.params import SamplingKeys


@dataclass
class OnlineConfig(TrainConfig, SamplingKeys):
    """Keys shared by the online RL recipes (grpo, ppo). The sampling keys (temperature, top_p, top_k, min_p, stop,
    rollout_engine) are `tether.rollout.params.SamplingKeys`; the training log-probs use the same temperature."""

    max_steps: int = -1
    """Steps to run (one rollout each, then ppo_epochs × num_minibatches optimizer steps); -1 means `epochs`
    passes over the prompts."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps (ppo_epochs × num_minibatches per step)."""
    batch_size: int = 8
    """Prompts per step; each is sampled group_size times, so a step trains on batch_size × group_size
    completions."""
    micro_batch_size: int = 0
    """Completions per forward/backward (and per no-grad scoring forward); 0 means a whole minibatch."""
    overlong: Literal["error", "truncate", "drop"] = "error"
    """Prompts longer than max_prompt_length: error, truncate (keep the LAST max_prompt_length tokens) or
    drop. Truncated and dropped prompts are counted in the log; none reaches the sampler."""
    rewards: list[dict] = field(default_factory=list)
    """Reward functions and weights, e.g. [{name: math, weight: 1.0}, {name: format, weight: 0.5}]: a
    built-in name or path/to/file.py:function, a weight (default 1), and that reward's own options."""
    group_size: int = 8
    """G: completions sampled per prompt."""
    group_size_end: int | None = None
    """If set, G moves linearly from group_size to this value over schedule_steps (rounded)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens (see `overlong`)."""
    max_completion_length: int = 128
    """Most tokens generated per completion; a completion that reaches it is truncated."""
    min_completion_length: int = 0
    """Fewest tokens generated per completion: EOS cannot end one earlier (vLLM's min_tokens, HF's
    min_new_tokens). The log-probs stay those of the full distribution, EOS included. Equal to
    max_completion_length, every completion has that length (fixed-length rollouts, as in benchmarks)."""
    temperature_end: float | None = None
    """If set, the temperature moves linearly from `temperature` to this value over schedule_steps."""
    schedule_steps: int = 0
    """Length of the temperature and group-size schedules in steps; 0 means all steps."""
    generation_batch_size: int = 0
    """Prompts per sampler call (memory bound for generation); 0 means all of a rank's prompts of a step at once.
    Each call is seeded by its prompts' position in the step, so a value dividing batch_size / ranks samples
    the same completions on any number of ranks."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: message-list prompts use the tokenizer's chat template, strings are used as is;
    always: string prompts are wrapped as a user message too; never: no template."""
    kl_coef: float = 0.04
    """β, weight of the KL to the frozen reference. 0 loads no reference and runs no reference forward."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token estimator of KL(π_θ‖π_ref) (Schulman 2020): k1 = log r, k2 = (log r)²/2, k3 = r − 1 − log r."""
    kl_controller: Literal["fixed", "adaptive_simple", "adaptive_proportional"] = "fixed"
    """fixed β; adaptive_proportional (Ziegler et al. 2019) or adaptive_simple (doubling/halving) steer
    β toward kl_target."""
    kl_target: float = 6.0
    """Target KL of a completion (nats, summed over its tokens) for the adaptive controllers."""
    kl_horizon: int = 10000
    """Horizon of adaptive_proportional: β moves by at most ±20% per horizon completions."""
    ppo_epochs: int = 1
    """μ: update epochs over each step's rollouts."""
    num_minibatches: int = 1
    """Optimizer steps per epoch: the rollouts are shuffled and split into this many minibatches."""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low."""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO clip-higher: 0.28)."""
    dual_clip: float | None = None
    """Dual clip c > 1: for negative advantages the loss is also capped at −c·A (Ye et al. 2020); null = off."""
    importance_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (PPO/GRPO) or one per sequence, the geometric mean (GSPO)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "token_sum_norm"] = "token_mean"
    """Loss reduction: token_mean (DAPO), seq_mean_token_mean (GRPO paper), token_sum_norm
    (Dr. GRPO: sum / (completions × max_completion_length))."""
    old_logprobs: Literal["auto", "sampler", "recompute"] = "auto"
    """π_old log-probs: sampler = the sampler's own log-probs (no forward); recompute = a no-grad forward;
    auto = sampler when on-policy (ppo_epochs=1, num_minibatches=1, builtin engine), else recompute."""
    mask_truncated: bool = False
    """DAPO overlong filtering: completions cut at max_completion_length carry no loss."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (loss −= coef × entropy)."""
    sample_steps: int = 10
    """Write every completion of every N-th step to samples.jsonl (0: never)."""
    eval_steps: int = 0
    """Mean reward on eval_data every N steps (one sample per prompt at eval_temperature); 0: only at the end."""
    eval_temperature: float = 0.0
    """Sampling temperature of the evaluation (0 = greedy)."""
    env: str = ""
    """Multi-turn episodes instead of single completions: calculator | python | calculator+python | single_turn |
    path/to/file.py:Class (docs/tools.md). Observation tokens are context, never trained on; the environment's
    rewards join the total as the reward `env` (weight 1)."""
    env_options: dict = field(default_factory=dict)
    """Options of the environment: format (tag | json tool calls), the python tool's timeout, memory_mb, ...; a
    user's class gets them as keyword arguments."""
    max_turns: int = 4
    """Most model turns per episode (with `env`)."""
    max_turn_tokens: int = 0
    """Most tokens per model turn (with `env`); 0: only the episode's max_completion_length (model and
    observation tokens together) bounds it."""
    async_rollouts: int = 0
    """k > 0: one background thread generates up to k batches ahead while the trainer updates, with weights
    up to k updates old (tether.rollout.async_queue); 0: synchronous. Resume is exact only at 0."""
    log_grad_variance: bool = False
    """Log grad_var (tr Cov of one completion's policy gradient), grad_var_of_mean and grad_mean_norm_sq each
    step, from per-completion gradients at the step's start (one backward per completion; tether.runtime.grad_stats)."""

    def validate(self) -> None:
        checks = [
            ("group_size", self.group_size >= 1, "must be >= 1"),
            ("group_size_end", self.group_size_end is None or self.group_size_end >= 1, "must be >= 1"),
            ("max_prompt_length", self.max_prompt_length >= 1, "must be >= 1"),
            ("max_completion_length", self.max_completion_length >= 1, "must be >= 1"),
            ("min_completion_length", 0 <= self.min_completion_length <= self.max_completion_length,
             f"must be in [0, max_completion_length] ([0, {self.max_completion_length}])"),
            ("max_length", self.max_prompt_length + self.max_completion_length <= self.max_length,
             f"must be >= max_prompt_length + max_completion_length "
             f"({self.max_prompt_length} + {self.max_completion_length})"),
            ("temperature", self.temperature > 0, "must be > 0 for RL (log-probs are taken at it)"),
            ("temperature_end", self.temperature_end is None or self.temperature_end > 0, "must be > 0"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("kl_coef", self.kl_controller == "fixed" or self.kl_coef > 0,
             "an adaptive kl_controller scales beta multiplicatively: start it > 0"),
            ("kl_target", self.kl_target > 0, "must be > 0"),
            ("kl_horizon", self.kl_horizon > 0, "must be > 0"),
            ("ppo_epochs", self.ppo_epochs >= 1, "must be >= 1"),
            ("num_minibatches", self.num_minibatches >= 1, "must be >= 1"),
            ("num_minibatches", self.num_minibatches <= self.batch_size * min(self.group_size,
                                                                             self.group_size_end or self.group_size),
             "must be <= the completions per step (batch_size × group_size)"),
            ("clip_low", 0 <= self.clip_low < 1, "must be in [0, 1)"),
            ("clip_high", self.clip_high >= 0, "must be >= 0"),
            ("dual_clip", self.dual_clip is None or self.dual_clip > 1, "must be > 1 (or null)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("entropy_coef", self.entropy_coef >= 0, "must be >= 0"),
            ("max_turns", self.max_turns >= 1, "must be >= 1"),
            ("max_turn_tokens", self.max_turn_tokens >= 0, "must be >= 0 (0: no per-turn bound)"),
            ("async_rollouts", self.async_rollouts >= 0, "must be >= 0 (0 = synchronous)"),
            ("old_logprobs", not (self.async_rollouts and self.old_logprobs == "sampler"),
             "async_rollouts samples with older weights, so π_old must be recomputed: use auto or recompute"),
        ]
        for key, ok, message in checks:
            if not ok:
                raise ConfigError(f"config key '{key}': {message}, got {getattr(self, key)!r}")
        check_rewards(self.rewards)
        self.check_env()

    def check_env(self) -> None:
        """`env` names a built-in or a user's file:Class (imported now, so a typo fails before any work)."""
        if self.env_options.get("format", "tag") not in FORMATS:
            raise ConfigError(f"config key 'env_options.format': must be one of {', '.join(FORMATS)}, got "
                              f"{self.env_options['format']!r}")
        if self.env and ":" not in self.env and self.env not in BUILTIN_ENVS:
            raise ConfigError(f"config key 'env': {self.env!r} is unknown; use one of {', '.join(BUILTIN_ENVS)} "
                              "or path/to/file.py:Class")
        if self.env:
            try:
                get_env(self.env, **self.env_options)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"config key 'env': {err}") from None

    def kl_needed(self) -> bool:
        """Whether any step can use the reference: β > 0 (an adaptive β starts > 0 and stays > 0)."""
        return self.kl_coef > 0
