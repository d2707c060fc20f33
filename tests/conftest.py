"""Shared test set-up: one torch thread per process keeps the suite steady on a 2-core machine."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No network here or in CI: fail fast instead of retrying hub requests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def crash_after_step(monkeypatch):
    """`crash_after_step(train, step, where=None)` calls `train()` as a process that dies right after
    `Run.end_step(step)` (that step's checkpoint written) of the run for which `where(run)` holds (any run when
    None), checks that it died there, and puts `Run.end_step` back, so that the test can resume."""
    from tether.runtime.run import Run

    class Killed(Exception):
        pass

    def crash(train, step: int, where=None) -> None:
        original = Run.end_step

        def end_step_then_die(self, at, *args, **kwargs):
            row = original(self, at, *args, **kwargs)
            if at == step and (where is None or where(self)):
                raise Killed
            return row

        monkeypatch.setattr(Run, "end_step", end_step_then_die)
        try:
            with pytest.raises(Killed):
                train()
        finally:
            monkeypatch.setattr(Run, "end_step", original)

    return crash
