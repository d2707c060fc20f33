"""Reward functions by name: `get_reward("math")`, `get_reward("path/to/file.py:function")`, `RewardSet([...])`.

Contract (the same as TRL's): `reward(prompts, completions, **columns) -> list[float | None]`,
None meaning "cannot judge". See docs/rewards.md. Built-ins are imported on first use.
"""

from tether.rewards.base import (
    CombinedReward,
    RewardContractError,
    RewardFunctionError,
    RewardResult,
    RewardSet,
    RewardSetupError,
    RewardSpecError,
    RewardTimeoutError,
    available_rewards,
    checked_reward,
    get_reward,
    load_user_reward,
    register_reward,
)

__all__ = [
    "CombinedReward",
    "RewardContractError",
    "RewardFunctionError",
    "RewardResult",
    "RewardSet",
    "RewardSetupError",
    "RewardSpecError",
    "RewardTimeoutError",
    "available_rewards",
    "checked_reward",
    "get_reward",
    "load_user_reward",
    "register_reward",
]
