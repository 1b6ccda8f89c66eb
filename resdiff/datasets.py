"""The training data a config names: an image folder, a prepared dataset (pixels or latents), or the demo shapes.

Each kind is read by its own module (``resdiff.data.ImageFolder``, ``resdiff.prepare.PreparedImages``); this one
decides which, and checks the data settings that depend on what the data is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import DataConfig
from .data import ImageFolder, write_demo_folder
from .errors import UsageError
from .files import cache_root
from .prepare import PreparedImages, is_prepared
from .processes import on_main
from .shapes import shape_name

__all__ = ["training_data", "demo_data_dir"]


def demo_data_dir(image_size: int | tuple[int, int], n: int) -> Path:
    """Where the built-in demo dataset is written (in resdiff's cache folder, $RESDIFF_CACHE)."""
    return cache_root() / f"demo-shapes-{shape_name(image_size)}px-{n}"


def training_data(d: DataConfig, warn: Callable[[str], None]) -> ImageFolder | PreparedImages:
    """The training images ``d`` names: a prepared dataset (``resdiff.prepare``), an image folder, or the demo
    shapes (written once into resdiff's cache by the main process). The settings that depend on the data are
    checked here: a prepared dataset holds centre crops, its classes and its stored flips."""
    if d.path is not None and is_prepared(d.path):
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
    if d.path is None:
        root = demo_data_dir(d.image_size, d.demo_images)
        # one process writes them; its error stops every process
        on_main(lambda: _write_demo(root, d.demo_images, d.image_size), share_result=False)
    else:
        root = Path(d.path)
    # Flips are ShardedBatches' to choose (resdiff.batches).
    return ImageFolder(root, d.image_size, d.image_channels, class_cond=d.class_cond,
                       random_crop=d.random_crop, cache=d.cache, warn=warn, cache_limit=int(d.cache_limit_gb * 2**30))


def _write_demo(root: Path, n: int, image_size: int | tuple[int, int]) -> None:
    try:
        write_demo_folder(root, n, image_size, seed=0)
    except OSError as err:
        raise UsageError(f"cannot write the demo images to {root} ({err.strerror or err}); set RESDIFF_CACHE to a "
                         f"writable folder, or train on your own images (data.path)") from None
