"""The fused decode attention (`decode_attention.c`), compiled on first use and called through ctypes.

The C file needs no torch headers and no build step at install time: the first call compiles it with the
system C compiler (`$CC`, else cc / gcc / clang) into tether's cache folder (`$TETHER_CACHE`, else
~/.cache/tether), under a name made from a hash of the source, the compiler, its flags and the CPU model, in
well under a second; later processes load that file. Without a writable cache folder it builds into a private
temporary folder, for this process only. Without a compiler, a build that fails, or with TETHER_NATIVE=0,
`library()` is None and the sampler runs the same attention in PyTorch ops (`LlamaDecoder._attend_*`); the
results agree to float rounding (tests/test_llama_decode.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
# The first that compiles wins (some compilers lack -march=native); -fopenmp-simd only honours the `omp simd`
# loop hints (no OpenMP runtime is linked).
FLAGS = [["-O3", "-march=native", "-fopenmp-simd"], ["-O3"]]
COMPILE_TIMEOUT_S = 300
KEY_BLOCK = 16  # the kernel reads keys 16 at a time: key rows are padded to a multiple of this

_library: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def _cache_dir() -> Path | None:
    """tether's cache folder for the built library; None when there is no usable home (containers without one)."""
    if os.environ.get("TETHER_CACHE"):
        return Path(os.environ["TETHER_CACHE"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return None if base.startswith("~") else Path(base) / "tether" / "native"


def _cpu_id() -> str:
    """The CPU's model and instruction-set flags: a -march=native build is only reused on the same kind of CPU
    (a cache folder shared between machines must not hand one an instruction it lacks)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(line for line in lines if line.startswith(("model name", "flags", "Features")))[:20000]
    except OSError:
        return platform.processor() + platform.platform()


def _compiler() -> list[str] | None:
    """The compiler command ($CC may carry a launcher, e.g. "ccache gcc")."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _build(compiler: list[str], flags: list[str], target: Path) -> bool:
    """Compile SOURCE into `target` (atomically: a process that finds the file finds it whole). False when the
    compiler refuses; raises on a timeout or an unwritable folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([*compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(built)],
                                capture_output=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            logger.debug("%s %s failed: %s", compiler, flags, result.stderr[-2000:].decode(errors="replace"))
            return False
        os.replace(built, target)
    return True


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None when it cannot be (no compiler, a failed build) or
    TETHER_NATIVE=0. Built in tether's cache folder and reused by later processes; without a usable cache folder,
    in a private temporary folder for this process only (a shared temp folder could be planted with a library)."""
    global _library, _tried
    with _lock:
        if not _tried:
            _library = _find_or_build()
            _tried = True
    return _library


def _find_or_build() -> ctypes.CDLL | None:
    if os.environ.get("TETHER_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: decode attention runs in PyTorch ops (slower on small models)")
        return None
    folder = _cache_dir()
    try:
        identity = [SOURCE.read_bytes(), " ".join(compiler).encode(), platform.machine().encode(),
                    _cpu_id().encode()]
        for flags in FLAGS:
            key = hashlib.sha256(b"\0".join([*identity, " ".join(flags).encode()])).hexdigest()[:16]
            name = f"decode_attention-{key}.so"
            if folder is not None:
                try:
                    if (folder / name).exists() or _build(compiler, flags, folder / name):
                        return _load(folder / name)
                    continue  # the compiler refused these flags: try the next ones
                except OSError as error:  # an unwritable cache folder: build for this process only
                    logger.debug("cache folder %s: %s", folder, error)
            private = Path(tempfile.mkdtemp(prefix="tether-native-"))
            if _build(compiler, flags, private / name):
                return _load(private / name)
    except Exception as error:  # a timeout, a missing source file, a broken library: run in PyTorch
        logger.warning("native decode attention unavailable (%s): it runs in PyTorch ops", error)
        return None
    logger.warning("could not compile %s with %s: decode attention runs in PyTorch ops", SOURCE.name,
                   " ".join(compiler))
    return None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.decode_attention.argtypes = [P, L, P, P, L, L, L, I, P, L, P, P, L, L, L, L, I, P, I, I, I, I, I, P]
    lib.decode_attention.restype = I
    return lib


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head size (a multiple of 8 up to 256)."""
    return head_dim % 8 == 0 and head_dim <= 256


def padded(length: int) -> int:
    """`length` rounded up to the kernel's key block."""
    return -(-length // KEY_BLOCK) * KEY_BLOCK


def decode_attention(q: Tensor, prompt: Tensor, prompt_length: int, bias: Tensor | None, own: Tensor | None,
                     own_length: int, heads: int, kv_heads: int, head_dim: int, scratch: Tensor) -> Tensor:
    """softmax(q K^T + bias) V for one new token per row, over a shared and an own part of the cache, after
    writing the token's key and value to the cache (at own position own_length - 1; without an own part, at
    prompt position prompt_length - 1).

    q: (B, heads + 2 kv_heads, head_dim) rows b = u * n + j, the fused [q | k | v] heads. prompt: (2, U,
    kv_heads, T_p * d), keys transposed (d, T_p) then values (T_p, d) per prompt and kv head, T_p a multiple of
    16; the first `prompt_length` positions are read, with `bias` (U, >= prompt_length) added (None: no bias).
    own: (2, U, kv_heads, n, T_c * d) the same per sample, `own_length` positions (None: no own part, n = 1).
    scratch: at least n * G * (prompt_length + own_length) floats. Returns (B, heads * head_dim).
    """
    d, B, U, G = head_dim, q.shape[0], prompt.shape[1], heads // kv_heads
    n = B // U
    for name, tensor in (("q", q), ("prompt", prompt), ("own", own), ("bias", bias), ("scratch", scratch)):
        if tensor is not None and (tensor.dtype != torch.float32 or tensor.device.type != "cpu"
                                   or tensor.stride(-1) != 1):
            raise ValueError(f"decode_attention: {name} must be a CPU float32 tensor with a contiguous last dim")
    p_ld = prompt.shape[-1] // d
    c_ld = own.shape[-1] // d if own is not None else KEY_BLOCK
    # Checked on every call (the C code trusts all of it); the messages are only built for a failure.
    if not (q.dim() == 3 and q.shape[1] == heads + 2 * kv_heads and q.shape[2] == d and q.stride(1) == d):
        raise ValueError(f"decode_attention: q must be (B, heads + 2 kv_heads, d) with contiguous heads, "
                         f"got {tuple(q.shape)}")
    if B != U * n or heads % kv_heads:
        raise ValueError(f"decode_attention: {B} rows are not a whole number of samples for {U} prompts")
    if own is None and n != 1:
        raise ValueError("decode_attention: without an own part every prompt has one row")
    if prompt.shape[:3] != (2, U, kv_heads) or (own is not None and own.shape[:4] != (2, U, kv_heads, n)):
        raise ValueError("decode_attention: prompt or own part of the wrong shape")
    if p_ld % KEY_BLOCK or c_ld % KEY_BLOCK:
        raise ValueError("decode_attention: cache lengths must be padded to 16 positions")
    if not (1 <= prompt_length <= p_ld and 0 <= own_length <= c_ld and (own is None or own_length >= 1)):
        raise ValueError(f"decode_attention: positions out of the cache: prompt {prompt_length} of {p_ld}, "
                         f"own {own_length} of {c_ld}")
    if bias is not None and (bias.shape[0] != U or bias.shape[-1] < prompt_length):
        raise ValueError("decode_attention: bias of the wrong shape")
    if scratch.numel() < n * G * (prompt_length + own_length):
        raise ValueError("decode_attention: scratch too small")
    out = q.new_empty(B, heads * d)
    if own is None:
        own, own_length = prompt, 0  # not read
    c_j = own.stride(3) if own.dim() == 5 else 0
    status = library().decode_attention(
        q.data_ptr(), q.stride(0), prompt[0].data_ptr(), prompt[1].data_ptr(), prompt.stride(1), prompt.stride(2),
        p_ld, prompt_length, bias.data_ptr() if bias is not None else None, bias.stride(0) if bias is not None else 0,
        own[0].data_ptr(), own[1].data_ptr(), own.stride(1), own.stride(2), c_j, c_ld, own_length,
        out.data_ptr(), U, n, kv_heads, G, d, scratch.data_ptr())
    if status != 0:
        raise ValueError(f"decode_attention: head size {d} is not supported (a multiple of 8 up to 256)")
    return out
