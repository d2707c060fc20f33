"""Load a user's reward function named `path/to/file.py:function` or `package.module:function`.

The file is imported only when named, once per resolved path, as a uniquely named module (so its
functions pickle and two files called `rewards.py` do not collide). While it loads, its folder is
on `sys.path` so it can import its neighbours.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable


@functools.lru_cache(maxsize=None)
def _import_file(path: str):
    """Import a .py file once per resolved path, as a uniquely named module (so pickling works)."""
    file = Path(path)
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    module_name = f"tether_user_reward_{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import reward file '{path}': not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(file.parent))  # let the file import its neighbours while it loads
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ValueError(f"importing reward file '{path}' failed: {type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(str(file.parent))
    return module


def load_user_reward(reference: str) -> Callable:
    """Load the function named by `"path/to/file.py:function"` or `"package.module:function"`.

    A relative path is taken from the current directory. The file is imported only here, when named.
    """
    location, _, function_name = reference.rpartition(":")
    if location.endswith(".py") or "/" in location or "\\" in location:
        file = Path(location).expanduser()
        if not file.is_file():
            raise ValueError(f"reward file '{location}' not found (looked for {file.resolve()}).")
        module = _import_file(str(file.resolve()))
        where = f"reward file '{location}'"
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ValueError(f"cannot import module '{location}' for reward '{reference}': {error}") from error
        where = f"module '{location}'"
    function = getattr(module, function_name, None)
    if function is None:
        defined = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        close = difflib.get_close_matches(function_name, defined, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"{where} has no function '{function_name}'.{hint} "
            f"Functions defined there: {', '.join(defined) or '(none)'}."
        )
    if not callable(function):
        raise ValueError(f"'{function_name}' in {where} is a {type(function).__name__}, not a function.")
    return function
