"""The built-in tiny model: a real transformers Llama with a character-level tokenizer made locally.

Nothing is downloaded. The model is an ordinary `LlamaForCausalLM` and the tokenizer an ordinary
`PreTrainedTokenizerFast` with a chat template, so every code path (chat formatting, padding,
`save_pretrained` / `from_pretrained`, LoRA, generation) is the one real models take.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IM_START, IM_END]
# Every printable ASCII character is one token; anything else maps to <unk>.
CHARACTERS = [c for c in string.printable if c not in "\x0b\x0c\r"]
# With `reasoning_tags`, the reasoning tags are one token each, as in Qwen's tokenizers: ordinary (not special)
# tokens, so decoding keeps them and the format and math rewards see them in the text.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# A Qwen-style ChatML template. `{% generation %}` marks assistant text so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` finds it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Default size: big enough to learn small arithmetic in minutes on 2 CPU cores.
TINY_DEFAULTS = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_tokenizer(reasoning_tags: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ChatML special tokens (~100 tokens); with `reasoning_tags`, also one
    token for each of <think> </think> <answer> </answer> (an R1-style answer shrinks from ~36 tokens to ~8)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with no merges splits text into single characters; Fuse joins them back on decode.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="right",
    )
    if reasoning_tags:
        tokenizer.add_tokens(TAG_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by TINY_DEFAULTS (overridable), seeded for reproducibility."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **{**TINY_DEFAULTS, **overrides},
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model
