"""Deterministic stand-ins for real weights, for tests and benchmarks that must not download anything."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

__all__ = ["synthetic_weights"]


def synthetic_weights(net: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic stand-in for real weights (tests and the equivalence bench; the real file is 95 MB).

    Each tensor is drawn from a numpy PCG64 stream seeded by (seed, its key), so the same state_dict
    comes out on any machine and torch version: He-uniform convolutions (activations stay O(1) through
    the 94 layers), batch-norm scales near 1, small shifts and means, running variances in [0.5, 1.5].
    """
    out = {}
    for key, t in net.state_dict().items():
        key_seed = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
        u = np.random.Generator(np.random.PCG64(key_seed)).random(t.numel())  # float64 in [0, 1)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(t)
            continue
        if key.endswith("running_var"):
            v = 0.5 + u
        elif key.endswith("bn.weight"):
            v = 0.8 + 0.4 * u
        elif key.endswith(("running_mean", "bias")):
            v = 0.2 * (u - 0.5)
        else:  # convolution and linear weights: He-uniform
            fan_in = t[0].numel()
            v = (2 * u - 1) * np.sqrt(6.0 / fan_in)
        out[key] = torch.from_numpy(v.astype(np.float32)).reshape(t.shape)
    return out
