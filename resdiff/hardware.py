"""What the machine can do fast: warnings for precision choices that would run emulated."""

from __future__ import annotations

import torch

__all__ = ["bf16_is_native", "precision_warning"]


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
