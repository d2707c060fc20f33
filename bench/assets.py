"""Build the benchmark's models and datasets locally (nothing is downloaded).

Three models, saved with `save_pretrained` so tether and TRL load the very same files:
  tiny      tether's built-in tiny Llama (`tether.models.tiny`), character tokenizer, vocabulary ~106.
  vocab150k a small Llama with Qwen2's vocabulary size (151,936, tied embeddings like Qwen2.5-0.5B) and a
            word-level tokenizer of synthetic words `w0 ... w151636`: the LM head (151,936 x hidden) holds most
            of the parameters and FLOPs, as it does in small real models. (Llama, not Qwen2, because
            transformers 5 swaps a qwen2 model's tokenizer.json pre-tokenizer for Qwen's byte-level one.)
  mid       a Llama of a realistic small shape: hidden 512, 4 layers, 8 heads, intermediate 1408, vocabulary
            32,000 (Llama-2's), tied embeddings: 29.2M parameters, 56% of them in the embedding / LM head,
            with a word-level tokenizer of 32,000 synthetic words.
  qwen05b   (bench/gpu.sh only) Qwen2.5-0.5B's shape as a Llama with random weights: hidden 896, 24 layers,
            14 heads (2 key/value heads), intermediate 4864, vocabulary 151,936, tied embeddings (~0.49B; no
            q/k/v bias, the one difference from Qwen2), with the vocab150k word-level tokenizer.
Datasets are JSONL written next to each model, drawn from a seeded generator, with lengths in tokens
controlled exactly (one character = one token for `tiny`, one word = one token for the word-level models).

    python bench/assets.py OUT_DIR      # writes OUT_DIR/models/<name>/ and OUT_DIR/data/<name>/*.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

# Lengths in tokens (min, max) of the synthetic data, per model; identical for both libraries. The big-vocabulary
# model gets shorter rows so that the default run stays within ~15 minutes (TRL needs ~10 s per vocab150k step).
SHAPES = {
    "tiny": dict(sft_prompt=(16, 48), sft_completion=(48, 112), dpo_prompt=(16, 48), dpo_response=(24, 80),
                 rl_prompt=(16, 32)),
    "vocab150k": dict(sft_prompt=(8, 24), sft_completion=(24, 56), dpo_prompt=(8, 24), dpo_response=(12, 40),
                      rl_prompt=(8, 16)),
    # the issue-24 shape: prompts 64 tokens and completions / responses 128 on average, lengths varying as in
    # real data (so padding exists for a padded forward to spend work on)
    "mid": dict(sft_prompt=(48, 80), sft_completion=(96, 160), dpo_prompt=(48, 80), dpo_response=(96, 160),
                rl_prompt=(48, 80)),
}
SHAPES["qwen05b"] = SHAPES["mid"]
SFT_ROWS, DPO_ROWS, RL_ROWS = 256, 256, 64

QWEN_VOCAB_SIZE = 151_936  # Qwen2/2.5 embedding rows
WORD_TOKENS = 151_643  # Qwen2's regular (non-special) tokens; the rest of the rows are padding
BIG_SIZE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
MID_VOCAB_SIZE = 32_000
MID_SIZE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, max_position_embeddings=1024)
QWEN05B_SIZE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
# Per word-level model: (embedding rows, regular word tokens, layer sizes).
WORD_MODELS = {"vocab150k": (QWEN_VOCAB_SIZE, WORD_TOKENS, BIG_SIZE), "mid": (MID_VOCAB_SIZE, MID_VOCAB_SIZE, MID_SIZE),
               "qwen05b": (QWEN_VOCAB_SIZE, WORD_TOKENS, QWEN05B_SIZE)}


def word_tokenizer(words: int = WORD_TOKENS):
    """A word-level tokenizer: the tiny model's special tokens, then `w0 ... w{words - 7}` (`words` ids in all),
    and the tiny model's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tether.models.tiny import BOS, CHAT_TEMPLATE, EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS, UNK

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(words - len(SPECIAL_TOKENS)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                        pad_token=PAD, additional_special_tokens=[IM_START, IM_END],
                                        padding_side="right")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def word_model(name: str, tokenizer, seed: int = 0):
    """The randomly initialised Llama `name` ("vocab150k" or "mid") for a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size, _, size = WORD_MODELS[name]
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def build_model(name: str, path: Path) -> None:
    from tether.models.tiny import tiny_model, tiny_tokenizer

    if name == "tiny":
        tokenizer = tiny_tokenizer()
        model = tiny_model(tokenizer, seed=0)
    elif name in WORD_MODELS:
        tokenizer = word_tokenizer(WORD_MODELS[name][1])
        model = word_model(name, tokenizer)
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------- data

def _text(name: str, rng: random.Random, n_tokens: int) -> str:
    """A string that tokenizes to exactly `n_tokens` tokens (no special tokens)."""
    if name == "tiny":
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 +-=*"
        return "".join(rng.choice(alphabet) for _ in range(n_tokens))
    words = WORD_MODELS[name][1] - 6  # the tokenizer's regular words (its 6 special tokens come first)
    return " ".join(f"w{rng.randrange(words)}" for _ in range(n_tokens))


def _join(name: str, text: str) -> str:
    """A continuation of a prompt: word-level text starts with a space so prompt + completion splits cleanly."""
    return text if name == "tiny" else " " + text


def build_data(name: str, path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    shape = SHAPES[name]
    path.mkdir(parents=True, exist_ok=True)
    draw = lambda key: _text(name, rng, rng.randint(*shape[key]))  # noqa: E731
    sft = [{"prompt": draw("sft_prompt"), "completion": _join(name, draw("sft_completion"))} for _ in range(SFT_ROWS)]
    dpo = [{"prompt": draw("dpo_prompt"), "chosen": _join(name, draw("dpo_response")),
            "rejected": _join(name, draw("dpo_response"))} for _ in range(DPO_ROWS)]
    rl = [{"prompt": draw("rl_prompt")} for _ in range(RL_ROWS)]
    for file, rows in (("sft.jsonl", sft), ("dpo.jsonl", dpo), ("prompts.jsonl", rl)):
        (path / file).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path / "shapes.json").write_text(json.dumps({"shapes": shape, "seed": seed}) + "\n")


def build_all(out: Path, names=("tiny", "vocab150k", "mid")) -> None:
    for name in names:
        model_dir = out / "models" / name
        if not (model_dir / "config.json").exists():
            build_model(name, model_dir)
        stamp = out / "data" / name / "shapes.json"
        if not stamp.exists() or json.loads(stamp.read_text())["shapes"] != json.loads(json.dumps(SHAPES[name])):
            build_data(name, out / "data" / name)


if __name__ == "__main__":
    build_all(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out"))
