"""The exponential moving average of a model's weights, kept as a model of its own.

Sampling from the EMA weights rather than the last ones is what made DDPM's samples good (Ho et al. 2020
used decay 0.9999). The average lives in one place, the parameters of ``EMA.model``, so the model that
previews, checkpoints and exports sample from is the average itself, not a copy of it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .choices import EMA_SIGMA_REL_MAX

__all__ = ["EMA", "power_gamma"]


def power_gamma(sigma_rel: float) -> float:
    """The exponent gamma of EDM2's power-function EMA whose averaging profile has relative width ``sigma_rel``.

    Karras et al. 2024 (EDM2), eq. 3: sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)); the largest real
    root of that cubic (sigma_rel 0.05 -> gamma 16.97, 0.10 -> 6.94)."""
    if not 0 < sigma_rel <= EMA_SIGMA_REL_MAX:  # wider needs gamma < 0 (see resdiff.choices)
        raise ValueError(f"sigma_rel {sigma_rel} must be in (0, {EMA_SIGMA_REL_MAX}]")
    s2 = sigma_rel * sigma_rel
    # s2 (g + 2)^2 (g + 3) - (g + 1) = s2 g^3 + 7 s2 g^2 + (16 s2 - 1) g + (12 s2 - 1)
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


class EMA:
    """``model``'s weights averaged over the optimizer steps: after each, ``update(model)``.

    The decay is ``decay``, or with ``warmup`` ``min(decay, (1 + n) / (10 + n))`` after n updates, so the
    average does not stay stuck near the random initial weights in a short run. The first update copies.
    (The same schedule as diffusers' ``EMAModel(decay, min_decay=0)``, whose counter this ``updates`` is.)

    With ``sigma_rel`` the average is EDM2's power-function EMA instead (Karras et al. 2024, eq. 2): the t-th
    update decays by ``(1 - 1/t)^(gamma + 1)``, which weights step s by s^gamma, so the average always spans the
    same fraction of the run, however long it grows; ``decay`` and ``warmup`` are then unused.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, sigma_rel: float | None = None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.gamma = None if sigma_rel is None else power_gamma(sigma_rel)

    def current_decay(self) -> float:
        """The decay the next ``update`` applies."""
        n = self.updates  # how many updates came before the next one
        if n == 0:
            return 0.0
        if self.gamma is not None:
            return (1 - 1 / (n + 1)) ** (self.gamma + 1)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """average <- decay * average + (1 - decay) * weights, for every parameter (one fused foreach call)."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        averaged = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], weight)

    def to(self, device: torch.device | str) -> "EMA":
        self.model.to(device)
        return self

    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Resume: the averaged weights and how many updates made them."""
        self.model.load_state_dict(weights)
        self.updates = updates
