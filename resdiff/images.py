"""Images on disk: uint8 tensors to and from PNG files, grids, and the npz layout FID tools read.

In memory, images are uint8 tensors (N, C, H, W) with C = 1 or 3; ``resdiff.data`` converts them to
and from the model's [-1, 1]. Every file is written under a temporary name and renamed into place
(``resdiff.files``), so a PNG with its final name is always whole.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .choices import IMAGE_CHANNELS
from .errors import UsageError, one_line
from .files import write_atomic

__all__ = [
    "GRID_NAME", "NPZ_NAME", "to_pil", "grid_columns", "make_grid", "image_name", "save_png", "save_images", "read_images",
    "save_npz", "load_npz",
]

# A folder of samples: image_name(i) for image i, the overview grid.png of the first ones, all of them as samples.npz.
GRID_NAME, NPZ_NAME = "grid.png", "samples.npz"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (N, C, H, W) -> pillow images: mode L for one channel, RGB for three."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS:
        raise ValueError(f"expected uint8 (N, 1 or 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    arrays = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arrays]


def grid_columns(n: int, h: int, w: int) -> int:
    """Columns that make a grid of n (H, W) images about square: ceil(sqrt(N * H / W)), between 1 and N.
    Square images give ceil(sqrt(N)); wide ones fewer columns (more rows), tall ones more."""
    return max(1, min(n, math.ceil(math.sqrt(n * h / w))))


def make_grid(images: torch.Tensor, padding: int = 2, cols: int | None = None) -> Image.Image:
    """uint8 (N, C, H, W) as one grid image on a black background: ``cols`` columns (default: by aspect ratio,
    see ``grid_columns``, so a grid of wide images stays about as wide as it is high)."""
    n, c, h, w = images.shape
    cols = cols or grid_columns(n, h, w)
    rows = max(1, math.ceil(n / cols))
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for k in range(n):
        top, left = padding + (k // cols) * (h + padding), padding + (k % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k]
    return to_pil(grid[None])[0]


def image_name(index: int) -> str:
    """The file name of image ``index``: 00000.png, 00001.png, ..."""
    return f"{index:05d}.png"


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name of this process and rename it into place."""
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"), per_process=True)


def save_images(images: torch.Tensor, out_dir: str | Path, indices: Sequence[int]) -> list[Path]:
    """Write uint8 (N, C, H, W) images as PNGs named by ``indices``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(indices) != len(images):
        raise ValueError(f"{len(images)} images but {len(indices)} indices")
    paths = [out_dir / image_name(int(i)) for i in indices]
    for image, path in zip(to_pil(images), paths):
        save_png(image, path)
    return paths


def read_images(out_dir: str | Path, indices: Sequence[int]) -> torch.Tensor:
    """Read back the PNGs of ``indices`` from ``out_dir``: uint8 (N, C, H, W)."""
    arrays = []
    for i in indices:
        path = Path(out_dir) / image_name(int(i))
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: a sampling process did not write its images")
        with Image.open(path) as im:
            a = np.array(im, dtype=np.uint8)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def save_npz(images: torch.Tensor, path: Path) -> None:
    """uint8 (N, C, H, W) in the layout FID tools read: ``arr_0`` uint8 (N, H, W, C)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, arr_0=images.permute(0, 2, 3, 1).numpy())

    write_atomic(path, write)


def load_npz(path: str | Path) -> torch.Tensor:
    """The images of an npz in that layout (``arr_0`` uint8 (N, H, W, C), or (N, H, W) for grayscale) as uint8
    (N, C, H, W); anything else is a one-line UsageError."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise UsageError(f"{path} has no arr_0 image array (it has {', '.join(data.files) or 'nothing'}); "
                                 "expected uint8 (N, H, W, C) as sample.py --npz writes")
            a = data["arr_0"]
    except UsageError:
        raise
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {one_line(err, 120)}") from None
    if a.ndim == 3:
        a = a[..., None]  # (N, H, W) grayscale
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[3] not in IMAGE_CHANNELS or len(a) == 0:
        raise UsageError(f"{path}: arr_0 is {a.dtype} {a.shape}; expected uint8 (N, H, W, 1 or 3) with N >= 1")
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
