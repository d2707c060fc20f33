"""DPO family recipe: log-probs against a slow reference, one concatenated forward = two forwards, implicit
rewards, cached vs on-the-fly vs LoRA-disabled references, each loss's value at π = π_ref, and a tiny
model whose greedy answers move to the preferred kind."""

import copy
import json
import math
import random

import pytest
import torch

from tether.cli import main as cli_main
from tether.config import ConfigError, load_config
from tether.data.preference import UnpairedExample, build_preference_pairs, build_unpaired_examples
from tether.losses import accepted_kwargs, get_preference_loss
from tether.models import LoraConfig, load
from tether.recipes.dpo import (
    DPOConfig,
    Reference,
    build_reference,
    kto_partners,
    pair_logps,
    precompute_reference,
    train,
    unpaired_logps,
)
from tether.recipes.sft import SFTConfig, train as sft_train

TINY = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
ROWS = [{"prompt": "ab?", "chosen": "yes, ab", "rejected": "no"},
        {"prompt": "hello there?", "chosen": "ok", "rejected": "no, thanks a lot"},
        {"prompt": "x?", "chosen": "yes!", "rejected": "nope"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load(TINY)[1]


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return build_preference_pairs(ROWS, tokenizer, source="rows", max_length=64)[0]


def perturbed(model, seed=0, std=0.05):
    """A copy of `model` with noise on every weight: a policy that has moved away from its reference."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return moved


def slow_logp(model, prompt_ids, completion_ids) -> float:
    """Σ_k log π(a_k | s, a_<k), one unpadded forward per completion token."""
    total = 0.0
    with torch.no_grad():
        for k, token in enumerate(completion_ids):
            context = torch.tensor([prompt_ids + completion_ids[:k]])
            logits = model(input_ids=context).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[token])
    return total


def test_sequence_logps_equal_a_slow_token_by_token_sum(pairs, tokenizer):
    model, _ = load(TINY, seed=4)
    with torch.no_grad():
        logps, lengths = pair_logps(model, pairs, tokenizer.pad_token_id, "cpu")  # (2B,)
    n = len(pairs)
    for i, pair in enumerate(pairs):
        assert float(logps[i]) == pytest.approx(slow_logp(model, pair.prompt_ids, pair.chosen_ids), abs=1e-4)
        assert float(logps[n + i]) == pytest.approx(slow_logp(model, pair.prompt_ids, pair.rejected_ids), abs=1e-4)
    assert lengths.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_concatenated_forward_equals_two_separate_forwards(pairs, tokenizer):
    model, _ = load(TINY, seed=4)
    with torch.no_grad():
        together, _ = pair_logps(model, pairs, tokenizer.pad_token_id, "cpu")  # one (2B, T) forward
        chosen, _, _ = unpaired_logps(model, [UnpairedExample(p.prompt_ids, p.chosen_ids, True) for p in pairs],
                                      tokenizer.pad_token_id, "cpu")
        rejected, _, _ = unpaired_logps(model, [UnpairedExample(p.prompt_ids, p.rejected_ids, False) for p in pairs],
                                        tokenizer.pad_token_id, "cpu")
    torch.testing.assert_close(together, torch.cat([chosen, rejected]), atol=1e-5, rtol=0)


def test_implicit_reward_is_beta_times_log_ratio(pairs, tokenizer):
    reference_model, _ = load(TINY, seed=4)
    policy = perturbed(reference_model)
    beta, n = 0.3, len(pairs)
    with torch.no_grad():
        logps, lengths = pair_logps(policy, pairs, tokenizer.pad_token_id, "cpu")
        ref = Reference(policy, reference_model).logps(pair_logps, pairs, tokenizer.pad_token_id, "cpu")
    ratio_w, ratio_l = logps[:n] - ref[:n], logps[n:] - ref[n:]
    for name in ("dpo", "cdpo", "robust", "hinge", "ipo"):
        loss_fn = get_preference_loss(name)  # hinge and ipo take no label_smoothing
        loss, metrics = loss_fn(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta, chosen_lengths=lengths[:n],
                                rejected_lengths=lengths[n:], **accepted_kwargs(loss_fn, label_smoothing=0.1))
        assert float(metrics["rewards_chosen"]) == pytest.approx(float((beta * ratio_w).mean()), abs=1e-6)
        assert float(metrics["rewards_rejected"]) == pytest.approx(float((beta * ratio_l).mean()), abs=1e-6)
        assert float(metrics["rewards_margin"]) == pytest.approx(float((beta * (ratio_w - ratio_l)).mean()), abs=1e-6)
    loss, _ = get_preference_loss("dpo")(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta,
                                         chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
    expected = -torch.nn.functional.logsigmoid(beta * (ratio_w - ratio_l)).mean()
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)


def test_dpo_worked_example_from_the_seeds():
    """log π_ref(y_w) = -1.2, log π(y_w) = -1.0, log π_ref(y_l) = -1.5, log π(y_l) = -2.0, β = 0.1:
    rewards 0.1·0.2 = 0.02 and 0.1·(-0.5) = -0.05, margin 0.07, loss = -log σ(0.07) = 0.6585."""
    t = lambda v: torch.tensor([v])  # noqa: E731
    loss, metrics = get_preference_loss("dpo")(t(-1.0), t(-2.0), t(-1.2), t(-1.5), beta=0.1,
                                               chosen_lengths=t(1), rejected_lengths=t(1))
    assert float(metrics["rewards_chosen"]) == pytest.approx(0.02)
    assert float(metrics["rewards_rejected"]) == pytest.approx(-0.05)
    assert float(metrics["rewards_margin"]) == pytest.approx(0.07)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-0.07))), abs=1e-6)


def test_precomputed_reference_equals_on_the_fly_after_the_policy_moves(pairs, tokenizer):
    policy, _ = load(TINY, seed=4)
    frozen = Reference(policy, copy.deepcopy(policy).eval())
    # Precomputation runs the policy itself, before its first update (batch size 2: padding differs).
    cache = precompute_reference(Reference(policy), pairs, None, tokenizer.pad_token_id, 2, "cpu")  # (n, 2)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05)
        on_the_fly = frozen.logps(pair_logps, pairs, tokenizer.pad_token_id, "cpu")  # (2n,) chosen then rejected
        moved = pair_logps(policy, pairs, tokenizer.pad_token_id, "cpu")[0]
    torch.testing.assert_close(cache.T.reshape(-1), on_the_fly, atol=1e-5, rtol=0)
    assert (moved - on_the_fly).abs().max() > 1e-2


def test_precomputed_kto_reference_includes_the_kl_pairs(tokenizer):
    rows = [{"prompt": f"{w}?", "completion": c, "label": c.startswith("y")}
            for w, c in [("ab", "yes"), ("cd", "no"), ("efg", "yes sir"), ("h", "nah")]]
    examples, _ = build_unpaired_examples(rows, tokenizer, source="rows", max_length=64)
    policy, _ = load(TINY, seed=4)
    partners = kto_partners(len(examples), seed=0)
    cache = precompute_reference(Reference(policy), examples, partners, tokenizer.pad_token_id, 3, "cpu")
    with torch.no_grad():
        own = unpaired_logps(policy, examples, tokenizer.pad_token_id, "cpu")[0]
        mismatched = unpaired_logps(policy, examples, tokenizer.pad_token_id, "cpu",
                                    [examples[j].completion_ids for j in partners])[0]
    torch.testing.assert_close(cache, torch.stack([own, mismatched], -1), atol=1e-5, rtol=0)


def test_kto_partners_are_a_fixed_derangement():
    partners = kto_partners(9, seed=3)
    assert sorted(partners) == list(range(9)) and all(p != i for i, p in enumerate(partners))
    assert partners == kto_partners(9, seed=3)


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(pairs, tokenizer):
    policy, _ = load(TINY, seed=4, lora=LoraConfig(r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a trained adapter
    base, _ = load(TINY, seed=4)
    with torch.no_grad():
        expected = pair_logps(base, pairs, tokenizer.pad_token_id, "cpu")[0]
        adapted = pair_logps(policy, pairs, tokenizer.pad_token_id, "cpu")[0]
    reference = build_reference(load_config(DPOConfig, None, {"precompute_ref": False}), policy, "cpu")
    assert reference.frozen is None  # no second copy of the model
    torch.testing.assert_close(reference.logps(pair_logps, pairs, tokenizer.pad_token_id, "cpu"), expected,
                               atol=1e-5, rtol=0)
    assert (adapted - expected).abs().max() > 1e-2
    with torch.no_grad():  # the adapter is back on afterwards
        torch.testing.assert_close(pair_logps(policy, pairs, tokenizer.pad_token_id, "cpu")[0], adapted)


def test_reference_choices():
    policy, _ = load(TINY)
    for loss in ("simpo", "orpo"):
        assert build_reference(load_config(DPOConfig, None, {"loss": loss}), policy, "cpu") is None
    assert build_reference(load_config(DPOConfig, None, {}), policy, "cpu").frozen is None  # precompute: the policy
    copied = build_reference(load_config(DPOConfig, None, {"precompute_ref": False}), policy, "cpu").frozen
    assert copied is not policy and not any(p.requires_grad for p in copied.parameters())
    torch.testing.assert_close(copied.lm_head.weight, policy.lm_head.weight)


def test_config_checks_and_help(capsys):
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(DPOConfig, None, {"loss": "robust", "label_smoothing": 0.5})
    with pytest.raises(ConfigError, match="reference-free"):
        load_config(DPOConfig, None, {"loss": "simpo", "ref_model": "some/model"})
    with pytest.raises(ConfigError, match="one of"):
        load_config(DPOConfig, None, {"loss": "dpoo"})
    assert cli_main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("loss", "beta", "label_smoothing", "gamma", "orpo_lambda", "desirable_weight",
                   "undesirable_weight", "precompute_ref", "ref_model", "skip_bad_rows"):
        assert f"  {option} (" in out


# ----------------------------------------------------------------------------- the recipe


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def yes_no_pairs(words):
    return [{"prompt": f"{w}?", "chosen": f"yes, {w}", "rejected": f"no, {w}"} for w in words]


# At π = π_ref every log-ratio is 0, so each loss has a known first-step value (β = 0.1, ε = 0.1):
# dpo/cdpo: -(1-ε) log σ(0) - ε log σ(0) = log 2; robust: ((1-ε) - ε) log 2 / (1 - 2ε) = log 2;
# hinge: max(0, 1 - 0) = 1; ipo: (0 - 1/(2β))² = 25; kto: z = 0, 1 - σ(0) = 0.5 for every example.
FIRST_STEP_LOSS = {"dpo": math.log(2), "cdpo": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": 25.0,
                   "kto": 0.5}


@pytest.mark.parametrize("loss, extra", [pytest.param(name, {}, id=name) for name in FIRST_STEP_LOSS] + [
    pytest.param("dpo", {"lora.r": 2, "precompute_ref": False}, id="dpo-lora-adapter-disabled-reference"),
    pytest.param("dpo", {"precompute_ref": False}, id="dpo-frozen-copy-reference"),
    pytest.param("kto", {"precompute_ref": False}, id="kto-frozen-copy-reference"),
    pytest.param("simpo", {}, id="simpo"), pytest.param("orpo", {}, id="orpo")])
def test_each_loss_trains_from_its_value_at_the_reference(tmp_path, loss, extra):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(3)) for _ in range(16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", yes_no_pairs(words))
    config = load_config(DPOConfig, None, {
        "model": TINY, "data": data, "output_dir": str(tmp_path / "run"), "loss": loss, "max_steps": 3,
        "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-2, "label_smoothing": 0.1, "eval_fraction": 0.25,
        "max_length": 32, "report_to": [], "progress": False, **extra})
    train(config)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    if loss in FIRST_STEP_LOSS:
        assert first["loss"] == pytest.approx(FIRST_STEP_LOSS[loss], abs=1e-4)
        assert first["rewards_chosen"] == pytest.approx(0, abs=1e-4)
    if loss != "kto":
        assert {"rewards_accuracy", "rewards_margin", "logps_chosen", "logps_rejected"} <= set(first)
    else:
        assert {"rewards_chosen", "rewards_rejected", "kl"} <= set(first)
    assert last["loss"] < first["loss"]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert "loss" in json.loads((tmp_path / "run" / "eval.json").read_text())


def greedy_fraction_yes(model_path, words, tokenizer=None):
    model, tokenizer = load(str(model_path))
    model.eval()
    answers = []
    with torch.no_grad():
        for w in words:
            ids = tokenizer(f"{w}?", return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return sum(a.startswith("yes") for a in answers) / len(answers)


def test_dpo_moves_greedy_answers_to_the_preferred_kind(tmp_path):
    """SFT on a mix where 30% of answers are the preferred kind ("yes, w"), so the model can produce both
    but greedily says "no"; DPO on (yes ≻ no) pairs must flip held-out greedy answers and raise the margin."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5))) for _ in range(200)]
    train_words, held_out = words[:120], words[120:]
    sft_rows = [{"prompt": f"{w}?", "completion": f"{'yes' if rng.random() < 0.3 else 'no'}, {w}"} for w in train_words]
    common = {"report_to": [], "progress": False, "max_length": 32, "batch_size": 16}
    sft_final = sft_train(load_config(SFTConfig, None, {
        **common, "model": "tiny:hidden_size=64,intermediate_size=128,num_hidden_layers=2",
        "data": write_jsonl(tmp_path / "sft.jsonl", sft_rows), "output_dir": str(tmp_path / "sft"),
        "max_steps": 60, "learning_rate": 3e-3}))
    before = greedy_fraction_yes(sft_final, held_out)

    dpo_final = train(load_config(DPOConfig, None, {
        **common, "model": str(sft_final), "data": write_jsonl(tmp_path / "pairs.jsonl", yes_no_pairs(train_words)),
        "eval_data": write_jsonl(tmp_path / "held_out.jsonl", yes_no_pairs(held_out)),
        "output_dir": str(tmp_path / "dpo"), "max_steps": 20, "learning_rate": 2e-4, "beta": 0.1}))
    after = greedy_fraction_yes(dpo_final, held_out)
    result = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    print(f"greedy 'yes' fraction {before:.2f} -> {after:.2f}; held-out {result}")
    assert before <= 0.3 and after >= 0.9
    # At the start the held-out margin is exactly 0 (π = π_ref); DPO must raise it and rank every pair right.
    assert result["rewards_margin"] > 0.1 and result["rewards_accuracy"] >= 0.95


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    """The reference cache is rebuilt from the starting weights before the checkpoint is loaded, so a run
    killed after step 3 and resumed ends bitwise equal to one that never stopped."""
    from transformers import AutoModelForCausalLM

    from tether.runtime.run import Run

    rng = random.Random(1)
    data = write_jsonl(tmp_path / "pairs.jsonl", yes_no_pairs(["".join(rng.choice("abcdef") for _ in range(3))
                                                               for _ in range(12)]))

    def config(name, **extra):
        return load_config(DPOConfig, None, {"model": TINY, "data": data, "output_dir": str(tmp_path / name),
                                             "max_steps": 6, "save_steps": 3, "batch_size": 4, "max_length": 32,
                                             "learning_rate": 1e-2, "report_to": [], "progress": False, **extra})

    straight = train(config("straight"))
    original = Run.end_step

    def die_after_three(self, step, *args, **kwargs):
        row = original(self, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt
        return row

    monkeypatch.setattr(Run, "end_step", die_after_three)
    with pytest.raises(KeyboardInterrupt):
        train(config("resumed"))
    monkeypatch.setattr(Run, "end_step", original)
    resumed = train(config("resumed", resume=True))
    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    machine = ("step_time", "tokens_per_s", "peak_memory_mb", "peak_rss_mb")  # differ between processes
    read = lambda name: [{k: v for k, v in json.loads(x).items() if k not in machine}  # noqa
                         for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert read("straight") == read("resumed") and len(read("resumed")) == 6


def test_orpo_nll_is_a_token_mean_over_the_global_batch_whatever_the_micro_batches(tmp_path):
    """ORPO's NLL divides by the chosen-token count of the whole batch, not of each micro-batch, so that
    splitting a batch of chosen answers of very different lengths into micro-batches changes nothing: the
    same logged loss and the same weights after two steps as one micro-batch per step."""
    rng = random.Random(1)
    rows = [{"prompt": f"{w}?", "chosen": "yes " + "y" * rng.randint(1, 12), "rejected": f"no, {w}"}
            for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    runs = {}
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        train(load_config(DPOConfig, None, {
            "model": TINY, "data": data, "output_dir": str(out), "loss": "orpo", "max_steps": 2, "batch_size": 8,
            "micro_batch_size": micro, "learning_rate": 1e-2, "max_length": 32, "report_to": [], "progress": False}))
        runs[micro] = ([json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()],
                       load(str(out / "final"))[0].state_dict())
    (whole, whole_weights), (split, split_weights) = runs[8], runs[2]
    assert split == pytest.approx(whole, abs=1e-5)
    for name, value in whole_weights.items():
        torch.testing.assert_close(split_weights[name], value, atol=1e-5, rtol=0)
