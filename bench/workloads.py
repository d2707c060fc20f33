"""One benchmark job = one library running one workload in a forked child (see worker.py).

Training workloads run each library's real entry point (`tether.recipes.<x>.train`, TRL's `<X>Trainer.train`)
for `warmup + steps + 1` optimizer steps. A timestamp is taken at the end of every optimizer step (tether:
`Run.end_step`; TRL: the `on_step_end` callback; both come after the optimizer step and before any logging or
checkpointing), so a step's time is everything between two step ends: data, forward, loss, backward, clip,
optimizer, generation and rewards for RL. The first step (it has no start mark) and the next `warmup` steps are
dropped; start-up (model loading, tokenization) and the final save are outside the timed steps.

Stage times come from wrappers around functions both libraries share: `Tensor.backward` (backward),
`torch.optim` step hooks (optimizer), the generation call (tether's sampler / HF `generate`); the remainder of
the step is "other" (forward passes, losses, data, bookkeeping).

Generation runs the same call `warmup + steps` times: tether's `BuiltinSampler.generate` against
`tokenizer(...) -> model.generate(...) -> batch_decode` in HF.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- timing


class Clock:
    """Step-end timestamps and cumulative per-stage seconds, snapshotted at each step end."""

    def __init__(self):
        self.totals = defaultdict(float)
        self.marks: list[tuple[float, float, dict]] = []
        self._optimizer_start = None

    def mark(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a step ends when its kernels have
        self.marks.append((time.perf_counter(), time.process_time(), dict(self.totals)))

    def timed(self, fn, stage: str):
        clock = self

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.totals[stage] += time.perf_counter() - start

        wrapper.__wrapped__ = fn
        return wrapper

    def install(self) -> None:
        """Time backward and optimizer steps, whoever calls them."""
        torch.Tensor.backward = self.timed(torch.Tensor.backward, "backward")

        def pre(optimizer, args, kwargs):
            self._optimizer_start = time.perf_counter()

        def post(optimizer, args, kwargs):
            if self._optimizer_start is not None:
                self.totals["optimizer"] += time.perf_counter() - self._optimizer_start

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(pre)
        register_optimizer_step_post_hook(post)

    def summary(self, warmup: int) -> dict:
        """Per timed step: wall seconds, process CPU seconds and stage (wall) seconds.

        Step i spans marks[i-1] .. marks[i]. CPU time counts only this process's own running time, so on a
        machine shared with other work it is far steadier than wall time (with one torch thread they agree on
        an idle machine)."""
        steps = []
        for (t0, c0, s0), (t1, c1, s1) in zip(self.marks[warmup:], self.marks[warmup + 1:]):
            stages = {k: s1.get(k, 0.0) - s0.get(k, 0.0) for k in set(s0) | set(s1)}
            steps.append({"time": t1 - t0, "cpu": c1 - c0, "stages": {k: v for k, v in stages.items() if v > 0}})
        return {"steps": steps}


def setup(job: dict) -> None:
    threads = job["threads"]
    torch.set_num_threads(threads)
    torch.manual_seed(job.get("seed", 0))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run(job: dict) -> dict:
    setup(job)
    for lever in job.get("levers", []):  # bench/levers/<name>.py: a proposed tether change, patched in
        importlib.import_module(f"levers.{lever}").apply()
    # the job's function: <lib>_<workload> in this module, or in `module` (e.g. learning.py's jobs)
    module = importlib.import_module(job["module"]) if job.get("module") else sys.modules[__name__]
    fn = getattr(module, f"{job['lib']}_{job['workload']}")
    rss_start = _rss_mb()
    out_dir = Path(job["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    try:
        result = fn(job)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    result["rss_start_mb"] = rss_start
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["torch_threads"] = torch.get_num_threads()
    if job["lib"] == "tether":
        import tether

        result["tether_path"] = str(Path(tether.__file__).parent)
    return result


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- tether


def _tether_common(job: dict) -> dict:
    lora = job.get("lora")
    lora_options = {"lora": {key: lora[key] for key in ("r", "alpha", "target_modules")}} if lora else {}
    return dict(model=job["model"], output_dir=str(Path(job["out_dir"]) / "run"),
                max_steps=job["warmup"] + job["steps"] + 1, batch_size=job.get("batch_size", 0),
                learning_rate=job["learning_rate"], lr_scheduler="constant", seed=job.get("seed", 0),
                max_length=job.get("max_length", 512), report_to=[], progress=False, log_steps=10**9,
                save_steps=0, device=job.get("device", "cpu"), dtype=job.get("dtype", "float32"), **lora_options,
                **job.get("tether_options", {}))


def _tether_config(cls, **values):
    """A recipe config through `tether.config.load_config`, the way a YAML file and `key=value` overrides are read
    (nested keys such as `lora` given as mappings)."""
    from tether.config import load_config

    return load_config(cls, overrides=values)


def _tether_train(job: dict, recipe, config, clock: Clock | None = None) -> dict:
    from tether.runtime.run import Run

    clock = clock or Clock()
    clock.install()
    original = Run.end_step

    def end_step(self, *args, **kwargs):
        clock.mark()
        return original(self, *args, **kwargs)

    Run.end_step = end_step
    recipe.train(config)
    return clock.summary(job["warmup"])


def tether_sft(job: dict) -> dict:
    from tether.recipes import sft

    config = _tether_config(sft.SFTConfig, data=str(Path(job["data_dir"]) / "sft.jsonl"), **_tether_common(job))
    return _tether_train(job, sft, config)


def tether_dpo(job: dict) -> dict:
    from tether.recipes import dpo

    # precompute_ref=false: the reference forward runs in every step, as in TRL's default; tether's default
    # (precompute once before training) is measured separately as a lever in docs/benchmarks.md.
    options = {"precompute_ref": False, **job.get("tether_options", {})}
    config = _tether_config(dpo.DPOConfig, data=str(Path(job["data_dir"]) / "dpo.jsonl"), loss="dpo",
                            beta=job["beta"], **{**_tether_common(job), **options})
    return _tether_train(job, dpo, config)


def tether_grpo(job: dict) -> dict:
    from dataclasses import fields

    from tether.recipes import grpo
    from tether.rollout import sampler as sampler_module

    common = _tether_common(job)
    common["batch_size"] = job["prompts_per_step"]
    n = job["max_new_tokens"]
    options = dict(group_size=job["group_size"], max_completion_length=n, kl_coef=job["beta"], temperature=1.0,
                   rewards=[{"name": str(Path(__file__).resolve().parent / "reward.py") + ":reward"}],
                   advantage="grpo", advantage_std="sample",  # TRL divides by the unbiased group std
                   loss_aggregation="token_mean",  # TRL's default loss_type="dapo"
                   sample_steps=0)  # no samples.jsonl writes inside the timed steps
    names = {f.name for f in fields(grpo.GRPOConfig)}
    if "min_completion_length" in names:
        options["min_completion_length"] = n
    else:  # no config key for fixed-length rollouts yet: ask the sampler for min_new_tokens directly
        make_params = grpo.sampling_params

        def fixed_length(*args, **kwargs):
            params = make_params(*args, **kwargs)
            params.min_new_tokens = params.max_new_tokens
            return params

        grpo.sampling_params = fixed_length
    config = _tether_config(grpo.GRPOConfig, data=str(Path(job["data_dir"]) / "prompts.jsonl"),
                            **{**common, **options, **job.get("tether_options", {})})
    clock = Clock()
    sampler_module.BuiltinSampler.generate = clock.timed(sampler_module.BuiltinSampler.generate, "generate")
    return _tether_train(job, grpo, config, clock)


def tether_generate(job: dict) -> dict:
    from transformers import AutoTokenizer

    from tether.rollout import SamplingParams, get_sampler

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = _load_for_generation(job)
    prompts = [row["prompt"] for row in read_jsonl(Path(job["data_dir"]) / "prompts.jsonl")][: job["prompts_per_step"]]
    sampler = get_sampler(job.get("engine", "builtin"), model, tokenizer, **job.get("tether_options", {}))
    params = SamplingParams(n=job["group_size"], temperature=1.0, max_new_tokens=job["max_new_tokens"],
                            min_new_tokens=job["max_new_tokens"], seed=job.get("seed", 0))
    clock = Clock()
    generate = clock.timed(sampler.generate, "generate")
    clock.mark()
    for _ in range(job["warmup"] + job["steps"]):
        batch = generate(prompts, params)
        clock.mark()
    lengths = {len(ids) for ids in batch.completion_ids}
    assert lengths == {job["max_new_tokens"]}, f"completion lengths {lengths}"
    return clock.summary(job["warmup"])


# ----------------------------------------------------------------------------- TRL


def _load_for_generation(job: dict):
    """The benchmark model for a generation job, on the job's device in its dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, job.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).to(job.get("device", "cpu"))
    return model.eval()


def _trl_common(job: dict) -> dict:
    micro = job.get("trl_micro_batch") or job.get("batch_size")
    return dict(output_dir=str(Path(job["out_dir"]) / "run"), max_steps=job["warmup"] + job["steps"] + 1,
                per_device_train_batch_size=micro, gradient_accumulation_steps=job.get("trl_accumulation", 1),
                learning_rate=job["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
                seed=job.get("seed", 0), data_seed=job.get("seed", 0), report_to="none", save_strategy="no",
                eval_strategy="no", logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0,
                use_cpu=job.get("device", "cpu") == "cpu",
                # TRL defaults that would change the work: bf16 autocast and gradient checkpointing are on by
                # default in TRL 1.x trainers; tether runs fp32 without checkpointing, so both are turned off.
                bf16=job.get("dtype") == "bfloat16", gradient_checkpointing=False,
                model_init_kwargs={"dtype": job.get("dtype", "float32")}, **job.get("trl_options", {}))


def _trl_peft(job: dict) -> dict:
    """The trainer's `peft_config` for a LoRA job (adapters on the same modules as tether's), else nothing. With
    an adapter and no reference model given, TRL's reference is the policy with the adapter switched off, as
    tether's is."""
    lora = job.get("lora")
    if not lora:
        return {}
    from peft import LoraConfig

    return {"peft_config": LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")}


def _trl_train(job: dict, trainer, clock: Clock | None = None) -> dict:
    from transformers import TrainerCallback

    clock = clock or Clock()
    clock.install()

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    trainer.add_callback(StepEnd())
    trainer.train()
    return clock.summary(job["warmup"])


def trl_sft(job: dict) -> dict:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(Path(job["data_dir"]) / "sft.jsonl"), split="train")
    args = SFTConfig(max_length=job.get("max_length", 512), **_trl_common(job))
    trainer = SFTTrainer(model=job["model"], args=args, train_dataset=dataset)
    return _trl_train(job, trainer)


def trl_dpo(job: dict) -> dict:
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset("json", data_files=str(Path(job["data_dir"]) / "dpo.jsonl"), split="train")
    args = DPOConfig(max_length=job.get("max_length", 512), beta=job["beta"], **_trl_common(job))
    trainer = DPOTrainer(model=job["model"], args=args, train_dataset=dataset, **_trl_peft(job))
    return _trl_train(job, trainer)


def trl_grpo(job: dict) -> dict:
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer

    import reward

    dataset = load_dataset("json", data_files=str(Path(job["data_dir"]) / "prompts.jsonl"), split="train")
    # One optimizer step = prompts_per_step prompts x group_size completions, generated in one batch
    # (generation_batch_size = per_device_train_batch_size x gradient_accumulation_steps).
    common = _trl_common({"trl_micro_batch": job["prompts_per_step"] * job["group_size"], **job})
    n = job["max_new_tokens"]
    args = GRPOConfig(num_generations=job["group_size"], max_completion_length=n, beta=job["beta"],
                      generation_kwargs={"min_new_tokens": n}, temperature=1.0, top_p=1.0, top_k=0,
                      **common)
    trainer = GRPOTrainer(model=job["model"], args=args, train_dataset=dataset, reward_funcs=reward.reward,
                          **_trl_peft(job))
    clock = Clock()
    from transformers import GenerationMixin

    GenerationMixin.generate = clock.timed(GenerationMixin.generate, "generate")
    return _trl_train(job, trainer, clock)


def trl_generate(job: dict) -> dict:
    """The HF `generate` call a user (or TRL's GRPOTrainer without vLLM) makes: tokenize, generate, decode."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["model"], padding_side="left")
    model = _load_for_generation(job)
    prompts = [row["prompt"] for row in read_jsonl(Path(job["data_dir"]) / "prompts.jsonl")][: job["prompts_per_step"]]
    n = job["max_new_tokens"]
    clock = Clock()
    torch.manual_seed(job.get("seed", 0))

    def generate():
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=n, min_new_tokens=n, num_return_sequences=job["group_size"],
                                    pad_token_id=tokenizer.pad_token_id)
        completions = output[:, inputs["input_ids"].shape[1]:]
        tokenizer.batch_decode(completions, skip_special_tokens=True)
        return completions

    generate = clock.timed(generate, "generate")
    clock.mark()
    for _ in range(job["warmup"] + job["steps"]):
        completions = generate()
        clock.mark()
    assert completions.shape[1] == n, completions.shape
    return clock.summary(job["warmup"])
