"""The machine: which devices exist, what they run fast, and the precision choices that would run emulated."""

from __future__ import annotations

import torch

from .errors import UsageError

__all__ = ["MIXED_PRECISIONS", "bf16_is_native", "precision_warning", "default_device", "check_device"]

# The autocast precisions a user can choose (--mixed-precision, train.mixed_precision): name -> dtype.
MIXED_PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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
