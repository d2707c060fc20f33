"""A fork server for one library: import it once, then run each job in a fresh forked child.

    python bench/worker.py tether|trl      # reads one JSON job per line on stdin, writes one JSON result per line

Why a fork server: importing torch + transformers + a training library costs ~10 s on this machine, more than
most measurements. The server pays it once; each job runs in a child forked from the server before any tensor
work, so the child starts from exactly "libraries imported, nothing else" (what a fresh process looks like
right after its imports), and the child's peak RSS, read by the parent with `os.wait4`, is a clean per-workload
peak. The server imports only its own library: the tether worker never imports TRL and vice versa.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def preload(lib: str) -> None:
    """Import what the jobs of `lib` use, without running any tensor op (the children are forked after)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    if lib == "tether":
        import tether.recipes.sft  # noqa: F401
        import tether.rollout  # noqa: F401

        for name in ("tether.recipes.dpo", "tether.recipes.grpo"):
            try:
                __import__(name)
            except ImportError:
                pass
    elif lib == "trl":
        import datasets  # noqa: F401
        from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: F401
    import workloads  # noqa: F401


def run_child(job: dict, write_fd: int) -> None:
    log_path = job.get("log")
    if log_path:  # keep the libraries' prints out of the result protocol
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        import workloads

        result = workloads.run(job)
    except BaseException:  # noqa: BLE001 - the error text goes back to the orchestrator
        result = {"error": traceback.format_exc()}
    sys.stdout.flush()
    sys.stderr.flush()
    with os.fdopen(write_fd, "w") as pipe:
        pipe.write(json.dumps(result))


def serve(lib: str) -> None:
    preload(lib)
    print(json.dumps({"ready": lib}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            run_child(job, write_fd)
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            text = pipe.read()
        _, status, usage = os.wait4(pid, 0)
        try:
            result = json.loads(text) if text else {"error": f"child exited with status {status} and no result"}
        except json.JSONDecodeError:
            result = {"error": f"unreadable result: {text[:500]}"}
        result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
