"""Import arrows run one way, down the layer order of DESIGN.md, and the math layer loads with torch alone.

    cli/pipeline/demo → recipes → online, supervised → eval, annotate → rewards, envs → rollout → runtime → models → data
    → losses, advantages → ops → torch

`online` (the online-RL core that grpo and ppo share) and `supervised` (the SFT loop that sft, rft and distill
share) sit just below the recipes. `config` is plain Python
(no torch) that every layer may read; it reads only `data` and the reward and environment registries. Every import counts,
including those inside functions; only `if TYPE_CHECKING:` imports (never run) are exempt.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tether"

LAYERS = [  # top to bottom; a module may import its own layer and any layer below it
    {"cli", "pipeline", "demo", "generate", "sweep", "__main__"},
    {"recipes"},
    {"online", "supervised"},
    {"eval", "annotate"},
    {"rewards", "envs"},
    {"rollout"},
    {"runtime"},
    {"models"},
    {"data"},
    {"losses", "advantages", "kl_control", "preference_game"},
    {"ops"},
]
PLAIN_PYTHON = {"config"}  # below everything that reads it, above what it reads (data, rewards' registry)
CONFIG_READS = {"config", "data", "rewards", "envs", "rollout.params"}

KNOWN_UPWARD: dict = {
    # Arrows that still run against the rule, each to be removed; the test fails on any other, and on any of these
    # once it is gone (so the list only shrinks). Empty: rft and distill run the SFT loop from `tether.supervised`.
}


def layer_of(module: str) -> int | None:
    top = module.split(".")[1] if module.count(".") else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    return None


def tether_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `tether.*` import in a file, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    package = ".".join(("tether", *path.relative_to(ROOT).with_suffix("").parts))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("tether")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - (path.name == "__init__.py"))[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "tether":  # `from tether import models` names submodules
                found += [(node.lineno, f"tether.{alias.name}") for alias in node.names]
            elif module.startswith("tether"):
                found.append((node.lineno, module))
    return found


def violations() -> set[tuple[str, str]]:
    bad = set()
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(("tether", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for line, target in tether_imports(path):
            source_top = name.split(".")[1] if "." in name else ""
            target_top = target.split(".")[1] if "." in target else ""
            if source_top == "config":
                if not any(target == f"tether.{ok}" or target.startswith(f"tether.{ok}.") for ok in CONFIG_READS):
                    bad.add((name, target))
                continue
            if target_top in PLAIN_PYTHON or target == "tether":
                continue
            if "recipes" == source_top == target_top and name != target.removesuffix(".__init__"):
                bad.add((name, target))  # a recipe never imports another recipe
                continue
            here, there = layer_of(name), layer_of(target)
            assert here is not None, f"{name}: not in the layer map of tests/test_layers.py"
            assert there is not None, f"{name}:{line} imports {target}, not in the layer map"
            if there < here:
                bad.add((name, target))
    return bad


def test_imports_run_down_the_layers():
    """Every tether module imports only its own layer and the layers below (functions' imports included);
    no recipe imports another. Known exceptions are listed by name and must disappear, not grow."""
    found = violations()
    new = sorted(found - set(KNOWN_UPWARD))
    gone = sorted(set(KNOWN_UPWARD) - found)
    assert not new, "imports running up the layers (see DESIGN.md):\n" + "\n".join(f"{a} -> {b}" for a, b in new)
    assert not gone, f"fixed: remove from KNOWN_UPWARD: {gone}"


def test_layer_checker_catches_an_upward_import_inside_a_function(tmp_path, monkeypatch):
    """The checker reads imports inside function bodies too, and relative ones."""
    fake = tmp_path / "tether"
    (fake / "ops").mkdir(parents=True)
    (fake / "ops" / "__init__.py").write_text("def f():\n    from tether.models import packed\n")
    (fake / "models").mkdir()
    (fake / "models" / "__init__.py").write_text("from ..ops import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert violations() == {("tether.ops", "tether.models")}


@pytest.mark.parametrize("module", ["tether.losses", "tether.advantages", "tether.ops", "tether.preference_game"])
def test_math_layer_loads_with_torch_alone(module):
    """`import tether.losses` (or advantages, ops) loads no tether.models/runtime/rollout and no transformers."""
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or "
            "m.startswith(('tether.models', 'tether.runtime', 'tether.rollout', 'tether.data'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
