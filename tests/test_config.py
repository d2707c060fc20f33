"""Config: YAML + dotted overrides, strict keys with suggestions, typed values, --help text."""

import pytest

from tether.cli import main
from tether.config import ConfigError, config_help, load_config, parse_override
from tether.recipes.sft import SFTConfig


def test_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nlearning_rate: 3.0e-4\nlora:\n  r: 4\n")
    config = load_config(SFTConfig, path, ["learning_rate=1e-3", "lora.alpha=8", "batch_size=4"])
    assert config.learning_rate == 1e-3
    assert config.lora.r == 4 and config.lora.alpha == 8.0
    assert config.batch_size == 4 and isinstance(config.batch_size, int)


def test_unknown_key_names_it_and_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'\. Did you mean 'learning_rate'\?"):
        load_config(SFTConfig, None, ["learning_rat=0.1"])


def test_unknown_nested_key_names_the_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rank'\. Did you mean 'lora\.r'\?"):
        load_config(SFTConfig, None, ["lora.rank=8"])


@pytest.mark.parametrize("override, message", [
    ("batch_size=eight", "config key 'batch_size': expected int, got 'eight'"),
    ("learning_rate=fast", "config key 'learning_rate': expected float, got 'fast'"),
    ("resume=maybe", "config key 'resume': expected bool, got 'maybe'"),
    ("lr_scheduler=step", "config key 'lr_scheduler': expected one of 'cosine' | 'linear' | 'constant', got 'step'"),
    ("overlong=cut", "config key 'overlong': expected one of 'error' | 'truncate' | 'drop', got 'cut'"),
])
def test_bad_values_name_key_and_expectation(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, None, [override])
    assert str(info.value) == message


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="micro_batch_size': 3 must divide batch_size=8"):
        load_config(SFTConfig, None, ["batch_size=8", "micro_batch_size=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys, got list"):
        load_config(SFTConfig, bad)


def test_override_parsing():
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)
    assert parse_override("x=[1, 2]") == ("x", [1, 2])
    assert parse_override("flag=true") == ("flag", True)
    assert parse_override("data=train.jsonl") == ("data", "train.jsonl")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("learning_rate")


def test_help_lists_every_option_with_default_and_doc(capsys):
    text = config_help(SFTConfig)
    for name in ("learning_rate", "lora.r", "lora.target_modules", "train_on", "overlong", "resume", "keep_last"):
        assert f"  {name} (" in text
    assert "default 0.0001" in text  # learning_rate
    assert "Peak learning rate of AdamW." in text
    assert main(["sft", "--help"]) == 0
    assert "Tokens that carry the loss" in capsys.readouterr().out


def test_cli_reports_config_errors_before_work(capsys, tmp_path):
    code = main(["sft", f"output_dir={tmp_path}/run", "lerning_rate=1"])
    assert code == 2
    assert "Did you mean 'learning_rate'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # stopped before any work


def test_partial_nested_override_keeps_the_fields_own_defaults():
    from dataclasses import dataclass, field

    from tether.models import LoraConfig

    @dataclass
    class WithLora(SFTConfig):
        lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=32.0))
        """LoRA on by default here."""

    config = load_config(WithLora, None, ["lora.alpha=4"])
    assert (config.lora.r, config.lora.alpha) == (8, 4.0)


CHILD = """
import sys, time
start = time.perf_counter()
from tether.cli import main
code = main(sys.argv[1:])
print("torch loaded:", "torch" in sys.modules, "transformers loaded:", "transformers" in sys.modules,
      "seconds:", round(time.perf_counter() - start, 3))
sys.exit(code)
"""


@pytest.mark.parametrize("command, overrides, message", [
    ("grpo", ["lerning_rate=1e-4"], "unknown config key 'lerning_rate'. Did you mean 'learning_rate'?"),
    ("grpo", ["kl_coef=-1"], "config key 'kl_coef': must be >= 0"),
    ("grpo", ["data=no_such_prompts.jsonl", "rewards=[{name: math}]"], "config key 'data': file no_such_prompts.jsonl does not exist"),
    ("grpo", ["rewards=[{name: maht}]"], "unknown reward 'maht'. Did you mean 'math'?"),
    ("ppo", ["rewards=[{name: math, weight: heavy}]"], "config key 'rewards[0].weight': expected a finite number"),
    ("sft", ["eval_data=missing.jsonl"], "config key 'eval_data': file missing.jsonl does not exist"),
    ("dpo", ["beta=-1"], "config key 'beta'"),
])
def test_config_errors_stop_the_cli_before_torch_is_imported(tmp_path, command, overrides, message):
    """Keys, values, data files, reward names and weights are checked before torch/transformers are imported:
    the child process exits 2 with one line naming the key, and `torch` is not in its sys.modules. The whole
    run, interpreter start-up aside, takes under 2 s."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", CHILD, command, *overrides], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "torch loaded: False transformers loaded: False" in result.stdout
    assert float(result.stdout.rsplit("seconds:", 1)[1]) < 2.0


def test_sampling_keys_are_declared_once_and_build_the_same_params():
    """grpo/ppo (flat keys), best-of-n/rft/distill (`sampling:`) and eval hold the sampling keys through the one
    SamplingKeys mixin; `sampling_params` builds the engine's SamplingParams from any of them. `sampling.engine`,
    the old name of `sampling.rollout_engine`, still loads."""
    from dataclasses import fields

    from tether.config.best_of_n import BestOfNConfig
    from tether.config.grpo import GRPOConfig
    from tether.config.ppo import PPOConfig
    from tether.eval.generation import EvalConfig
    from tether.rollout.params import SamplingConfig, SamplingKeys, SamplingParams, sampling_params

    keys = [f.name for f in fields(SamplingKeys)]
    assert keys == ["temperature", "top_p", "top_k", "min_p", "stop", "rollout_engine"]
    for cls in (GRPOConfig, PPOConfig, SamplingConfig, EvalConfig):
        assert issubclass(cls, SamplingKeys) and set(keys) <= {f.name for f in fields(cls)}
    overrides = ["temperature=0.7", "top_p=0.9", "top_k=5", "min_p=0.1", "stop=[END]"]
    grpo = load_config(GRPOConfig, None, ["data=x.jsonl", "rewards=[{name: length}]", *overrides])
    best = load_config(BestOfNConfig, None, ["rewards=[{name: length}]", "sampling.n=3", "sampling.max_new_tokens=9",
                                             *("sampling." + o for o in overrides)])
    expected = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, stop=["END"], n=3, max_new_tokens=9,
                              seed=4)
    assert sampling_params(grpo, n=3, max_new_tokens=9, seed=4) == expected
    assert best.sampling.params(seed=4) == expected
    assert sampling_params(grpo, n=3, max_new_tokens=9, seed=4, temperature=0.0).temperature == 0.0
    old = load_config(BestOfNConfig, None, ["rewards=[{name: length}]", "sampling.engine=vllm"])
    assert old.sampling.rollout_engine == "vllm" and old.sampling.engine is None
    assert load_config(EvalConfig, None, ["data=x.jsonl", "engine=vllm"]).rollout_engine == "vllm"
    with pytest.raises(ConfigError, match="'sampling.engine': engine is the old name of rollout_engine"):
        load_config(BestOfNConfig, None, ["rewards=[{name: length}]", "sampling.engine=builtin",
                                          "sampling.rollout_engine=vllm"])
