"""Image sizes: one number is a square, a pair is (height, width). How users write them, how resdiff names them.

The one owner of these facts, importing nothing: the config (no torch), the data, the U-Net, sampling and the
prepared datasets all read sizes through it.

    image_shape(64) == (64, 64)        image_shape([64, 128]) == (64, 128)
    shape_name((64, 64)) == "64"       shape_name((64, 128)) == "64x128"
    as_written("64x128") == [64, 128]  one_number((32, 32)) == 32
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["image_shape", "is_image_size", "shape_name", "as_written", "one_number"]


def _side(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_image_size(size: object) -> bool:
    """One positive integer, or two (height, width)."""
    sides = (size,) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    return len(sides) in (1, 2) and all(_side(v) for v in sides)


def image_shape(size: int | Sequence[int], name: str = "an image size") -> tuple[int, int]:
    """``size`` as (height, width): one number is a square. Anything else is a ValueError naming ``name``."""
    if not is_image_size(size):
        raise ValueError(f"{name} must be a positive integer or a (height, width) pair of them, got {size!r}")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def shape_name(size: int | Sequence[int]) -> str:
    """'32' for a square, '64x128' (height x width) otherwise: for folder names and messages."""
    h, w = image_shape(size)
    return str(h) if h == w else f"{h}x{w}"


def one_number(size: int | Sequence[int]) -> int | tuple[int, int]:
    """A square as its one number, another shape as (height, width): how configs, run directories and models
    record a size, so that [32, 32] and 32 are the same setting."""
    h, w = image_shape(size)
    return h if h == w else (h, w)


def as_written(value: object) -> object:
    """What a user wrote for a size, as a value: '64x128', '64 128' or '64,128' -> [64, 128]; anything else as it
    is (the type check that follows names what is wrong with it)."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[xX*, ]+", value.strip()) if p]
        if len(parts) == 2:
            return parts
    return value
