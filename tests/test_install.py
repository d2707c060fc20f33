"""scripts/install.sh picks the torch build from what the machine has (run as a dry run: it prints the pip commands
instead of running them): a torch already there is left alone; no torch and a visible GPU gets the default (CUDA)
build; no torch and no GPU gets the CPU build from PyTorch's CPU index, or, when that index does not answer, the
plain install from the configured index, without hanging."""

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"


@pytest.fixture
def machine(tmp_path):
    """(run, bin): `run(torch=..., gpu=..., index=...)` runs the script with a python that has torch or not and
    an nvidia-smi that lists a GPU or fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def run(*, torch: bool, gpu: bool, index: str) -> tuple[list[str], float]:
        python = bin_dir / "python"
        missing = "" if torch else 'if [ "${1:-}" = "-c" ] && [ "${2:-}" = "import torch" ]; then exit 1; fi\n'
        python.write_text(f"#!/usr/bin/env bash\n{missing}exec {sys.executable} \"$@\"\n")
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/usr/bin/env bash\n" + ('echo "GPU 0: NVIDIA H100 (UUID: GPU-0)"\n' if gpu else "exit 9\n"))
        for tool in (python, smi):
            tool.chmod(0o755)
        env = {**os.environ, "PYTHON": str(python), "TETHER_INSTALL_DRY_RUN": "1", "TETHER_TORCH_CPU_INDEX": index,
               "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        start = time.monotonic()
        result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60,
                                cwd=SCRIPT.parents[1])
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line.startswith("pip ")], time.monotonic() - start

    return run


@pytest.fixture(scope="module")
def index_url():
    """A local HTTP server standing in for a reachable wheel index."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()


def test_no_torch_no_gpu_installs_the_cpu_build_from_the_cpu_index(machine, index_url):
    commands, _ = machine(torch=False, gpu=False, index=index_url)
    assert commands == [f"pip install torch==2.13.0 --index-url {index_url}", "pip install -e .[test]"]


def test_an_unreachable_cpu_index_falls_back_to_the_configured_index_quickly(machine):
    commands, seconds = machine(torch=False, gpu=False, index="http://127.0.0.1:9/whl/cpu")  # port 9: refused
    assert commands == ["pip install torch==2.13.0", "pip install -e .[test]"]
    assert seconds < 15


def test_a_visible_gpu_gets_the_default_cuda_build(machine, index_url):
    commands, _ = machine(torch=False, gpu=True, index=index_url)
    assert commands == ["pip install torch==2.13.0", "pip install -e .[test]"]


def test_an_installed_torch_is_left_alone(machine, index_url):
    for gpu in (False, True):
        commands, _ = machine(torch=True, gpu=gpu, index=index_url)
        assert commands == ["pip install -e .[test]"]
