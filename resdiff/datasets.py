"""The training data a config names: an image folder, a prepared dataset (pixels or latents), or the demo shapes;
for latent diffusion also the autoencoder the data is encoded with.

Each kind is read by its own module (``resdiff.data.ImageFolder``, ``resdiff.prepare.PreparedImages``); this one
decides which, and checks the data settings that depend on what the data is. A run is a latent one when its data
is a prepared latent dataset (which records its autoencoder) or when ``model.autoencoder`` names one: an image
folder (the demo shapes too) is then encoded once into resdiff's cache (``resdiff.prepare.latent_cache``).

    plan = DataPlan(cfg.data, autoencoder="../shared/weights")   # cheap: opens what is prepared, loads the autoencoder
    plan.model_input                                              # (C, H, W) the U-Net sees: latents or images
    dataset, latent = plan.load(warn)                            # reads (or encodes, once) the data
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .config import DataConfig
from .data import ImageFolder, write_demo_folder
from .errors import UsageError
from .files import cache_root
from .prepare import PreparedImages, is_prepared, latent_cache
from .processes import on_main
from .shapes import image_shape, shape_name

__all__ = ["DataPlan", "demo_data_dir"]


def demo_data_dir(image_size: int | tuple[int, int], n: int) -> Path:
    """Where the built-in demo dataset is written (in resdiff's cache folder, $RESDIFF_CACHE)."""
    return cache_root() / f"demo-shapes-{shape_name(image_size)}px-{n}"


class DataPlan:
    """What ``d`` (and ``autoencoder``, a SPEC: ``model.autoencoder``) make a run train on, decided before any image
    is read or encoded, so that a model that cannot be built fails first. ``device``: where the autoencoder runs."""

    def __init__(self, d: DataConfig, autoencoder: str | None = None, device: torch.device | str | None = None):
        from .autoencoder import LatentSpace, load_autoencoder

        self.d, self.prepared, self.latent, self.autoencoder = d, None, None, None
        if d.path is not None and is_prepared(d.path):
            self.prepared = _prepared(d)
        if self.prepared is not None and self.prepared.latent is not None:  # it names its autoencoder
            record = {"autoencoder": self.prepared.autoencoder, "norm": self.prepared.norm.to_dict()}
            self.latent = LatentSpace.from_record(record, Path(d.path) / "index.json", autoencoder, device)
        elif autoencoder is not None:
            if self.prepared is not None:
                raise UsageError(f"{d.path} is a prepared dataset of images, not latents; train on its image folder "
                                 f"with --autoencoder, or prepare latents (resdiff-prepare --autoencoder SPEC)")
            if d.image_channels != 3:
                raise UsageError(f"an autoencoder takes RGB images, but data.image_channels is {d.image_channels}; "
                                 f"set data.image_channels=3")
            self.autoencoder = load_autoencoder(autoencoder, device)
        if self.latent is not None:
            self.autoencoder = self.latent.autoencoder

    @property
    def latent_run(self) -> bool:
        """Whether the run trains on latents (of ``autoencoder``)."""
        return self.autoencoder is not None

    @property
    def model_input(self) -> tuple[int, int, int]:
        """The (C, H, W) the model sees: the images', or their latents'."""
        if self.prepared is not None:
            return tuple(self.prepared.item_shape)
        if self.latent_run:
            return self.autoencoder.latent_shape(image_shape(self.d.image_size))
        return (self.d.image_channels, *image_shape(self.d.image_size))

    def load(self, warn: Callable[[str], None]) -> tuple[ImageFolder | PreparedImages, "LatentSpace | None"]:
        """The dataset, and for a latent run its LatentSpace. An image folder (or the demo shapes) of a latent run
        is encoded once into the cache by every process together (one encodes, the others wait for it)."""
        from .autoencoder import LatentSpace

        d = self.d
        if self.prepared is not None:
            return self.prepared, self.latent
        root = _demo_root(d) if d.path is None else Path(d.path)
        if not self.latent_run:
            return ImageFolder(root, d.image_size, d.image_channels, class_cond=d.class_cond, random_crop=d.random_crop,
                               cache=d.cache, warn=warn, cache_limit=int(d.cache_limit_gb * 2**30)), None
        if d.random_crop:
            raise UsageError("data.random_crop needs images; a latent run encodes centre crops once (set "
                             "data.random_crop=false)")
        data = latent_cache(root, d.image_size, self.autoencoder, channels=d.image_channels, class_cond=d.class_cond,
                            flips=d.random_flip, warn=warn)
        return data, LatentSpace(self.autoencoder, data.norm)


def _prepared(d: DataConfig) -> PreparedImages:
    """A prepared dataset, checked against the data settings that depend on it."""
    if d.random_crop:
        raise UsageError(f"{d.path} is a prepared dataset, which holds centre crops; data.random_crop needs the "
                         f"image folder itself (train on the folder, or set data.random_crop=false)")
    data = PreparedImages(d.path, d.image_size, d.image_channels)
    if d.random_flip and not data.flips_stored:
        raise UsageError(f"{d.path} was prepared with --no-flip (no latents of mirrored images), but flips are "
                         f"on; set data.random_flip=false or prepare again without --no-flip")
    if d.class_cond and not data.classes:
        raise UsageError(f"{d.path} was prepared without classes, but data.class_cond is true; prepare it again "
                         f"with --class-cond (one subfolder per class), or set data.class_cond=false")
    return data


def _demo_root(d: DataConfig) -> Path:
    """The built-in demo shapes at ``d``'s size, written once by the main process (its error stops every process)."""
    root = demo_data_dir(d.image_size, d.demo_images)
    on_main(lambda: _write_demo(root, d.demo_images, d.image_size), share_result=False)
    return root


def _write_demo(root: Path, n: int, image_size: int | tuple[int, int]) -> None:
    try:
        write_demo_folder(root, n, image_size, seed=0)
    except OSError as err:
        raise UsageError(f"cannot write the demo images to {root} ({err.strerror or err}); set RESDIFF_CACHE to a "
                         f"writable folder, or train on your own images (data.path)") from None
