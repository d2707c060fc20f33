"""Pipelines: references between stages, validation before any work, skip-finished / resume-interrupted."""

import json
from pathlib import Path

import pytest

from tether.config import ConfigError
from tether.pipeline import pipeline_main, plan, read_pipeline, run_pipeline
from tether.recipes import sft
from tether.runtime.checkpoint import complete_checkpoints

SMALL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1"
PAIRS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack"}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write_recipe(tmp_path, stages, defaults=None):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}:", "completion": s}) + "\n" for a, s in PAIRS.items()))
    spec = {"output_dir": str(tmp_path / "run"), "stages": stages,
            "defaults": defaults or {"progress": False, "report_to": [], "max_length": 32}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path, str(data)


def test_references_resolve_and_errors_stop_before_any_work(tmp_path):
    path, data = write_recipe(tmp_path, [
        {"name": "base", "recipe": "sft", "model": SMALL, "data": "DATA"},
        {"name": "bon", "recipe": "best-of-n", "model": "@base", "data": "DATA", "rewards": [{"name": "math"}]},
        {"name": "again", "recipe": "sft", "model": "@base.model", "data": "@bon", "run_name": "@@literal"}])
    text = path.read_text().replace("DATA", data)
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"stage 'again' \(sft\): unknown config key 'run_name'"):
        run_pipeline(*read_pipeline(path))
    assert not (tmp_path / "run").exists()  # the bad last stage stopped the pipeline before stage 1

    path.write_text(text.replace(', "run_name": "@@literal"', ""))
    output_dir, stages = read_pipeline(path, ["again.max_steps=7", "output_dir=" + str(tmp_path / "other")])
    resolved = {stage.name: values for stage, values in plan(output_dir, stages)}
    run = tmp_path / "other"
    assert resolved["bon"]["model"] == str(run / "base" / "final")
    assert resolved["again"]["data"] == str(run / "bon" / "best.jsonl")
    assert resolved["again"]["model"] == str(run / "base" / "final")
    assert resolved["again"]["max_steps"] == 7 and resolved["again"]["output_dir"] == str(run / "again")
    assert "progress" not in resolved["bon"] and resolved["base"]["progress"] is False  # defaults only where valid

    path.write_text(text.replace('"model": "@base"', '"model": "@again"'))
    with pytest.raises(ConfigError, match="does not name an earlier stage"):
        plan(*read_pipeline(path))
    path.write_text(text.replace('"model": "@base"', '"model": "@base.data"'))
    with pytest.raises(ConfigError, match="has no output 'data'"):
        plan(*read_pipeline(path))


def test_interrupted_pipeline_skips_finished_stages_and_resumes_the_running_one(tmp_path, monkeypatch, crash_after_step):
    path, data = write_recipe(tmp_path, [
        {"name": "warmup", "recipe": "sft", "model": SMALL, "data": "DATA", "max_steps": 3, "batch_size": 4},
        {"name": "polish", "recipe": "sft", "model": "@warmup", "data": "DATA", "max_steps": 4, "batch_size": 2,
         "save_steps": 2}])
    path.write_text(path.read_text().replace("DATA", data))
    calls = []
    original_train = sft.train

    def counting_train(config):
        calls.append((Path(config.output_dir).name, config.resume))
        return original_train(config)

    monkeypatch.setattr(sft, "train", counting_train)
    # the process dies right after polish's step-2 checkpoint
    crash_after_step(lambda: pipeline_main([str(path)]), 2, where=lambda run: run.dir.name == "polish")
    run = tmp_path / "run"
    assert (run / "warmup" / "DONE").exists() and not (run / "polish" / "DONE").exists()
    assert [p.name for p in complete_checkpoints(run / "polish" / "checkpoints")] == ["step-2"]
    warmup_weights = run / "warmup" / "final" / "model.safetensors"
    mtime = warmup_weights.stat().st_mtime_ns

    assert pipeline_main([str(path)]) == 0
    assert calls == [("warmup", False), ("polish", False), ("polish", True)]  # warmup ran once; polish resumed
    assert warmup_weights.stat().st_mtime_ns == mtime
    steps = [json.loads(line)["step"] for line in (run / "polish" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 after the resume
    done = json.loads((run / "polish" / "DONE").read_text())
    assert done["outputs"] == {"model": str(run / "polish" / "final")}
    assert done["config"]["model"] == str(run / "warmup" / "final")

    assert pipeline_main([str(path)]) == 0  # everything done: nothing runs
    assert len(calls) == 3
    with pytest.raises(ConfigError, match="finished earlier with a different config"):
        pipeline_main([str(path), "polish.learning_rate=0.5"])


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("pipeline_*.yaml")), ids=lambda p: p.name)
def test_example_pipelines_validate(example, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    planned = plan(*read_pipeline(example))
    assert planned and all(Path(values["output_dir"]).name == stage.name for stage, values in planned)


def test_tiny_example_pipeline_runs_end_to_end(tmp_path, monkeypatch):
    """examples/pipeline_tiny.yaml, shortened by overrides: sft → best-of-n → sft on the best samples."""
    monkeypatch.chdir(EXAMPLES.parent)
    assert pipeline_main(["examples/pipeline_tiny.yaml", f"output_dir={tmp_path}", "sft.max_steps=4", f"sft.model={SMALL}",
                          "best_of_4.data=examples/data/math_test.jsonl", "best_of_4.sampling.max_new_tokens=16",
                          "sft_on_best.max_steps=2", "sft.progress=false", "sft_on_best.progress=false"]) == 0
    best = [json.loads(line) for line in (tmp_path / "best_of_4" / "best.jsonl").read_text().splitlines()]
    assert 0 < len(best) <= 32
    state = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
    assert state["sft_on_best"]["model"] == str(tmp_path / "sft_on_best" / "final")
    assert (tmp_path / "sft_on_best" / "final" / "config.json").exists()


@pytest.mark.parametrize("name", ["best_of_n_tiny", "rft_tiny", "distill_tiny"])
def test_example_recipe_configs_load(name):
    from tether.cli import load_recipe
    from tether.config import load_config

    config_cls, _ = load_recipe(name.rsplit("_", 1)[0].replace("_", "-"))
    config = load_config(config_cls, EXAMPLES / f"{name}.yaml")
    assert Path(config.data).name.startswith("math_")
