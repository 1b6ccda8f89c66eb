"""Preview grids during training: a grid of EMA samples every few steps, RUN/samples/step-NNNNNNN.png.

The trainer calls a ``Previews`` at its interval with the EMA model; every process draws its share of the images
(``resdiff.processes.share``), the main process writes the grid through the run directory. Each image depends
only on (seed, index), so a run's previews show the same noise growing into images from one grid to the next.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .images import make_grid
from .processes import gather_shares, main_writes, rank_world, share
from .rundir import RunDir
from .sampling import generate
from .settings import SamplingSettings

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .autoencoder import LatentSpace
    from PIL import Image

__all__ = ["Previews", "log_image"]

# How each tracker's log_images takes one picture, an (H, W, 3) uint8 array: TensorBoard's add_images a batch of
# them (NHWC, said by a keyword), W&B a list. accelerate's other trackers get the figures and no images.
_IMAGE_FORMS: dict[str, Callable[[np.ndarray], tuple[object, dict]]] = {
    "tensorboard": lambda pixels: (pixels[None], {"dataformats": "NHWC"}),
    "wandb": lambda pixels: ([pixels], {}),
}


def log_image(accelerator: "Accelerator", name: str, picture: "Image.Image", step: int) -> None:
    """``picture`` to every tracker of ``accelerator`` that takes images, at ``step``. Trackers live on the main
    process only (accelerate makes none elsewhere), so elsewhere this does nothing."""
    pixels = np.asarray(picture.convert("RGB"))  # (H, W, 3) uint8; a grey or RGBA grid made RGB
    for tracker in accelerator.trackers:
        if (form := _IMAGE_FORMS.get(tracker.name)) is not None:
            images, kwargs = form(pixels)
            tracker.log_images({name: images}, step=step, **kwargs)


class Previews:
    """``num_images`` EMA samples drawn with ``settings`` every ``every`` steps (and at the end), saved as one grid
    in ``run`` and sent as an image to the experiment trackers of ``trackers`` (an Accelerator; None: none)."""

    def __init__(self, *, every: int, num_images: int, settings: SamplingSettings, run: RunDir,
                 trackers: "Accelerator | None" = None, latent: "LatentSpace | None" = None):
        self.every, self.num_images, self.settings, self.run, self.trackers = every, num_images, settings, run, trackers
        self.latent = latent  # a latent model's: its samples are decoded

    def __call__(self, model: torch.nn.Module, scheduler_config: dict, step: int) -> None:
        """Draw and save the grid of ``step`` (every process takes part)."""
        n = self.num_images
        rank, world = rank_world()
        mine = share(n, rank, world)
        settings = replace(self.settings, batch_size=max(len(mine), 1))
        images = generate(model, n, settings, indices=mine, progress=False, scheduler_config=scheduler_config,
                          latent=self.latent)
        ordered = gather_shares(images, n)  # (n, C, H, W) in image order

        def write() -> None:
            grid = make_grid(ordered)
            self.run.save_preview(step, lambda tmp: grid.save(tmp, format="PNG"))
            if self.trackers is not None:
                log_image(self.trackers, "preview", grid, step)

        main_writes(write, f"the preview of step {step}", step)
