"""The machine: which devices exist, what they run fast, and the precision choices that would run emulated."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from .choices import PRECISIONS
from .errors import UsageError

__all__ = ["MIXED_PRECISIONS", "bf16_is_native", "precision_warning", "default_device", "check_device", "reuse_freed_memory"]

# The autocast precisions a user can choose (--mixed-precision, train.mixed_precision; named in resdiff.choices):
# name -> torch dtype (None: no autocast).
MIXED_PRECISIONS = {name: getattr(torch, dtype) if dtype else None for name, dtype in PRECISIONS.items()}


def bf16_is_native(device: torch.device | str) -> bool:
    """Whether bf16 math runs in hardware: CUDA (Ampere and newer) or CPUs with AVX512-BF16 / AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def precision_warning(device: torch.device | str, mixed_precision: str) -> str | None:
    """A one-line warning when ``mixed_precision`` would be emulated on ``device`` (and so much slower)."""
    if mixed_precision == "bf16" and not bf16_is_native(device):
        capability = torch.backends.cpu.get_cpu_capability() if torch.device(device).type == "cpu" else str(device)
        return (f"warning: bf16 has no hardware support on this {torch.device(device).type} ({capability}); it runs emulated, "
                f"often many times slower than fp32: consider --mixed-precision no")
    if mixed_precision == "fp16" and torch.device(device).type == "cpu":
        return "warning: fp16 autocast on a CPU is emulated and slow; use bf16 on CPUs with AVX512-BF16/AMX, else no"
    return None


def default_device() -> torch.device:
    """This process's GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device (None stays None), or a UsageError when this machine has no such device."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} was asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free heap top (bytes) kept rather than returned
_reusing = False


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep the memory torch frees for reuse, instead of handing it back to the kernel.

    A CPU training step frees and re-allocates hundreds of MB of activations. By default glibc hands much
    of that back to the kernel (blocks over its adaptive mmap threshold are unmapped on free, and the heap
    is trimmed whenever its free top passes twice that threshold), so every step page-faults it in again,
    zeroed by the kernel. Here no block is mmap'd on its own (all come from the heap, where freed blocks
    are reused) and the heap is trimmed only when over 2 GB at its top are free: the page faults and the
    kernel time they cost go, and the process keeps its peak memory instead of returning it between steps
    (bench/allocator.py measures both; figures in docs/benchmarks.md). GPU runs are unaffected (CUDA
    has its own caching allocator).

    Process-wide and idempotent; returns whether it applied: False off glibc (e.g. macOS or musl) and where
    ``RESDIFF_KEEP_FREED_MEMORY=0`` is set (for a process that must give memory back between steps).
    """
    global _reusing
    if _reusing:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("RESDIFF_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt ignores these parameters
    except (OSError, AttributeError):
        return False
    # No mmap'd blocks: every block comes from the heap, where a freed one is reused; blocks too large for a
    # thread's heap still fall back to mmap. And the heap is trimmed only when over 2 GB at its top are free.
    _reusing = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _reusing
