"""Models: tiny built-in, save → load round trips (full and LoRA), hub-style loading from folders."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether import models
from tether.models import LoraConfig

SMALL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2"


def logits_of(model, tokenizer, text="12+34=46"):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_tiny_is_a_real_llama_seeded():
    model, tok = models.load(SMALL, seed=1)
    again, _ = models.load(SMALL, seed=1)
    other, _ = models.load(SMALL, seed=2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits_of(model, tok), logits_of(again, tok))
    assert not torch.equal(logits_of(model, tok), logits_of(other, tok))


def test_bad_tiny_spec_names_the_problem():
    with pytest.raises(ValueError, match="expected tiny:key=int"):
        models.load("tiny:hidden_size=big")


def test_missing_model_path_is_clear():
    with pytest.raises(FileNotFoundError, match="not a folder, not a hub name"):
        models.load("no_such_model_dir")


def test_save_load_gives_identical_logits(tmp_path):
    model, tok = models.load(SMALL)
    models.save(model, tok, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert tok2("a+b")["input_ids"] == tok("a+b")["input_ids"]
    assert tok2.chat_template == tok.chat_template
    assert torch.equal(logits_of(model, tok), logits_of(loaded, tok))
    via_tether, _ = models.load(str(tmp_path / "m"))
    assert torch.equal(logits_of(model, tok), logits_of(via_tether, tok))


def test_lora_adapter_save_load_merge_gives_identical_logits(tmp_path):
    base, tok = models.load(SMALL)
    models.save(base, tok, tmp_path / "base")
    model, _ = models.load(str(tmp_path / "base"), lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter non-trivial (LoRA B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    expected = logits_of(model, tok)
    assert not torch.allclose(expected, logits_of(base, tok))
    models.save(model, tok, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded, _ = models.load_adapter(str(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(logits_of(reloaded, tok), expected, atol=1e-5, rtol=0)
    merged, _ = models.load_adapter(str(tmp_path / "base"), tmp_path / "adapter", merge=True)
    assert not models.is_peft(merged)
    torch.testing.assert_close(logits_of(merged, tok), expected, atol=1e-5, rtol=0)
    models.save(model, tok, tmp_path / "merged", merge_lora=True)
    from_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(from_disk, tok), expected, atol=1e-5, rtol=0)


def test_tiny_reasoning_tags_are_one_token_each_and_survive_a_round_trip(tmp_path):
    """`tiny:reasoning_tags=1`: <think> </think> <answer> </answer> become one ordinary token each (appended after
    the characters, so every other id is unchanged), decoding keeps them, and a saved model reloads with them."""
    model, tokenizer = models.load("tiny:reasoning_tags=1,hidden_size=32,num_hidden_layers=1")
    plain = models.load_tokenizer("tiny")
    assert len(tokenizer) == len(plain) + 4 == model.config.vocab_size
    text = "<think>7</think><answer>17</answer>"
    ids = tokenizer(text)["input_ids"]
    assert ids == [len(plain), plain.convert_tokens_to_ids("7"), len(plain) + 1, len(plain) + 2,
                   *plain("17")["input_ids"], len(plain) + 3]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("a+b c")["input_ids"] == plain("a+b c")["input_ids"]
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, reloaded = models.load(str(tmp_path))
    assert reloaded(text)["input_ids"] == ids
