"""The benchmark's reward: cheap, deterministic and non-constant, so advantages are not all zero.

The same function (TRL's reward contract, which tether shares) is given to both libraries.
"""


def reward(prompts, completions, **columns):
    return [float(len(completion) % 7) for completion in completions]
