"""tether: post-training for language models — SFT, reward models, DPO family, PPO/GRPO/RLOO, sampling
methods, verifiable rewards and evaluation, from a laptop CPU to torchrun on GPUs."""

__version__ = "0.1.0"
