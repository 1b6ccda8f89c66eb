"""Preview grids during training: a grid of EMA samples every few steps, RUN/samples/step-NNNNNNN.png.

The trainer calls a ``Previews`` at its interval with the EMA model; every process draws its share of the images
(``resdiff.processes.share``), the main process writes the grid through the run directory. Each image depends
only on (seed, index), so a run's previews show the same noise growing into images from one grid to the next.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .errors import TrainingError
from .images import make_grid
from .processes import gather_shares, on_main, rank_world, share
from .rundir import RunDir
from .sampling import generate
from .settings import SamplingSettings

__all__ = ["Previews"]


class Previews:
    """``num_images`` EMA samples drawn with ``settings`` every ``every`` steps (and at the end), saved as one grid
    in ``run``."""

    def __init__(self, *, every: int, num_images: int, settings: SamplingSettings, run: RunDir):
        self.every, self.num_images, self.settings, self.run = every, num_images, settings, run

    def __call__(self, model: torch.nn.Module, scheduler_config: dict, step: int) -> None:
        """Draw and save the grid of ``step`` (every process takes part)."""
        n = self.num_images
        rank, world = rank_world()
        mine = share(n, rank, world)
        settings = replace(self.settings, batch_size=max(len(mine), 1))
        images = generate(model, n, settings, indices=mine, progress=False, scheduler_config=scheduler_config)
        ordered = gather_shares(images, n)  # (n, C, H, W) in image order
        on_main(lambda: self.run.save_preview(step, lambda tmp: make_grid(ordered).save(tmp, format="PNG")),
                errors=(TrainingError,), share_result=False,
                elsewhere=f"stopped at step {step}: the main process could not write the preview of step {step} "
                          f"(its error says why)")
