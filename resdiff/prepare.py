"""Decode an image folder once into a prepared dataset that training memory-maps.

    python -m resdiff.prepare DIR OUT --image-size 64x128 [--channels 3] [--class-cond] [--config FILE]

OUT holds NumPy .npy files (uint8 (n, C, H, W) shards, int64 labels) and an index.json (see
``PreparedImages`` below, its reader). Images go through exactly what training does to a folder (decode, convert
to the channels, resize to cover, centre crop), so a prepared dataset gives the same batches as its folder.
Unreadable files are skipped with one warning line each, as training skips them. Memory holds one chunk of
decoded images at a time, whatever the size of the folder; OUT appears only when it is complete.

Why .npy: it is NumPy's own documented format (a short header, then the raw array), ``np.load(mmap_mode="r")``
maps it, any tool reads it, and a mapped file is shared by every process of a machine through the page cache.
"""

from __future__ import annotations

import argparse
import bisect
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
import torch
from PIL import Image

from .choices import IMAGE_CHANNELS
from .data import (
    IMAGE_EXTENSIONS, why_unusable, find_images, is_image_size, class_labels, fit_image, image_shape, open_image, random_flip,
    shape_name,
)
from .errors import ArgumentParser, UsageError, one_line, run_cli
from .files import human_size, write_problem

__all__ = ["PreparedImages", "is_prepared", "prepare", "main"]

SHARD_BYTES = 1024**3  # images per shard file: as many as fit in about 1 GiB
_CHUNK = 256  # images decoded per round of thread-pool work (bounds memory)


# ----------------------------------------------------------------------------- the format, and its reader

PREPARED_FORMAT = "resdiff-prepared"
PREPARED_VERSION = 1
PREPARED_INDEX = "index.json"


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a folder that `python -m resdiff.prepare` wrote (it holds index.json)."""
    return (Path(path) / PREPARED_INDEX).is_file()


def _damaged(path: Path, what: str) -> UsageError:
    return UsageError(f"prepared dataset file {path} is {what}; prepare the dataset again "
                      f"(python -m resdiff.prepare SOURCE {path.parent})")


class PreparedImages(torch.utils.data.Dataset):
    """A prepared dataset: uint8 (C, H, W) images memory-mapped from NumPy .npy shards, with their labels.

    Layout (written by ``resdiff.prepare``): ``index.json`` (format, version, image_size [H, W], channels, classes,
    the source folder, its files and the skipped ones, the shards with their counts), ``labels.npy`` int64 (N,),
    and ``images-00000.npy``, ... uint8 (n_k, C, H, W), in the order of ``files``. Items are copies of rows of
    the maps, so every process of a machine reads one copy of the data from the page cache; none is loaded
    into private memory. Checked on opening: the index, each shard's header, shape and exact file size, the
    labels. A damaged or truncated file is one UsageError line that names it.
    """

    def __init__(self, root: str | Path, image_size: int | Sequence[int] | None = None, channels: int | None = None,
                 *, random_flip: bool = False) -> None:
        import json

        self.root = Path(root)
        index_file = self.root / PREPARED_INDEX
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            if index.get("format") != PREPARED_FORMAT:
                raise ValueError("not a resdiff prepared-dataset index")
            if index.get("version") != PREPARED_VERSION:
                raise ValueError(f"version {index.get('version')!r}, this resdiff reads {PREPARED_VERSION}")
            self.shape = image_shape(index["image_size"])
            self.channels, self.classes = int(index["channels"]), list(index["classes"])
            self.source = Path(index["source"])
            rel_files, shards = list(index["files"]), list(index["shards"])
            counts = [int(sh["count"]) for sh in shards]
            self.skipped = [(self.source / f, why) for f, why in index.get("skipped", [])]
        except FileNotFoundError:
            raise UsageError(f"{index_file} is missing; {self.root} is not a prepared dataset") from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise _damaged(index_file, f"damaged ({one_line(err, 120)})") from None
        if len(rel_files) != sum(counts):
            raise _damaged(index_file, f"inconsistent: {len(rel_files)} files but {sum(counts)} images in its shards")
        self.image_size = self.shape[0] if self.shape[0] == self.shape[1] else self.shape
        if image_size is not None and image_shape(image_size) != self.shape:
            raise UsageError(
                f"{self.root} was prepared at {shape_name(self.shape)}, but data.image_size is {shape_name(image_size)}; "
                f"set data.image_size={shape_name(self.shape)} or prepare again with --image-size {shape_name(image_size)}")
        if channels is not None and channels != self.channels:
            raise UsageError(
                f"{self.root} was prepared with {self.channels} channel(s), but data.image_channels is {channels}; "
                f"set data.image_channels={self.channels} or prepare again with --channels {channels}")
        self.files = [self.source / f for f in rel_files]
        self.random_flip, self.cached = random_flip, True  # nothing is decoded per item
        self.mode = (f"prepared, memory-mapped from {self.root} ({self._nbytes(counts) / 2**30:.2f} GiB; the processes "
                     "of this machine share one copy through the page cache)")
        self._shard_files = [self.root / str(sh["file"]) for sh in shards]
        self._starts = np.cumsum([0, *counts]).tolist()
        labels_file = self.root / "labels.npy"
        try:
            labels = np.load(labels_file, allow_pickle=False)
        except FileNotFoundError:
            raise _damaged(labels_file, "missing") from None
        except (OSError, ValueError, EOFError) as err:
            raise _damaged(labels_file, f"damaged or truncated ({one_line(err, 120)})") from None
        if labels.shape != (len(self.files),) or labels.dtype.kind not in "iu":
            raise _damaged(labels_file, f"{labels.dtype} {labels.shape}, not {len(self.files)} integer labels")
        self.labels = labels.astype(np.int64).tolist()
        self._maps = self._open(counts)

    def _nbytes(self, counts: Sequence[int]) -> int:
        return sum(counts) * self.channels * self.shape[0] * self.shape[1]

    def _open(self, counts: Sequence[int]) -> list[np.ndarray]:
        """Memory-map every shard, checking its header, shape and size."""
        maps = []
        for path, n in zip(self._shard_files, counts):
            want = (n, self.channels, *self.shape)
            try:
                with open(path, "rb") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read(f)
                    offset = f.tell()
                size = path.stat().st_size
            except FileNotFoundError:
                raise _damaged(path, "missing") from None
            except (OSError, ValueError, EOFError, SyntaxError) as err:
                raise _damaged(path, f"damaged ({one_line(err, 120)})") from None
            if tuple(shape) != want or dtype != np.uint8 or fortran:
                raise _damaged(path, f"{dtype} {tuple(shape)}, expected uint8 {want}")
            if size != offset + int(np.prod(want)):
                raise _damaged(path, f"{size} bytes, expected {offset + int(np.prod(want))} (truncated or damaged)")
            maps.append(np.memmap(path, np.uint8, "r", offset=offset, shape=want) if n else np.zeros(want, np.uint8))
        return maps

    def __getstate__(self) -> dict:
        """Loader workers started by spawn map the files again instead of receiving a pickled copy of the data."""
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image i as a contiguous uint8 (C, H, W) tensor (a copy of its row of the map) and its class label."""
        if self._maps is None:
            self._maps = self._open([b - a for a, b in zip(self._starts, self._starts[1:])])
        if not 0 <= i < len(self.files):
            raise IndexError(f"image {i} of {len(self.files)}")
        k = bisect.bisect_right(self._starts, i) - 1
        x = torch.from_numpy(np.array(self._maps[k][i - self._starts[k]]))  # (C, H, W)
        if self.random_flip:
            x = random_flip(x[None])[0]
        return x, self.labels[i]


# ----------------------------------------------------------------------------- the writer


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


class _Shards:
    """The shard files of a dataset being written into ``folder``: images-00000.npy, ... of at most ``per_shard``
    images each, every one reserved on disk when it opens (``_reserve``) and cut to its count when it closes."""

    def __init__(self, folder: Path, item: tuple[int, int, int], per_shard: int):
        self.folder, self.item, self.per_shard = folder, item, per_shard
        self.written: list[dict] = []  # {"file", "count"} of each closed shard: the index's "shards"
        self.shard, self.path, self.filled = None, None, 0

    def add(self, pixels: np.ndarray, left: int) -> None:
        """One image (C, H, W); ``left`` images (this one included) are still to come, the size of a last shard."""
        if self.shard is None or self.filled == self.shard.shape[0]:
            self.close()
            self.path = self.folder / f"images-{len(self.written):05d}.npy"
            capacity = min(self.per_shard, left)
            self.shard = np.lib.format.open_memmap(self.path, "w+", np.uint8, (capacity, *self.item))
            _reserve(self.path)
            self.filled = 0
        self.shard[self.filled] = pixels
        self.filled += 1

    def close(self) -> None:
        if self.shard is None:
            return
        self.shard.flush()
        self.shard = None
        _finish_shard(self.path, self.filled, self.item)
        self.written.append({"file": self.path.name, "count": self.filled})


def _decode_into(
    shards: _Shards, candidates: list[Path], source: Path, decode: Callable[[Path], np.ndarray | str],
    warn: Callable[[str], None],
) -> tuple[list[int], list[str], list[tuple[str, str]]]:
    """Decode ``candidates`` on a thread pool, a chunk at a time (so memory stays bounded), into ``shards``.
    Returns the indices of the candidates kept, their names below ``source``, and (name, why) of each skipped."""
    kept: list[int] = []
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for start in range(0, len(candidates), _CHUNK):
            chunk = candidates[start:start + _CHUNK]
            for k, result in enumerate(pool.map(decode, chunk)):
                name = chunk[k].relative_to(source).as_posix()
                if isinstance(result, str):
                    skipped.append((name, result))
                    warn(f"skipping {chunk[k]}: {result}")
                    continue
                shards.add(result, len(candidates) - start - k)
                kept.append(start + k)
                files.append(name)
        shards.close()
    return kept, files, skipped


def _check_request(source: Path, out: Path, image_size: int | Sequence[int], channels: int) -> None:
    """What ``prepare`` is asked for, before anything is read or written."""
    if not is_image_size(image_size):
        raise UsageError(f"image size must be a positive integer or a (height, width) pair, got {image_size!r}")
    if channels not in IMAGE_CHANNELS:
        raise UsageError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not source.is_dir():
        raise UsageError(f"image folder {source} does not exist or is not a folder; pass a folder that holds images")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists; choose a new folder for the prepared dataset, or remove it")
    if out.resolve().is_relative_to(source.resolve()):
        raise UsageError(f"{out} is inside the image folder {source}; put the prepared dataset elsewhere")


def prepare(
    source: str | Path, out: str | Path, image_size: int | Sequence[int] = 32, channels: int = 3, *,
    class_cond: bool = False, background: tuple[int, int, int] = (255, 255, 255), shard_bytes: int = SHARD_BYTES,
    warn: Callable[[str], None] | None = None,
) -> PreparedImages:
    """Decode every image below ``source`` into a prepared dataset in ``out`` (which must not exist yet, or be an
    empty folder); returns it opened. ``warn`` hears each file skipped (default: stderr)."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    source, out = Path(source), Path(out)
    _check_request(source, out, image_size, channels)
    shape = image_shape(image_size)
    item = (channels, *shape)
    candidates = find_images(source, warn)
    if not candidates:
        raise UsageError(f"no image files in {source} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    labels_in, classes = class_labels(source, candidates, class_cond)
    _check_space(out, len(candidates), item)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards = _Shards(tmp, item, max(1, shard_bytes // int(np.prod(item))))

        def decode(path: Path):
            try:
                return fit_image(open_image(path), shape, channels, background).numpy()
            except Exception as err:  # any decoder failure means: skip this file, as training does
                return why_unusable(path, err)

        kept, files, skipped = _decode_into(shards, candidates, source, decode, warn)
        labels = [labels_in[i] for i in kept]
        if skipped:
            warn(f"skipped {len(skipped)} of {len(candidates)} files in {source}")
        if not files:
            raise UsageError(f"no readable images in {source}: all {len(candidates)} image files were skipped "
                             "(see the warnings above); add images pillow can open")
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        index = {
            "format": PREPARED_FORMAT, "version": PREPARED_VERSION, "image_size": list(shape), "channels": channels,
            "crop": "center", "class_cond": class_cond, "classes": classes, "background": list(background),
            "source": str(source.resolve()), "files": files, "skipped": skipped, "shards": shards.written,
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
    data = prepare(args.source, args.out, d.image_size, d.image_channels, class_cond=d.class_cond)
    skipped = f", {len(data.skipped)} skipped" if data.skipped else ""
    print(f"prepared {len(data)} images{skipped} at {shape_name(data.shape)}, {data.channels} channel(s), "
          f"into {args.out}; train with: python train.py --data {args.out} data.image_size={shape_name(data.shape)}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
