"""The exponential moving average of a model's weights, kept as a model of its own.

Sampling from the EMA weights rather than the last ones is what made DDPM's samples good (Ho et al. 2020
used decay 0.9999). The average lives in one place, the parameters of ``EMA.model``, so the model that
previews, checkpoints and exports sample from is the average itself, not a copy of it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``model``'s weights averaged over the optimizer steps: after each, ``update(model)``.

    The decay is ``decay``, or with ``warmup`` ``min(decay, (1 + n) / (10 + n))`` after n updates, so the
    average does not stay stuck near the random initial weights in a short run. The first update copies.
    (The same schedule as diffusers' ``EMAModel(decay, min_decay=0)``, whose counter this ``updates`` is.)
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        """The decay the next ``update`` applies."""
        n = self.updates  # how many updates came before the next one
        if n == 0:
            return 0.0
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
