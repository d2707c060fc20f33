"""Peak memory of this process, the number the seeds' PPO-vs-GRPO comparison asks for (exercises 20, 22).

On CUDA: `torch.cuda.max_memory_allocated` (the tensors' high-water mark on the device). On CPU: the
process's peak resident set size: on Linux VmHWM of /proc/self/status (the peak of this program's own
address space), elsewhere ru_maxrss from `getrusage` (KiB on Linux, bytes on macOS; on Linux it would also
count the parent's memory at the fork that started this process, which survives exec). It counts everything
the process ever held: Python, the imported libraries (~0.3–0.5 GB for torch and transformers) and the
tensors. Both are high-water marks since the process started (CUDA: since the last
`torch.cuda.reset_peak_memory_stats`), so comparing two runs' peaks means running each in its own process
(`tether sweep` does).
"""

from __future__ import annotations

import resource
import sys

import torch

MB = 2 ** 20


def peak_rss_mb() -> float:
    """The process's peak resident set size in MiB (module docstring)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def peak_memory(device: torch.device | str) -> dict[str, float]:
    """{"peak_memory_mb": ...} for `device`: CUDA's max_memory_allocated there, else the peak RSS; on CUDA
    also the host's peak RSS as "peak_rss_mb"."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / MB, "peak_rss_mb": peak_rss_mb()}
    return {"peak_memory_mb": peak_rss_mb()}
