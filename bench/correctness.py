"""Correctness beside speed: on identical batches, tether's numbers equal TRL's.

    python bench/correctness.py OUT_DIR [model ...] [--levers a,b]     # prints one JSON line

For each benchmark model (the policy is the saved model with a small seeded perturbation, the reference is the
saved model, so ratios and DPO margins are not trivially 0 or 1):
  - per-token log-probs of the same right-padded SFT batch: `tether.models.forward.model_token_logprobs` against TRL's
    `selective_log_softmax` on the model's logits;
  - DPO loss of the first 8 preference rows: tether (its own tokenization, `pair_logps`, the `dpo` loss) against
    `trl.DPOTrainer.compute_loss` on TRL's own tokenization and collation of the same rows;
  - GRPO loss and completion log-probs of one rollout (8 prompts x 4 completions sampled by tether's sampler,
    old log-probs from the reference, fixed advantages): `tether.recipes.grpo.grpo_loss` against
    `trl.GRPOTrainer._compute_loss` (loss_type="dapo", the token mean tether's `token_mean` computes).
With `--levers`, the proposed tether changes in bench/levers are patched in first, so they are checked too.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

TOLERANCE = {"logprobs": 1e-4, "dpo_loss": 1e-5, "grpo_loss": 1e-5, "grpo_logprobs": 1e-4}


def load(model_dir: Path, perturb: float = 0.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * perturb * p.std().clamp(min=1e-3))
    return model


def check(name: str, model: str, a: torch.Tensor, b: torch.Tensor, key: str) -> dict:
    diff = float((a.detach().double() - b.detach().double()).abs().max())
    return {"model": model, "name": name, "max_abs_diff": diff, "tolerance": TOLERANCE[key],
            "passed": diff <= TOLERANCE[key], "value_tether": _scalar(a), "value_trl": _scalar(b)}


def _scalar(x: torch.Tensor):
    return float(x.detach()) if x.numel() == 1 else None


def logprob_check(name: str, out: Path) -> dict:
    from transformers import AutoTokenizer
    from trl.trainer.utils import selective_log_softmax

    from tether.data.batching import collate_sft
    from tether.data.sft import build_sft_examples
    from tether.supervised import model_token_logprobs  # what the SFT loop calls (a lever may replace it)
    from workloads import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(out / "models" / name)
    model = load(out / "models" / name, perturb=0.05).eval()
    rows = read_jsonl(out / "data" / name / "sft.jsonl")[:8]
    examples, _ = build_sft_examples(rows, tokenizer, source="sft.jsonl", max_length=1024)
    batch = collate_sft(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        tether_lp, _ = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"])  # (B, T-1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trl_lp = selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:])  # (B, T-1)
    mask = batch["attention_mask"][:, 1:].bool()
    return check("per-token log-probs (SFT batch)", name, tether_lp[mask], trl_lp[mask], "logprobs")


def dpo_check(name: str, out: Path) -> dict:
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    from tether.data.preference import build_preference_pairs
    from tether.losses import get_preference_loss
    from tether.models.forward import pair_logps
    from workloads import read_jsonl

    model_dir = out / "models" / name
    policy, reference = load(model_dir, perturb=0.05), load(model_dir)
    rows = read_jsonl(out / "data" / name / "dpo.jsonl")[:8]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = build_preference_pairs(rows, tokenizer, source="dpo.jsonl", max_length=1024, margin_column="")
    policy.train()
    logps, lengths = pair_logps(policy, pairs, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        ref, _ = pair_logps(reference.eval(), pairs, tokenizer.pad_token_id, "cpu")
    b = len(pairs)
    tether_loss, _ = get_preference_loss("dpo")(logps[:b], logps[b:], ref[:b], ref[b:], beta=0.1,
                                                chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])

    with tempfile.TemporaryDirectory() as tmp:
        dataset = load_dataset("json", data_files=str(out / "data" / name / "dpo.jsonl"), split="train").select(
            range(8))
        args = DPOConfig(output_dir=tmp, beta=0.1, max_length=1024, report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, per_device_train_batch_size=8, disable_tqdm=True)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                                 processing_class=tokenizer)
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        trainer.model.train()
        trl_loss = trainer.compute_loss(trainer.model, inputs)
    return check("DPO loss (sigmoid, beta 0.1, 8 pairs)", name, tether_loss, trl_loss, "dpo_loss")


def grpo_checks(name: str, out: Path) -> list[dict]:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tether.recipes.grpo import GRPOConfig as TetherGRPOConfig, grpo_loss
    from tether.models.forward import completion_forward
    from tether.rollout import SamplingParams, get_sampler
    from workloads import read_jsonl

    model_dir = out / "models" / name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy, reference = load(model_dir, perturb=0.05), load(model_dir).eval()
    prompts = [r["prompt"] for r in read_jsonl(out / "data" / name / "prompts.jsonl")[:8]]
    G, C = 4, 24
    rollout = get_sampler("builtin", reference, tokenizer).generate(
        prompts, SamplingParams(n=G, max_new_tokens=C, min_new_tokens=C // 2, seed=0))
    batch = rollout.to_tensors(tokenizer.pad_token_id)  # prompts left-padded, completions right-padded
    N, P = batch["input_ids"].shape[0], batch["prompt_length"]
    with torch.no_grad():
        old_logprobs = completion_forward(reference, batch)[0]  # (N, C) from pi_old = the reference
    advantages = torch.linspace(-1.5, 1.5, N)[torch.randperm(N, generator=torch.Generator().manual_seed(0))]
    mask = batch["completion_mask"]
    micro = {**batch, "loss_mask": mask, "old_logprobs": old_logprobs, "advantages": advantages}
    config = TetherGRPOConfig(rewards=[{"name": "length"}], kl_coef=0.0, loss_aggregation="token_mean")
    policy.train()
    tether_loss, _, _ = grpo_loss(policy, micro, config, beta=0.0, counts={"num_tokens": mask.sum(), "num_seqs": N,
                                                                           "max_len": C}, temperature=1.0)
    tether_lp = completion_forward(policy, batch)[0]

    with tempfile.TemporaryDirectory() as tmp:
        dataset = load_dataset("json", data_files=str(out / "data" / name / "prompts.jsonl"), split="train")
        args = GRPOConfig(output_dir=tmp, num_generations=G, max_completion_length=C, beta=0.0, loss_type="dapo",
                          report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                          per_device_train_batch_size=N, disable_tqdm=True)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = GRPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = {"prompt_ids": batch["input_ids"][:, :P], "prompt_mask": batch["attention_mask"][:, :P],
                  "completion_ids": batch["input_ids"][:, P:], "completion_mask": mask.long(),
                  "advantages": advantages, "old_per_token_logps": old_logprobs,
                  "num_items_in_batch": mask.sum()}
        trl_loss = trainer._compute_loss(trainer.model, inputs)
        trl_lp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, batch["input_ids"], batch["attention_mask"], C)
    keep = mask.bool()
    return [check("GRPO completion log-probs (8 prompts x 4)", name, tether_lp[keep], trl_lp[keep], "grpo_logprobs"),
            check("GRPO loss (clipped, token mean = TRL dapo)", name, tether_loss, trl_loss, "grpo_loss")]


def main(argv: list[str]) -> dict:
    levers = []
    if "--levers" in argv:
        i = argv.index("--levers")
        levers = [x for x in argv[i + 1].split(",") if x]
        argv = argv[:i] + argv[i + 2:]
    out = Path(argv[0])
    models = argv[1:] or ["tiny", "vocab150k"]
    torch.manual_seed(0)
    for lever in levers:
        importlib.import_module(f"levers.{lever}").apply()
    checks = []
    for name in models:
        checks.append(logprob_check(name, out))
        checks.append(dpo_check(name, out))
        checks.extend(grpo_checks(name, out))
    return {"passed": all(c["passed"] for c in checks), "levers": levers, "checks": checks}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
