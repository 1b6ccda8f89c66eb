"""Decode an image folder once into a prepared dataset that training memory-maps.

    python -m resdiff.prepare DIR OUT --image-size 64x128 [--channels 3] [--class-cond] [--config FILE]

OUT holds NumPy .npy files (uint8 (n, C, H, W) shards, int64 labels) and an index.json (see
``resdiff.data.PreparedImages``). Images go through exactly what training does to a folder (decode, convert
to the channels, resize to cover, centre crop), so a prepared dataset gives the same batches as its folder.
Unreadable files are skipped with one warning line each, as training skips them. Memory holds one chunk of
decoded images at a time, whatever the size of the folder; OUT appears only when it is complete.

Why .npy: it is NumPy's own documented format (a short header, then the raw array), ``np.load(mmap_mode="r")``
maps it, any tool reads it, and a mapped file is shared by every process of a machine through the page cache.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .data import (
    IMAGE_EXTENSIONS, PREPARED_FORMAT, PREPARED_INDEX, PREPARED_VERSION, PreparedImages, why_unusable,
    find_images, is_image_size, class_labels, fit_image, image_shape, open_image, shape_name,
)
from .errors import ArgumentParser, UsageError, run_cli
from .files import human_size, write_problem

__all__ = ["prepare", "main"]

SHARD_BYTES = 1024**3  # images per shard file: as many as fit in about 1 GiB
_CHUNK = 256  # images decoded per round of thread-pool work (bounds memory)


def _finish_shard(path: Path, count: int, item: tuple[int, int, int]) -> None:
    """Rewrite a shard's .npy header from its capacity to the ``count`` images it got, and cut the file there.

    NumPy pads every header so that the first dimension can grow to 21 digits without moving the data, so the
    header keeps its length; that is checked."""
    with open(path, "r+b") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
        f.seek(0)
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (count, *item)})
        if f.tell() != offset:
            raise RuntimeError(f"the .npy header of {path} changed length ({offset} -> {f.tell()})")
        f.truncate(offset + count * int(np.prod(item)))


def _check_space(out: Path, count: int, item: tuple[int, int, int]) -> None:
    """Refuse, before anything is written, a dataset the disk of ``out`` has no room for: the shards are memory
    maps, and a write into one the disk cannot hold kills the process with SIGBUS, no error to catch."""
    needed = count * (int(np.prod(item)) + 8 + 256) + 2**16  # the images, their int64 labels, the index, headers
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # the disk it will be on: its nearest existing folder
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise UsageError(f"cannot read the free space of {folder} ({err.strerror}); choose another OUT") from None
    if free < needed:
        raise UsageError(
            f"not enough free disk space for {out}: {human_size(free)} free in {folder}, but {count} image files at "
            f"{item[1]}x{item[2]}, {item[0]} channel(s) take about {human_size(needed)}; free some space there "
            f"or choose another OUT"
        )


def _reserve(path: Path) -> None:
    """Give a new shard all its disk blocks now: a memory map is sparse, and a write into it that the disk cannot
    hold is SIGBUS, while a reservation that does not fit is an OSError (ENOSPC) that can be reported."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write as before
            raise
    finally:
        os.close(fd)


def prepare(
    source: str | Path, out: str | Path, image_size: int | Sequence[int] = 32, channels: int = 3, *,
    class_cond: bool = False, background: tuple[int, int, int] = (255, 255, 255), shard_bytes: int = SHARD_BYTES,
    warn: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None,
) -> PreparedImages:
    """Decode every image below ``source`` into a prepared dataset in ``out`` (which must not exist yet, or be an
    empty folder); returns it opened."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    source, out = Path(source), Path(out)
    if not is_image_size(image_size):
        raise UsageError(f"image size must be a positive integer or a (height, width) pair, got {image_size!r}")
    if channels not in (1, 3):
        raise UsageError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not source.is_dir():
        raise UsageError(f"image folder {source} does not exist or is not a folder; pass a folder that holds images")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists; choose a new folder for the prepared dataset, or remove it")
    if out.resolve().is_relative_to(source.resolve()):
        raise UsageError(f"{out} is inside the image folder {source}; put the prepared dataset elsewhere")
    shape = image_shape(image_size)
    item = (channels, *shape)
    candidates = find_images(source, warn)
    if not candidates:
        raise UsageError(f"no image files in {source} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    labels_in, classes = class_labels(source, candidates, class_cond)
    per_shard = max(1, shard_bytes // int(np.prod(item)))
    _check_space(out, len(candidates), item)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files: list[str] = []
        labels: list[int] = []
        skipped: list[tuple[str, str]] = []
        shards: list[dict] = []
        shard, shard_path, filled = None, None, 0

        def close_shard() -> None:
            nonlocal shard
            if shard is None:
                return
            shard.flush()
            shard = None
            _finish_shard(shard_path, filled, item)
            shards.append({"file": shard_path.name, "count": filled})

        def decode(path: Path):
            try:
                return fit_image(open_image(path), shape, channels, background).numpy()
            except Exception as err:  # any decoder failure means: skip this file, as training does
                return why_unusable(path, err)

        with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for start in range(0, len(candidates), _CHUNK):
                chunk = candidates[start:start + _CHUNK]
                for k, result in enumerate(pool.map(decode, chunk)):
                    path = chunk[k]
                    if isinstance(result, str):
                        skipped.append((path.relative_to(source).as_posix(), result))
                        warn(f"skipping {path}: {result}")
                        continue
                    if shard is None or filled == shard.shape[0]:
                        close_shard()
                        capacity = min(per_shard, len(candidates) - start - k)
                        shard_path = tmp / f"images-{len(shards):05d}.npy"
                        shard = np.lib.format.open_memmap(shard_path, "w+", np.uint8, (capacity, *item))
                        _reserve(shard_path)
                        filled = 0
                    shard[filled] = result
                    filled += 1
                    files.append(path.relative_to(source).as_posix())
                    labels.append(labels_in[start + k])
                if log is not None:
                    log(f"prepared {min(start + _CHUNK, len(candidates))} of {len(candidates)} files")
            close_shard()
        if skipped:
            warn(f"skipped {len(skipped)} of {len(candidates)} files in {source}")
        if not files:
            raise UsageError(f"no readable images in {source}: all {len(candidates)} image files were skipped "
                             "(see the warnings above); add images pillow can open")
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        index = {
            "format": PREPARED_FORMAT, "version": PREPARED_VERSION, "image_size": list(shape), "channels": channels,
            "crop": "center", "class_cond": class_cond, "classes": classes, "background": list(background),
            "source": str(source.resolve()), "files": files, "skipped": skipped, "shards": shards,
        }
        (tmp / PREPARED_INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # the empty folder it was allowed to be
        os.replace(tmp, out)
    except OSError as err:  # the disk filled up (or went away) after the check, e.g. another job's writes
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot write the prepared dataset {out} ({write_problem(err)}); nothing was kept; free "
                         f"some space there or choose another OUT") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedImages(out, shape, channels)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="resdiff.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="DIR", help="image folder (searched recursively)")
    p.add_argument("out", metavar="OUT", help="new folder for the prepared dataset")
    p.add_argument("--config", help="take data.image_size, data.image_channels and data.class_cond from this YAML config")
    p.add_argument("--image-size", help="training shape: one side (64) or HEIGHTxWIDTH (64x128)")
    p.add_argument("--channels", type=int, help="1 (grayscale) or 3 (RGB)")
    p.add_argument("--class-cond", action="store_true", default=None, help="labels from the first subfolder (one per class)")
    args = p.parse_args(argv)
    from .config import load_config

    overrides = [f"data.{k}={v}" for k, v in (("image_size", args.image_size), ("image_channels", args.channels),
                                                ("class_cond", args.class_cond)) if v is not None]
    d = load_config(args.config, overrides).data
    data = prepare(args.source, args.out, d.image_size, d.image_channels, class_cond=d.class_cond, log=None)
    skipped = f", {len(data.skipped)} skipped" if data.skipped else ""
    print(f"prepared {len(data)} images{skipped} at {shape_name(data.shape)}, {data.channels} channel(s), "
          f"into {args.out}; train with: python train.py --data {args.out} data.image_size={shape_name(data.shape)}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
