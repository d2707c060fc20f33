"""Config of `tether sft`: supervised fine-tuning on demonstrations."""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Literal

from tether.config import ConfigError, TrainConfig


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations."""

    train_on: Literal["completion", "last", "all"] = "completion"
    """Tokens that carry the loss: completion / assistant turns, only the last assistant turn, or all."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: message lists use the tokenizer's chat template, plain strings are used as is;
    always: strings are wrapped as a user message too; never: no template."""
    eval_steps: int = 0
    """Evaluate the loss on eval_data every N steps (0: only at the end)."""
    length_grouping: bool = True
    """Split each micro-batch into rows of similar length when the padding saved outweighs the extra forward
    (CPU, one process, a padded forward: see `padding_free`; `data.batching.length_groups`). The loss is
    unchanged up to float rounding."""

    def validate(self) -> None:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            from tether.config import ConfigError

            raise ConfigError(f"config key 'micro_batch_size': {micro} must divide batch_size={self.batch_size}")


def sft_config(config, **changes) -> SFTConfig:
    """An SFTConfig with the SFT keys of `config` (an RFTConfig or DistillConfig, both SFTConfigs) and `changes` (model, data, output_dir, ...)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(SFTConfig)}
    return SFTConfig(**{**values, **changes})
