"""Ablation (not a proposal): turn OFF the sampler's lean Llama decode path (`tether.rollout.llama_decode`), so
every decode step runs the model's own Hugging Face forward, as before the path existed."""

from __future__ import annotations


def apply() -> None:
    from tether.rollout import sampler

    original = sampler.BuiltinSampler.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.lean_decode = False

    sampler.BuiltinSampler.__init__ = init
