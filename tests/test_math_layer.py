"""The math layer loads without the rest of tether: `losses`, `advantages`, `kl_control` and `ops` import
only torch and each other (DESIGN.md's arrow order), so a fresh interpreter that imports them holds no
tether.models, tether.runtime or transformers."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH_LAYER = ("tether.losses", "tether.advantages", "tether.kl_control", "tether.ops")
HEAVY = ("tether.models", "tether.runtime", "tether.recipes", "tether.rollout", "tether.data", "transformers")


def loaded_after_import(modules, prefixes) -> list[str]:
    """The modules named by `prefixes` that a fresh interpreter holds after importing `modules`."""
    code = (f"import sys; import {', '.join(modules)}; "
            f"print(' '.join(sorted(m for m in sys.modules if m.startswith({tuple(prefixes)!r}))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            check=True)
    return result.stdout.split()


def test_math_layer_imports_only_torch():
    # Importing all four at once covers each alone: a module's imports are a subset of the union's.
    assert loaded_after_import(MATH_LAYER, HEAVY) == []


def test_the_check_sees_what_is_imported():
    """The check reports what an import does load (so its empty answer above means something): losses loads ops."""
    assert loaded_after_import(["tether.losses"], ["tether.ops", "tether.advantages"]) == ["tether.ops"]
