"""Proposal: glibc malloc keeps freed memory in the process (no mmap for large blocks, no trimming of the heap),
so the fresh activations of every forward reuse pages already mapped instead of faulting in new ones."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def apply() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
