"""The fused decode attention (`decode_attention.c`), compiled on first use and called through ctypes.

The C file needs no torch headers and no build step at install time: the first call compiles it with the
system C compiler (`$CC`, else cc / gcc / clang) into tether's cache folder (`$TETHER_CACHE`, else
~/.cache/tether; the temp folder when that is not writable), under a name made from a hash of the source, the
compiler, its flags and the CPU model, in well under a second. Later processes load that file. Without a compiler, or with TETHER_NATIVE=0, `library()` is None and
the sampler runs the same attention in PyTorch ops (`LlamaDecoder._attend_*`); the results agree to float
rounding (tests/test_llama_decode.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = [["-O3", "-march=native"], ["-O3"]]  # the first that compiles wins (some compilers lack -march=native)
KEY_BLOCK = 16  # the kernel reads keys 16 at a time: key rows are padded to a multiple of this

_library: ctypes.CDLL | None = None
_tried = False


def _cache_dirs() -> list[Path]:
    """Where the built library goes: tether's cache folder, else (unwritable) the temp folder."""
    root = os.environ.get("TETHER_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                          or os.path.expanduser("~/.cache"), "tether")
    return [Path(root) / "native", Path(tempfile.gettempdir()) / "tether-native"]


def _cpu_id() -> str:
    """The CPU's model and instruction-set flags: a -march=native build is only reused on the same kind of CPU
    (a cache folder shared between machines must not hand one an instruction it lacks)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(line for line in lines if line.startswith(("model name", "flags", "Features")))[:20000]
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, flags: list[str], target: Path) -> bool:
    """Compile SOURCE into `target` (atomically: a process that finds the file finds it whole)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            logger.debug("%s %s failed: %s", compiler, " ".join(flags), result.stderr[-2000:])
            return False
        os.replace(built, target)
    return True


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None when it cannot be (no compiler) or TETHER_NATIVE=0."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("TETHER_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: decode attention runs in PyTorch ops (slower on small models)")
        return None
    source = SOURCE.read_bytes()
    for flags in FLAGS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         platform.machine().encode(), _cpu_id().encode()])).hexdigest()[:16]
        for folder in _cache_dirs():
            target = folder / f"decode_attention-{key}.so"
            try:
                if target.exists() or _build(compiler, flags, target):
                    _library = _load(target)
                    return _library
                break  # the compiler refused these flags: try the next ones
            except (OSError, subprocess.SubprocessError) as error:  # unwritable folder, broken file, timeout
                logger.debug("native decode attention with %s in %s: %s", flags, folder, error)
    logger.warning("could not compile %s with %s: decode attention runs in PyTorch ops", SOURCE.name, compiler)
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

    q: (B, (heads + 2 kv_heads) * head_dim) rows b = u * n + j, the fused [q | k | v] heads. prompt: (2, U, kv_heads, T_p * d), keys
    transposed (d, T_p) then values (T_p, d) per prompt and kv head, T_p a multiple of 16; the first
    `prompt_length` positions are read, with `bias` (U, >= prompt_length) added (None: no bias). own: (2, U,
    kv_heads, n, T_c * d) the same per sample, `own_length` positions (None: no own part, n = B / U).
    scratch: at least n * G * (prompt_length + own_length) floats. Returns (B, heads * head_dim).
    """
    d, B, U = head_dim, q.shape[0], prompt.shape[1]
    n = B // U
    for name, tensor in (("q", q), ("prompt", prompt), ("own", own), ("bias", bias), ("scratch", scratch)):
        if tensor is not None:
            assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.stride(-1) == 1, name
    assert scratch.numel() >= n * (heads // kv_heads) * (prompt_length + own_length)
    out = q.new_empty(B, heads * d)
    if own is None:
        own, own_length = prompt, 0  # not read
    p_ld, c_ld = prompt.shape[-1] // d, own.shape[-1] // d
    assert p_ld % KEY_BLOCK == 0 and c_ld % KEY_BLOCK == 0
    c_j = own.stride(3) if own.dim() == 5 else 0
    status = library().decode_attention(
        q.data_ptr(), q.stride(0), prompt[0].data_ptr(), prompt[1].data_ptr(), prompt.stride(1), prompt.stride(2),
        p_ld, prompt_length, bias.data_ptr() if bias is not None else None, bias.stride(0) if bias is not None else 0,
        own[0].data_ptr(), own[1].data_ptr(), own.stride(1), own.stride(2), c_j, c_ld, own_length,
        out.data_ptr(), U, n, kv_heads, heads // kv_heads, d, scratch.data_ptr())
    assert status == 0, f"decode_attention refused head_dim {d}"
    return out
