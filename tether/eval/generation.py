"""Generation evaluation: n samples per prompt → pass@k, maj@k (cons@k), mean pass@1, mean reward per function.

    tether eval --model runs/grpo/final --data examples/data/math_test.jsonl --n 8 --k 1 4 8

For each prompt, n completions are sampled and judged by the reward functions (default `math`). A sample
is correct when the FIRST reward scores at least `correct_threshold` (1.0: the math reward's "right").
With c of n samples correct:
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1), averaged over prompts.
- pass@1_mean: the share of correct samples, c / n, averaged over prompts (DeepSeek-R1's "pass@1 averaged
  over 64 samples"; the same number as the estimator's pass@1, reported under the name papers use).
- maj@k (DeepSeek calls it cons@k): the majority vote over the answers extracted from the FIRST k samples
  (the math reward's extractor); right when the winning answer's first sample is correct. Answers are
  grouped by their text with spaces removed; nothing extracted never wins; ties go to the answer that
  appears first (`tether.eval.metrics.majority_vote`).

`evaluate(model, tokenizer, rows, ...)` is the same evaluation in process (no reloading), returning a dict.
This module also holds `sample_rows`, the "sample completions for dataset rows" step that best-of-n,
rejection sampling and distillation share, and `sample_share`, its part for one rank under torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from tether.data.loading import DataError, load_rows
from tether.eval.metrics import maj_at_k, pass_at_1_mean, pass_at_k
from tether.data.chat import encode_prompt
from tether.rollout import RolloutBatch, SamplingParams
from tether.rollout.episodes import EpisodeBatch, concat_batches, generate_episodes
from tether.rollout.factory import shared_sampler
from tether.rollout.params import SamplingKeys, sampling_params, take_engine_alias
from tether.runtime import distributed
from tether.runtime.options import parse_args

log = logging.getLogger("tether")


# ----------------------------------------------------------------------------- sampling dataset rows

def prompts_of(rows: list[dict], source: str = "data") -> list:
    """The `prompt` of every row (a string or a message list); a row without one is a DataError."""
    prompts = []
    for index, row in enumerate(rows):
        prompt = row.get("prompt")
        if isinstance(prompt, str) and prompt.strip() or isinstance(prompt, list) and prompt:
            prompts.append(prompt)
        else:
            problem = ("missing field" if prompt is None
                       else f"expected a non-empty string or message list, got {prompt!r}")
            raise DataError(source, f"{problem}; sampling needs a 'prompt' on every row", index, "prompt")
    return prompts


def sample_rows(model, tokenizer, rows: list[dict], params: SamplingParams, *, batch_size: int = 16,
                chat_template: str = "auto", engine: str = "builtin", source: str = "data",
                episodes: dict | None = None) -> RolloutBatch:
    """`params.n` completions for the prompt of every row, as one RolloutBatch grouped prompt by prompt; with
    `episodes` ({make_env, max_turns, max_turn_tokens}) multi-turn episodes instead, as one EpisodeBatch.

    Prompts are tokenized exactly as SFT tokenizes them (`tether.generate.encode_prompt`: message lists
    through the chat template), `batch_size` prompts per generate call; chunk i samples with seed
    `params.seed + i`, so a run is reproducible for a given seed and batch_size.
    """
    prompt_ids = [encode_prompt(tokenizer, p, chat_template) for p in prompts_of(rows, source)]
    sampler = shared_sampler(engine, model, tokenizer)
    batches = []
    for chunk, start in enumerate(range(0, len(prompt_ids), batch_size)):
        seed = None if params.seed is None else params.seed + chunk
        chunk_params = replace(params, seed=seed)
        if episodes is None:
            batches.append(sampler.generate(prompt_ids[start:start + batch_size], chunk_params))
        else:
            batches.append(generate_episodes(sampler, prompt_ids[start:start + batch_size],
                                             rows[start:start + batch_size], params=chunk_params, **episodes))
        log.info("sampled %d/%d prompts × %d", min(start + batch_size, len(prompt_ids)), len(prompt_ids), params.n)
    return concat_batches(batches)


def sample_share(model, tokenizer, rows: list[dict], params: SamplingParams, *, batch_size: int = 16,
                 chat_template: str = "auto", engine: str = "builtin", source: str = "data",
                 episodes: dict | None = None) -> tuple[range, RolloutBatch]:
    """This rank's part of `sample_rows(rows, ...)` under torchrun: whole chunks of `batch_size` prompts
    (`distributed.shard_chunks`), chunk c seeded with `params.seed + c` exactly as one process seeds it, so the
    samples do not depend on the number of ranks. Returns (the rows sampled, their batch, whose prompt_index
    counts from the first of those rows); in one process (range(len(rows)), sample_rows(rows, ...)).

    Every row's prompt is checked first, so a bad row is reported with its index in `rows` on every rank."""
    prompts_of(rows, source)
    share = distributed.shard_chunks(len(rows), batch_size)
    first_chunk = share.start // batch_size
    seed = None if params.seed is None else params.seed + first_chunk
    batch = sample_rows(model, tokenizer, rows[share.start:share.stop], replace(params, seed=seed),
                        batch_size=batch_size, chat_template=chat_template, engine=engine, source=source,
                        episodes=episodes)
    return share, batch




# ----------------------------------------------------------------------------- metrics (pure)

def answer_key(answer: str) -> str:
    """How maj@k groups extracted answers: the text with spaces removed (`1 / 2` and `1/2` vote together)."""
    return "".join(answer.split())


def generation_metrics(correct: list[list[bool]], answers: list[list[str | None]], ks: list[int]) -> dict:
    """pass@k, maj@k and pass@1_mean from judged samples: `correct[p][i]` and `answers[p][i]` for the i-th
    sample of prompt p (every prompt has the same n samples). Returns {"pass@k": .., "maj@k": .., ...}."""
    n = len(correct[0])
    if any(len(flags) != n for flags in correct):
        raise ValueError("every prompt needs the same number of samples")
    metrics = {}
    for k in ks:
        metrics[f"pass@{k}"] = sum(pass_at_k(n, sum(flags), k) for flags in correct) / len(correct)
    for k in ks:
        votes = [maj_at_k(prompt_answers, _winner_is_correct(prompt_answers[:k], flags), k=k, key=answer_key)
                 for prompt_answers, flags in zip(answers, correct)]
        metrics[f"maj@{k}"] = sum(votes) / len(votes)
    metrics["pass@1_mean"] = pass_at_1_mean([list(flags) for flags in correct])
    return metrics


def _winner_is_correct(answers: list[str | None], flags: list[bool]):
    """`is_correct(winner)` for maj_at_k: the correctness of the first sample that gave the winning answer."""
    def is_correct(winner: str) -> bool:
        first = next(i for i, a in enumerate(answers) if a is not None and answer_key(a) == answer_key(winner))
        return bool(flags[first])
    return is_correct


# ----------------------------------------------------------------------------- the evaluation

def evaluate(model, tokenizer, rows: list[dict], *, n: int = 8, ks: list[int] | None = None,
             temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0, min_p: float = 0.0,
             stop: list[str] = (), max_new_tokens: int = 256,
             rewards=("math",), correct_threshold: float = 1.0, extract: str | None = None,
             batch_size: int = 16, seed: int = 0, chat_template: str = "auto", engine: str = "builtin",
             keep_samples: bool = False, source: str = "data", episodes: dict | None = None) -> dict:
    """Sample `n` completions per row and report pass@k / maj@k for every k in `ks` (default 1 and n),
    pass@1_mean and each reward's mean, std and None count.

    `rows` are dicts with `prompt` and the columns the rewards need (`answer` for math). `rewards` are
    names or `{name, weight, ...}` specs, or a ready RewardSet; the first decides correctness
    (value >= correct_threshold).
    `extract` is how maj@k reads answers (default: the math reward's `extract` option, else "auto").
    Returns {"metrics": {"pass@1": ..., "maj@4": ..., "pass@1_mean": ..., "reward/math": ...},
    "rewards": {name: {mean, std, none_count}}, "per_prompt": [...], "num_prompts", "n", "ks", "sampling"}
    plus "samples" (one dict per completion) when keep_samples. With `episodes` ({make_env, max_turns,
    max_turn_tokens}) each sample is a multi-turn episode (its text after the prompt is judged), the metrics
    add the episode/ means (turns, tool calls, tool errors, tool-call rate) and each sample its `episode`.
    """
    from tether.eval.score import reward_summary, score_samples
    from tether.rewards import RewardResult, RewardSet
    from tether.rewards.math import extract_answer

    ks = sorted(set(ks or [1, n]))
    if ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"every k must be in 1..n={n}, got {ks}; sample at least max(k) completions (--n)")
    if not rows:
        raise ValueError("evaluate needs at least one row")
    if isinstance(rewards, RewardSet):  # built once by the caller, e.g. to reuse the math worker across calls
        reward_set, specs = rewards, []
    else:
        specs = [rewards] if isinstance(rewards, (str, dict)) else list(rewards)
        reward_set = RewardSet(specs)
    reward_set.check_rows(source, list(enumerate(rows)))
    extract = extract or next((s.get("extract", "auto") for s in specs if isinstance(s, dict)
                               and s.get("name") == "math"), "auto")
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, stop=list(stop),
                            max_new_tokens=max_new_tokens, seed=seed)
    # Under torchrun each rank samples whole chunks of prompts (seeded as one process seeds them) and scores them;
    # every rank gets the whole batch and its scores back: the result does not depend on the number of ranks.
    share, mine = sample_share(model, tokenizer, rows, params, batch_size=batch_size, chat_template=chat_template,
                               engine=engine, source=source, episodes=episodes)
    mine_scored = score_samples(reward_set, rows[share.start:share.stop], mine.completions, mine.prompt_index,
                                completion_lengths=[len(ids) for ids in mine.completion_ids]) if len(share) else None
    batch = concat_batches(distributed.gather_lists([mine]))
    scored = RewardResult.concat([part for part in distributed.gather_lists([mine_scored]) if part is not None])
    judge = scored.per_function[reward_set.names[0]]
    flags = [value is not None and value >= correct_threshold for value in judge]
    answers = [extract_answer(text, extract) for text in batch.completions]
    grouped_flags = [flags[p * n:(p + 1) * n] for p in range(len(rows))]
    grouped_answers = [answers[p * n:(p + 1) * n] for p in range(len(rows))]

    metrics = generation_metrics(grouped_flags, grouped_answers, ks)
    summary = reward_summary(scored)
    metrics.update({f"reward/{name}": stats["mean"] for name, stats in summary.items()})
    if isinstance(batch, EpisodeBatch):
        metrics.update(batch.metrics())
    result = {
        "num_prompts": len(rows), "n": n, "ks": ks,
        "sampling": {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
                     "seed": seed},
        "correct_by": reward_set.names[0], "correct_threshold": correct_threshold,
        "metrics": metrics,
        "rewards": summary,
        "finish_reasons": {r: batch.finish_reasons.count(r) for r in sorted(set(batch.finish_reasons))},
        "per_prompt": [{"correct": sum(f), "answers": a} for f, a in zip(grouped_flags, grouped_answers)],
    }
    if keep_samples:
        result["samples"] = [
            {"prompt_index": p, "sample_index": i % n, "completion": text, "answer": answer, "correct": flag,
             "rewards": {name: values[i] for name, values in scored.per_function.items()},
             "finish_reason": reason}
            for i, (p, text, answer, flag, reason) in enumerate(
                zip(batch.prompt_index, batch.completions, answers, flags, batch.finish_reasons))]
        if isinstance(batch, EpisodeBatch):  # turns, tool calls and observations, readable
            for i, sample in enumerate(result["samples"]):
                sample["episode"] = batch.episode(i)
    return result


def format_table(result: dict) -> str:
    """The metrics and per-reward statistics as an aligned text table."""
    lines = [f"prompts: {result['num_prompts']}   samples per prompt: {result['n']}   "
             f"correct: {result['correct_by']} >= {result['correct_threshold']:g}", "",
             f"{'metric':<14}{'value':>10}"]
    for key in [f"pass@{k}" for k in result["ks"]] + [f"maj@{k}" for k in result["ks"]] + ["pass@1_mean"]:
        lines.append(f"{key:<14}{result['metrics'][key]:>10.4f}")
    lines += ["", f"{'reward':<14}{'mean':>10}{'std':>10}{'none':>8}"]
    for name, stats in result["rewards"].items():
        lines.append(f"{name:<14}{stats['mean']:>10.4f}{stats['std']:>10.4f}{stats['none_count']:>8d}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- config, pipeline stage, CLI

@dataclass
class EvalConfig(SamplingKeys):
    """Generation evaluation: n samples per prompt → pass@k, maj@k, pass@1_mean, mean rewards."""

    model: str = "tiny"
    """Model to evaluate: `tiny`, a local Hugging Face folder, or a hub name."""
    data: str = ""
    """Prompts with the columns the rewards need: {"prompt", "answer"} for math."""
    data_split: str = "train"
    """Split to read when `data` is a `datasets` name or folder with splits."""
    output_dir: str = ""
    """Folder for eval.json (the result) and samples.jsonl (every completion); empty: print only."""
    n: int = 8
    """Samples per prompt."""
    k: list[int] = field(default_factory=list)
    """The k of pass@k and maj@k; empty means [1, n]."""
    temperature: float = 0.6  # SamplingKeys' key, evaluation's default: DeepSeek-R1 evaluates at 0.6, top_p 0.95
    top_p: float = 0.95
    max_new_tokens: int = 256
    """Most tokens per completion."""
    rewards: list[dict | str] = field(default_factory=lambda: ["math"])
    """Reward functions (names or {name, weight, ...}); the first decides correctness."""
    correct_threshold: float = 1.0
    """A sample is correct when the first reward is at least this."""
    batch_size: int = 16
    """Prompts per generate call."""
    seed: int = 0
    """Sampling seed."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: message-list prompts use the chat template, strings are used as is; always: wrap strings too."""
    engine: Literal["builtin", "vllm"] | None = None
    """Old name of rollout_engine (still read)."""
    device: str = "auto"
    """auto, cpu or cuda[:N]."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype: auto = float32 on CPU, bfloat16 on CUDA."""
    env: str = ""
    """Evaluate multi-turn episodes with this environment (calculator | python | calculator+python |
    path/to/file.py:Class, docs/tools.md): pass@k over episodes. Empty: single completions."""
    env_options: dict = field(default_factory=dict)
    """Options of the environment (format: tag | json, the python tool's timeout, ...)."""
    max_turns: int = 4
    """Most model turns per episode (with `env`); max_new_tokens bounds the whole episode."""
    max_turn_tokens: int = 0
    """Most tokens per model turn (with `env`); 0: only max_new_tokens."""

    def validate(self) -> None:
        from tether.config import ConfigError

        take_engine_alias(self, "engine")
        if self.n < 1:
            raise ConfigError(f"config key 'n': must be >= 1, got {self.n}")
        if any(k < 1 or k > self.n for k in self.k):
            raise ConfigError(f"config key 'k': every k must be in 1..n={self.n}, got {self.k}")
        if self.env:
            from tether.envs import get_env

            try:  # checks the name, the format and a user's file now, before the model loads
                get_env(self.env, **self.env_options)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"config key 'env': {err}") from None
        if self.max_turns < 1 or self.max_turn_tokens < 0:
            raise ConfigError("config keys 'max_turns' (>= 1) and 'max_turn_tokens' (>= 0, 0 = no bound): got "
                              f"{self.max_turns} and {self.max_turn_tokens}")


def evaluate_config(config: EvalConfig, keep_samples: bool = False) -> dict:
    """Load `config.model` and `config.data` and run `evaluate`."""
    from tether import models
    from tether.runtime.device import choose_device, choose_dtype

    distributed.init()  # under torchrun: the ranks share the sampling out (`evaluate`)
    device = choose_device(config.device)
    model, tokenizer = models.load(config.model, dtype=choose_dtype(config.dtype, device), device=device,
                                   seed=config.seed)
    rows = load_rows(config.data, config.data_split)
    sampling = sampling_params(config, n=config.n, max_new_tokens=config.max_new_tokens, seed=config.seed)
    result = evaluate(model, tokenizer, rows, n=sampling.n, ks=config.k or None, temperature=sampling.temperature,
                      top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p, stop=sampling.stop,
                      max_new_tokens=sampling.max_new_tokens, rewards=config.rewards,
                      correct_threshold=config.correct_threshold, batch_size=config.batch_size, seed=sampling.seed,
                      chat_template=config.chat_template, engine=config.rollout_engine, keep_samples=keep_samples,
                      source=config.data, episodes=episode_options(config))
    return {"model": config.model, "data": config.data, **result}


def episode_options(config: EvalConfig) -> dict | None:
    """generate_episodes' options for `config.env`, or None for single completions."""
    if not config.env:
        return None
    from tether.envs import get_env

    return {"make_env": get_env(config.env, **config.env_options), "max_turns": config.max_turns,
            "max_turn_tokens": config.max_turn_tokens}


def run_eval(config: EvalConfig) -> Path | None:
    """The `eval` pipeline stage: evaluate, print the table, write output_dir/eval.json and samples.jsonl."""
    result = evaluate_config(config, keep_samples=bool(config.output_dir))
    if distributed.is_main():
        print(format_table(result))
    if not config.output_dir:
        return None
    out = Path(config.output_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        samples = result.pop("samples")
        write_jsonl(out / "samples.jsonl", samples)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    distributed.barrier()
    return out / "eval.json"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write `rows` as JSON lines, atomically (a temporary file renamed when complete)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    from tether.config import load_config

    defaults = EvalConfig()
    parser = argparse.ArgumentParser(prog="tether eval generation", description=EvalConfig.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=defaults.model, help="model folder, hub name or tiny")
    parser.add_argument("--data", required=True, help="JSONL/Parquet/... rows with prompt and answer")
    parser.add_argument("--n", "--num-samples", dest="n", type=int, default=defaults.n,
                        help="samples per prompt (under torchrun write --num-samples: torchrun reads --n as its own)")
    parser.add_argument("--k", type=int, nargs="+", default=[], help="k values for pass@k / maj@k (default 1 and n)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--rewards", nargs="+", default=defaults.rewards,
                        help="reward names or file.py:function; the first decides correctness (default math)")
    parser.add_argument("--correct-threshold", type=float, default=defaults.correct_threshold)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--chat-template", choices=["auto", "always", "never"], default=defaults.chat_template)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--env", default="", help="evaluate multi-turn episodes with this environment "
                                                  "(calculator | python | file.py:Class; docs/tools.md)")
    parser.add_argument("--max-turns", type=int, default=defaults.max_turns, help="model turns per episode")
    parser.add_argument("--max-turn-tokens", type=int, default=defaults.max_turn_tokens,
                        help="tokens per model turn (0: only --max-new-tokens, which bounds the episode)")
    parser.add_argument("--rollout-engine", choices=["builtin", "vllm"], default=defaults.rollout_engine,
                        help="sampling engine, as rollout_engine in the recipes' configs")
    parser.add_argument("--output", default="", help="write the result (with every sample) to this JSON file")
    args = parse_args(parser, argv)
    config = load_config(EvalConfig, None, {
        "model": args.model, "data": args.data, "n": args.n, "k": args.k, "temperature": args.temperature,
        "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "rewards": args.rewards,
        "correct_threshold": args.correct_threshold, "batch_size": args.batch_size, "seed": args.seed,
        "chat_template": args.chat_template, "device": args.device, "rollout_engine": args.rollout_engine,
        "env": args.env, "max_turns": args.max_turns, "max_turn_tokens": args.max_turn_tokens})
    result = evaluate_config(config, keep_samples=bool(args.output))
    if not distributed.is_main():  # every rank holds the whole result; rank 0 reports it
        return 0
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0

