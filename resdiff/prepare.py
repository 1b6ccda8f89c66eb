"""Decode an image folder once into a prepared dataset that training memory-maps: pixels, or the latents of an
autoencoder.

    python -m resdiff.prepare DIR OUT --image-size 64x128 [--channels 3] [--class-cond] [--config FILE]
    python -m resdiff.prepare DIR OUT --image-size 256 --autoencoder SPEC [--no-flip] [--batch-size 16] [--device cuda]

OUT holds NumPy .npy files (uint8 (n, C, H, W) shards, int64 labels) and an index.json (see
``PreparedImages`` below, its reader). Images go through exactly what training does to a folder (decode, convert
to the channels, resize to cover, centre crop), so a prepared dataset gives the same batches as its folder.
Unreadable files are skipped with one warning line each, as training skips them. Memory holds one chunk of
decoded images at a time, whatever the size of the folder; OUT appears only when it is complete.

With ``--autoencoder SPEC`` (``resdiff.autoencoder``) the shards hold float16 latents (n, C, h, w) instead, index.json
records the autoencoder (its SPEC and the SHA-256 of its files) and the latents' per-channel shift and scale
measured on this data, and the latent of each mirrored image is stored too (``flipped-00000.npy``, ...; see
``prepare_latents``). Encoding is slow, so it is resumable: the work goes to ``.OUT.partial`` beside OUT, committed
every few dozen images, and the same command run again continues where an interrupted one stopped; a finished
OUT is opened, not made again. ``latent_cache`` does the same for a folder into resdiff's cache.

Why .npy: it is NumPy's own documented format (a short header, then the raw array), ``np.load(mmap_mode="r")``
maps it, any tool reads it, and a mapped file is shared by every process of a machine through the page cache.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .autoencoder import Autoencoder, ChannelStats, LatentNorm, load_autoencoder
from .choices import IMAGE_CHANNELS
from .shapes import image_shape, is_image_size, one_number, shape_name
from .data import (
    IMAGE_EXTENSIONS, why_unusable, find_images, class_labels, fit_image, open_image, to_model_range,
)
from .errors import ArgumentParser, UsageError, one_line, run_cli
from .files import cache_root, human_size, write_atomic, write_problem

__all__ = ["PreparedImages", "is_prepared", "prepare", "prepare_latents", "latent_cache", "main"]

SHARD_BYTES = 1024**3  # images per shard file: as many as fit in about 1 GiB
_CHUNK = 256  # images decoded per round of thread-pool work (bounds memory)


# ----------------------------------------------------------------------------- the format, and its reader

PREPARED_FORMAT = "resdiff-prepared"
PREPARED_VERSION = 1  # pixels: uint8 shards
LATENT_VERSION = 2  # latents: float16 shards and index.json's "latent" record (a reader of version 1 refuses them)
PREPARED_INDEX = "index.json"
IMAGE_SHARDS, FLIPPED_SHARDS = "images", "flipped"  # shard file names: images-00000.npy, flipped-00000.npy, ...


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a folder that `python -m resdiff.prepare` wrote (it holds index.json)."""
    return (Path(path) / PREPARED_INDEX).is_file()


def _damaged(path: Path, what: str) -> UsageError:
    return UsageError(f"prepared dataset file {path} is {what}; prepare the dataset again "
                      f"(python -m resdiff.prepare SOURCE {path.parent})")


class PreparedImages(torch.utils.data.Dataset):
    """A prepared dataset: uint8 (C, H, W) images, or float16 (C, h, w) latents of an autoencoder, memory-mapped
    from NumPy .npy shards, with their labels.

    Layout (written by ``resdiff.prepare``): ``index.json`` (format, version, image_size [H, W], channels, classes,
    the source folder, its files and the skipped ones, the shards with their counts), ``labels.npy`` int64 (N,),
    and ``images-00000.npy``, ... uint8 (n_k, C, H, W), in the order of ``files``. Items are copies of rows of
    the maps, so every process of a machine reads one copy of the data from the page cache; none is loaded
    into private memory. Checked on opening: the index, each shard's header, shape and exact file size, the
    labels. A damaged or truncated file is one UsageError line that names it.

    A latent dataset (version 2) has float16 (n_k, C, h, w) shards and index.json's ``latent`` record: the
    autoencoder (``autoencoder``: its SPEC, kind and file digests), the latent shape, the normalisation training
    uses (``norm``, a ``LatentNorm``; the record keeps the autoencoder's own one too) and, unless prepared with
    --no-flip, ``flipped-00000.npy``, ...: row i of flipped-k is the latent of the mirrored image of row i of
    images-k (an encoder is not mirror-symmetric, so mirroring a latent would not do). ``image_size`` and
    ``channels`` are still the images' (what the autoencoder decodes to). ``flipped(i)`` gives the item of the
    mirrored image (the batches choose which items to flip: ``resdiff.batches``).
    """

    def __init__(self, root: str | Path, image_size: int | Sequence[int] | None = None,
                 channels: int | None = None) -> None:
        self.root = Path(root)
        index_file = self.root / PREPARED_INDEX
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            if index.get("format") != PREPARED_FORMAT:
                raise ValueError("not a resdiff prepared-dataset index")
            if index.get("version") not in (PREPARED_VERSION, LATENT_VERSION):
                raise ValueError(f"version {index.get('version')!r}, this resdiff reads {PREPARED_VERSION} and "
                                 f"{LATENT_VERSION}")
            self.shape = image_shape(index["image_size"])
            self.channels, self.classes = int(index["channels"]), list(index["classes"])
            self.source = Path(index["source"])
            rel_files, shards = list(index["files"]), list(index["shards"])
            counts = [int(sh["count"]) for sh in shards]
            self.skipped = [(self.source / f, why) for f, why in index.get("skipped", [])]
            self.latent = dict(index["latent"]) if index["version"] == LATENT_VERSION else None
            if self.latent is None:
                self.item_shape, self.dtype, flipped = (self.channels, *self.shape), np.dtype(np.uint8), None
                self.norm: LatentNorm | None = None
            else:
                self.item_shape = tuple(int(v) for v in self.latent["shape"])
                self.dtype = np.dtype(self.latent["dtype"])
                self.norm = LatentNorm.from_dict(self.latent["norm"][self.latent["norm"]["use"]])
                flipped = self.latent["flips"]["shards"]
                if flipped is not None and [int(sh["count"]) for sh in flipped] != counts:
                    raise ValueError("its flipped shards do not match its shards")
            if len(self.item_shape) != 3:
                raise ValueError(f"item shape {list(self.item_shape)} is not (C, H, W)")
        except FileNotFoundError:
            raise UsageError(f"{index_file} is missing; {self.root} is not a prepared dataset") from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise _damaged(index_file, f"damaged ({one_line(err, 120)})") from None
        if len(rel_files) != sum(counts):
            raise _damaged(index_file, f"inconsistent: {len(rel_files)} files but {sum(counts)} images in its shards")
        self.image_size = one_number(self.shape)
        if image_size is not None and image_shape(image_size) != self.shape:
            raise UsageError(
                f"{self.root} was prepared at {shape_name(self.shape)}, but data.image_size is {shape_name(image_size)}; "
                f"set data.image_size={shape_name(self.shape)} or prepare again with --image-size {shape_name(image_size)}")
        if channels is not None and channels != self.channels:
            raise UsageError(
                f"{self.root} was prepared with {self.channels} channel(s), but data.image_channels is {channels}; "
                f"set data.image_channels={self.channels} or prepare again with --channels {channels}")
        self.files = [self.source / f for f in rel_files]
        self.cached = True  # nothing is decoded per item
        what = "" if self.latent is None else f" latents of {self.autoencoder['spec']}"
        self.mode = (f"prepared{what}, memory-mapped from {self.root} ({self._nbytes(counts) / 2**30:.2f} GiB; the "
                     "processes of this machine share one copy through the page cache)")
        self._shard_files = [self.root / str(sh["file"]) for sh in shards]
        self._flipped_files = None if flipped is None else [self.root / str(sh["file"]) for sh in flipped]
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
        self._maps, self._flipped_maps = self._open()

    @property
    def autoencoder(self) -> dict | None:
        """The autoencoder a latent dataset was encoded with (``Autoencoder.record()``); None for pixels."""
        return None if self.latent is None else self.latent["autoencoder"]

    @property
    def flips_stored(self) -> bool:
        """Whether the latents of the mirrored images are stored (pixels are mirrored exactly as they are read)."""
        return self.latent is None or self._flipped_files is not None

    def _nbytes(self, counts: Sequence[int]) -> int:
        copies = 2 if self.latent is not None and self.latent["flips"]["shards"] is not None else 1
        return sum(counts) * int(np.prod(self.item_shape)) * self.dtype.itemsize * copies

    def _open(self) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Memory-map every shard (and flipped shard), checking its header, shape and size."""
        counts = [b - a for a, b in zip(self._starts, self._starts[1:])]
        maps = [self._map(path, n) for path, n in zip(self._shard_files, counts)]
        if self._flipped_files is None:
            return maps, None
        return maps, [self._map(path, n) for path, n in zip(self._flipped_files, counts)]

    def _map(self, path: Path, n: int) -> np.ndarray:
        want = (n, *self.item_shape)
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
        if tuple(shape) != want or dtype != self.dtype or fortran:
            raise _damaged(path, f"{dtype} {tuple(shape)}, expected {self.dtype} {want}")
        nbytes = int(np.prod(want)) * self.dtype.itemsize
        if size != offset + nbytes:
            raise _damaged(path, f"{size} bytes, expected {offset + nbytes} (truncated or damaged)")
        return np.memmap(path, self.dtype, "r", offset=offset, shape=want) if n else np.zeros(want, self.dtype)

    def __getstate__(self) -> dict:
        """Loader workers started by spawn map the files again instead of receiving a pickled copy of the data."""
        state = dict(self.__dict__)
        state["_maps"] = state["_flipped_maps"] = None
        return state

    def __len__(self) -> int:
        return len(self.files)

    def stored(self, i: int, flipped: bool = False) -> torch.Tensor:
        """Row i as stored, a contiguous copy: the uint8 image (C, H, W), or the latent (C, h, w) (``flipped``: the
        latent of the mirrored image)."""
        if self._maps is None:
            self._maps, self._flipped_maps = self._open()
        if not 0 <= i < len(self.files):
            raise IndexError(f"image {i} of {len(self.files)}")
        if flipped and self._flipped_maps is None:
            raise ValueError(f"{self.root} holds no flipped latents")
        k = bisect.bisect_right(self._starts, i) - 1
        return torch.from_numpy(np.array((self._flipped_maps if flipped else self._maps)[k][i - self._starts[k]]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Item i and its class label: the uint8 image (C, H, W), or the float16 raw latent (C, h, w) (normalise it
        with ``norm``)."""
        return self.stored(i), self.labels[i]

    def flipped(self, i: int) -> tuple[torch.Tensor, int]:
        """Item i of the mirrored image: the image mirrored left-right, or the stored latent of the mirrored image
        (a ValueError when the dataset was prepared with --no-flip)."""
        return (self.stored(i).flip(-1) if self.latent is None else self.stored(i, flipped=True)), self.labels[i]


# ----------------------------------------------------------------------------- the writer


def _finish_shard(path: Path, count: int, item: tuple[int, int, int], dtype: np.dtype) -> None:
    """Rewrite a shard's .npy header from its capacity to the ``count`` items it got, and cut the file there.

    NumPy pads every header so that the first dimension can grow to 21 digits without moving the data, so the
    header keeps its length; that is checked."""
    with open(path, "r+b") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
        f.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count, *item)}
        np.lib.format.write_array_header_1_0(f, header)
        if f.tell() != offset:
            raise RuntimeError(f"the .npy header of {path} changed length ({offset} -> {f.tell()})")
        f.truncate(offset + count * int(np.prod(item)) * dtype.itemsize)


def _check_space(out: Path, count: int, item_bytes: int, what: str) -> None:
    """Refuse, before anything is written, a dataset the disk of ``out`` has no room for: the shards are memory
    maps, and a write into one the disk cannot hold kills the process with SIGBUS, no error to catch.
    ``item_bytes``: the shard bytes of one image; ``what``: how the images are stored, for the message."""
    needed = count * (item_bytes + 8 + 256) + 2**16  # the items, their int64 labels, the index, headers
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # the disk it will be on: its nearest existing folder
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise UsageError(f"cannot read the free space of {folder} ({err.strerror}); choose another OUT") from None
    if free < needed:
        raise UsageError(
            f"not enough free disk space for {out}: {human_size(free)} free in {folder}, but {count} image files "
            f"{what} take about {human_size(needed)}; free some space there or choose another OUT"
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
    """The shard files of a dataset being written into ``folder``: PREFIX-00000.npy, ... of at most ``per_shard``
    items each, every one reserved on disk when it opens (``_reserve``) and cut to its count when it closes.

    Every shard but the last is full (a shard opens with room for all the files still to come, at most
    ``per_shard``), so the number of items written says which shard is open and how full: ``resume`` reopens it."""

    def __init__(self, folder: Path, item: tuple[int, int, int], per_shard: int, dtype: np.dtype = np.dtype(np.uint8),
                 prefix: str = IMAGE_SHARDS):
        self.folder, self.item, self.per_shard, self.prefix = folder, item, per_shard, prefix
        self.dtype = np.dtype(dtype)
        self.written: list[dict] = []  # {"file", "count"} of each closed shard: the index's "shards"
        self.shard, self.path, self.filled = None, None, 0

    def _name(self, k: int) -> Path:
        return self.folder / f"{self.prefix}-{k:05d}.npy"

    def resume(self, count: int) -> None:
        """Continue after ``count`` items that an earlier run wrote (and committed) into this folder."""
        full, self.filled = divmod(count, self.per_shard)
        self.written = [{"file": self._name(k).name, "count": self.per_shard} for k in range(full)]
        if self.filled:
            self.path = self._name(full)
            self.shard = np.lib.format.open_memmap(self.path, "r+")

    def add(self, row: np.ndarray, left: int) -> None:
        """One item (C, H, W); ``left`` files (this one included) are still to come, the size of a last shard."""
        if self.shard is None or self.filled == self.shard.shape[0]:
            self.close()
            self.path = self._name(len(self.written))
            capacity = min(self.per_shard, left)
            self.shard = np.lib.format.open_memmap(self.path, "w+", self.dtype, (capacity, *self.item))
            _reserve(self.path)
            self.filled = 0
        self.shard[self.filled] = row
        self.filled += 1

    def flush(self) -> None:
        """Put what was added on disk (before a commit says it is there)."""
        if self.shard is not None:
            self.shard.flush()

    def close(self) -> None:
        if self.shard is None:
            return
        self.shard.flush()
        self.shard = None
        _finish_shard(self.path, self.filled, self.item, self.dtype)
        self.written.append({"file": self.path.name, "count": self.filled})


def _decoder(shape: tuple[int, int], channels: int,
             background: tuple[int, int, int]) -> Callable[[Path], np.ndarray | str]:
    """Decode one file as training does (centre crop): uint8 (C, H, W), or why it cannot be used."""
    def decode(path: Path) -> np.ndarray | str:
        try:
            return fit_image(open_image(path), shape, channels, background).numpy()
        except Exception as err:  # any decoder failure means: skip this file, as training does
            return why_unusable(path, err)

    return decode


def _decoded_chunks(
    candidates: list[Path], source: Path, decode: Callable[[Path], np.ndarray | str], warn: Callable[[str], None],
    start: int = 0, chunk: int = _CHUNK,
) -> Iterator[tuple[int, list[int], list[np.ndarray], list[tuple[str, str]]]]:
    """Decode ``candidates[start:]`` on a thread pool, a chunk at a time (so memory stays bounded). Per chunk: the
    index of the next candidate, the indices of the candidates kept, their pixels, and (name below ``source``,
    why) of each skipped, which ``warn`` hears about."""
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for begin in range(start, len(candidates), chunk):
            part = candidates[begin:begin + chunk]
            kept, pixels, skipped = [], [], []
            for k, result in enumerate(pool.map(decode, part)):
                if isinstance(result, str):
                    skipped.append((part[k].relative_to(source).as_posix(), result))
                    warn(f"skipping {part[k]}: {result}")
                    continue
                kept.append(begin + k)
                pixels.append(result)
            yield begin + len(part), kept, pixels, skipped


def _scan(source: Path, class_cond: bool, warn: Callable[[str], None]) -> tuple[list[Path], list[int], list[str]]:
    """The image files below ``source`` in training's order, their labels and the class names."""
    candidates = find_images(source, warn)
    if not candidates:
        raise UsageError(f"no image files in {source} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return candidates, *class_labels(source, candidates, class_cond)


def _check_kept(source: Path, candidates: list[Path], kept: list[int], skipped: list[tuple[str, str]],
                warn: Callable[[str], None]) -> None:
    """After decoding: say how many files were skipped; refuse a folder of which none could be read."""
    if skipped:
        warn(f"skipped {len(skipped)} of {len(candidates)} files in {source}")
    if not kept:
        raise UsageError(f"no readable images in {source}: all {len(candidates)} image files were skipped "
                         "(see the warnings above); add images pillow can open")


def _write_labels_and_index(folder: Path, source: Path, candidates: list[Path], kept: list[int], labels: list[int],
                            skipped: list[tuple[str, str]], index: dict) -> None:
    """The end of every prepared dataset: labels.npy of the files kept, and index.json: ``index`` with the source,
    its files and the skipped ones put before the shards."""
    np.save(folder / "labels.npy", np.asarray([labels[i] for i in kept], dtype=np.int64))
    last = ("shards", "latent")
    index = {"format": PREPARED_FORMAT, **{k: v for k, v in index.items() if k not in last},
             "source": str(source.resolve()), "files": [candidates[i].relative_to(source).as_posix() for i in kept],
             "skipped": [list(s) for s in skipped], **{k: index[k] for k in last if k in index}}
    (folder / PREPARED_INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _check_source(source: Path, out: Path, image_size: int | Sequence[int], channels: int) -> None:
    """The parts of a request to prepare that need nothing read or written."""
    if not is_image_size(image_size):
        raise UsageError(f"image size must be a positive integer or a (height, width) pair, got {image_size!r}")
    if channels not in IMAGE_CHANNELS:
        raise UsageError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not source.is_dir():
        raise UsageError(f"image folder {source} does not exist or is not a folder; pass a folder that holds images")
    if out.resolve().is_relative_to(source.resolve()):
        raise UsageError(f"{out} is inside the image folder {source}; put the prepared dataset elsewhere")


def _already_exists(out: Path) -> UsageError:
    return UsageError(f"{out} already exists; choose a new folder for the prepared dataset, or remove it")


def prepare(
    source: str | Path, out: str | Path, image_size: int | Sequence[int] = 32, channels: int = 3, *,
    class_cond: bool = False, background: tuple[int, int, int] = (255, 255, 255), shard_bytes: int = SHARD_BYTES,
    warn: Callable[[str], None] | None = None,
) -> PreparedImages:
    """Decode every image below ``source`` into a prepared dataset in ``out`` (which must not exist yet, or be an
    empty folder); returns it opened. ``warn`` hears each file skipped (default: stderr)."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    source, out = Path(source), Path(out)
    _check_source(source, out, image_size, channels)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _already_exists(out)
    shape = image_shape(image_size)
    item = (channels, *shape)
    candidates, labels, classes = _scan(source, class_cond, warn)
    _check_space(out, len(candidates), int(np.prod(item)), f"at {item[1]}x{item[2]}, {item[0]} channel(s)")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards = _Shards(tmp, item, max(1, shard_bytes // int(np.prod(item))))
        kept, skipped = [], []
        for _, here, pixels, gone in _decoded_chunks(candidates, source, _decoder(shape, channels, background), warn):
            for i, x in zip(here, pixels):
                shards.add(x, len(candidates) - i)
            kept += here
            skipped += gone
        shards.close()
        _check_kept(source, candidates, kept, skipped, warn)
        _write_labels_and_index(tmp, source, candidates, kept, labels, skipped, {
            "version": PREPARED_VERSION, "image_size": list(shape), "channels": channels, "crop": "center",
            "class_cond": class_cond, "classes": classes, "background": list(background), "shards": shards.written,
        })
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


# ----------------------------------------------------------------------------- the latent writer

_LATENT_CHUNK = 64  # images encoded between two commits of a latent dataset (what an interruption can lose)
PROGRESS = "progress.jsonl"  # in .OUT.partial: a header line, then one line per committed chunk
NORM_WHY = ("a diffusers autoencoder's own scaling (its config's scaling_factor, shift_factor or latents_mean/std) is "
            "what its pipelines apply, so a model trained on it exports as a diffusers pipeline; a TAESD-family pair "
            "has none, so training uses the shift and scale measured on this data, which give the mean 0 and "
            "variance 1 per channel the noise schedule assumes (both are kept)")
FLIP_RULE = ("row i of flipped-K.npy is the latent of the mirrored image of row i of images-K.npy: a flipped item is "
             "read there; mirroring a latent is not the latent of the mirrored image (the encoder is not "
             "mirror-symmetric)")


@dataclass
class _LatentJob:
    """A latent dataset to make, resolved: the files, their labels, the autoencoder, and the digest of all that
    decides its bytes (the listing with sizes and modification times, the settings, the autoencoder's files)."""

    source: Path
    shape: tuple[int, int]
    channels: int
    class_cond: bool
    background: tuple[int, int, int]
    flips: bool
    shard_bytes: int
    ae: Autoencoder
    candidates: list[Path]
    labels: list[int]
    classes: list[str]
    digest: str = ""

    def __post_init__(self) -> None:
        listing = []
        for path in self.candidates:
            try:
                st = path.stat()
                listing.append([path.relative_to(self.source).as_posix(), st.st_size, st.st_mtime_ns])
            except OSError:  # gone since the scan: decoding will skip it
                listing.append([path.relative_to(self.source).as_posix(), -1, 0])
        text = json.dumps({"version": LATENT_VERSION, "files": listing, "image_size": list(self.shape),
                           "channels": self.channels, "class_cond": self.class_cond,
                           "background": list(self.background), "flips": self.flips, "shard_bytes": self.shard_bytes,
                           "autoencoder": self.ae.fingerprint, "encoder_dtype": str(self.ae.dtype)})
        self.digest = hashlib.sha256(text.encode()).hexdigest()

    @property
    def latent(self) -> tuple[int, int, int]:
        return self.ae.latent_shape(self.shape)

    @property
    def per_shard(self) -> int:
        return max(1, self.shard_bytes // (int(np.prod(self.latent)) * 2))


def _latent_job(source: Path, image_size: int | Sequence[int], autoencoder: Autoencoder | str | Path, channels: int,
                class_cond: bool, background: tuple[int, int, int], flips: bool, shard_bytes: int,
                warn: Callable[[str], None]) -> _LatentJob:
    if channels != 3:
        raise UsageError(f"an autoencoder takes RGB images, but channels is {channels}; prepare latents with "
                         f"--channels 3 (grayscale images are converted to RGB)")
    ae = autoencoder if isinstance(autoencoder, Autoencoder) else load_autoencoder(autoencoder)
    shape = image_shape(image_size)
    ae.latent_shape(shape)  # a size the autoencoder cannot take is refused before the folder is read
    candidates, labels, classes = _scan(source, class_cond, warn)
    return _LatentJob(source, shape, channels, class_cond, tuple(background), flips, shard_bytes, ae, candidates,
                      labels, classes)


@contextlib.contextmanager
def _locked(folder: Path, warn: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock): one process writes a dataset, others wait for it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warn(f"waiting for another process that is preparing {folder} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _finished(out: Path, digest: str) -> PreparedImages | None:
    """``out`` opened when it is the finished dataset ``digest`` names; None when there is nothing there."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        recorded = json.loads((out / PREPARED_INDEX).read_text(encoding="utf-8"))["latent"]["request"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded != digest:
        raise UsageError(f"{out} already exists and is not the latent dataset asked for (other files, image size, "
                         f"settings or autoencoder); choose a new folder for the prepared dataset, or remove it")
    return PreparedImages(out)


def _progress(work: Path, digest: str, warn: Callable[[str], None]) -> tuple[int, list[int], list[tuple[str, str]]]:
    """Where an earlier run on ``work`` stopped: the next candidate, the candidates kept and those skipped. The
    log's committed lines are kept (a torn last line is dropped); work for another request is cleared."""
    log, lines = work / PROGRESS, []
    try:
        for line in log.read_text(encoding="utf-8").splitlines(keepends=True):
            entry = json.loads(line) if line.endswith("\n") else None
            if not isinstance(entry, dict) or not (lines or entry.get("request") == digest):
                break
            if lines and not {"next", "kept", "skipped"} <= set(entry):
                break
            lines.append(entry)
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    if not lines:
        if any(work.iterdir()):
            warn(f"starting over in {work}: its earlier work was for other files, settings or autoencoder")
            for path in work.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        lines = [{"request": digest}]
    write_atomic(log, lambda tmp: tmp.write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8"))
    done = lines[1:]
    return (done[-1]["next"] if done else 0, [i for e in done for i in e["kept"]],
            [tuple(s) for e in done for s in e["skipped"]])


def _commit(work: Path, entry: dict) -> None:
    """Record a chunk as done, on disk before the next one starts."""
    with open(work / PROGRESS, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _measured_norm(work: Path, shards: list[dict], channels: int, images: int, flips: bool) -> LatentNorm:
    """Per-channel shift and scale of every latent stored (as stored: float16), in float64."""
    stats = ChannelStats(channels)
    for shard in shards:
        rows = np.load(work / shard["file"], mmap_mode="r")
        for i in range(0, len(rows), 256):
            stats.add(rows[i:i + 256])
    mirrored = " and of their mirror images" if flips else ""
    return stats.norm(f"measured on the latents of the {images} images of this dataset{mirrored} (mean and standard "
                      f"deviation per channel, float64)")


def _encode_into(job: _LatentJob, out: Path, work: Path, batch_size: int, warn: Callable[[str], None],
                 progress: bool) -> tuple[list[int], list[tuple[str, str]], _Shards, _Shards | None]:
    """Decode and encode the files ``work`` (the folder that becomes ``out``) has not committed yet into its
    shards, committing every chunk."""
    start, kept, skipped = _progress(work, job.digest, warn)
    n, latent = len(job.candidates), job.latent
    if start:
        warn(f"resuming: {start} of {n} image files of {job.source} are done in {work}")
    copies = 2 if job.flips else 1
    mirrored = " (and those of their mirror images)" if job.flips else ""
    _check_space(out, n - start, int(np.prod(latent)) * 2 * copies,
                 f"as {'x'.join(map(str, latent))} float16 latents{mirrored}")
    images = _Shards(work, latent, job.per_shard, np.dtype(np.float16), IMAGE_SHARDS)
    flipped = _Shards(work, latent, job.per_shard, np.dtype(np.float16), FLIPPED_SHARDS) if job.flips else None
    for shards in filter(None, (images, flipped)):
        shards.resume(len(kept))
    decode = _decoder(job.shape, job.channels, job.background)
    from tqdm.auto import tqdm

    with tqdm(total=n, initial=start, unit="img", desc=f"encoding {job.source.name}", disable=not progress,
              dynamic_ncols=True) as bar:
        for end, here, pixels, gone in _decoded_chunks(job.candidates, job.source, decode, warn, start, _LATENT_CHUNK):
            x = to_model_range(torch.from_numpy(np.stack(pixels))) if pixels else None  # (n, 3, H, W) in [-1, 1]
            for b in range(0, len(here), batch_size):
                batch, lefts = x[b:b + batch_size], [n - i for i in here[b:b + batch_size]]
                for shards, flip in ((images, False), (flipped, True)):
                    if shards is None:
                        continue
                    z = job.ae.encode_many(batch.flip(3) if flip else batch, batch_size).to(torch.float16).numpy()
                    if not np.isfinite(z).all():
                        raise UsageError(f"the autoencoder {job.ae.spec} gave non-finite latents (beyond float16) for "
                                         f"{job.candidates[here[b]]} or the files after it; check the autoencoder")
                    for row, left in zip(z, lefts):
                        shards.add(row, left)
                bar.update(len(batch))
            bar.update(len(gone))
            for shards in filter(None, (images, flipped)):
                shards.flush()
            _commit(work, {"next": end, "kept": here, "skipped": gone})
            kept += here
            skipped += gone
    for shards in filter(None, (images, flipped)):
        shards.close()
    return kept, skipped, images, flipped


def _write_latents(job: _LatentJob, out: Path, batch_size: int, warn: Callable[[str], None],
                   progress: bool) -> PreparedImages:
    """Make (or continue, or find finished) the latent dataset ``job`` in ``out``; returns it opened."""
    done = _finished(out, job.digest)
    if done is not None:
        return done
    work = out.with_name(f".{out.name}.partial")
    work.mkdir(parents=True, exist_ok=True)
    with _locked(work, warn):
        done = _finished(out, job.digest)  # another process finished it while this one waited
        if done is not None:
            shutil.rmtree(work, ignore_errors=True)
            return done
        try:
            kept, skipped, images, flipped = _encode_into(job, out, work, batch_size, warn, progress)
            try:
                _check_kept(job.source, job.candidates, kept, skipped, warn)
            except UsageError:
                shutil.rmtree(work, ignore_errors=True)  # nothing worth keeping
                raise
            measured = _measured_norm(work, images.written + (flipped.written if flipped else []), job.latent[0],
                                      len(kept), job.flips)
            norm = {"use": "data" if job.ae.kind == "taesd" else "autoencoder", "why": NORM_WHY,
                    "data": measured.to_dict(), "autoencoder": job.ae.own_norm.to_dict()}
            _write_labels_and_index(work, job.source, job.candidates, kept, job.labels, skipped, {
                "version": LATENT_VERSION, "image_size": list(job.shape), "channels": job.channels, "crop": "center",
                "class_cond": job.class_cond, "classes": job.classes, "background": list(job.background),
                "shards": images.written, "latent": {
                    "request": job.digest, "autoencoder": job.ae.record(), "shape": list(job.latent),
                    "dtype": "float16", "encoder_dtype": str(job.ae.dtype).removeprefix("torch."), "norm": norm,
                    "flips": {"shards": flipped.written if flipped else None,
                              "rule": FLIP_RULE if flipped else "not stored (prepared with --no-flip)"},
                }})
            (work / PROGRESS).unlink()
            if out.exists():
                out.rmdir()  # the empty folder it was allowed to be
            os.replace(work, out)
        except OSError as err:  # the disk filled up or went away: what was committed stays, to continue from
            raise UsageError(f"cannot write the prepared dataset {out} ({write_problem(err)}); what was encoded is "
                             f"kept in {work}: free some space and run the same command again to continue") from None
        except KeyboardInterrupt:
            warn(f"interrupted; what was encoded is kept in {work}: run the same command again to continue")
            raise
    return PreparedImages(out)


def prepare_latents(
    source: str | Path, out: str | Path, image_size: int | Sequence[int], autoencoder: Autoencoder | str | Path, *,
    channels: int = 3, class_cond: bool = False, background: tuple[int, int, int] = (255, 255, 255),
    flips: bool = True, batch_size: int = 16, shard_bytes: int = SHARD_BYTES, warn: Callable[[str], None] | None = None,
    progress: bool = True,
) -> PreparedImages:
    """Encode every image below ``source`` (decoded as training does) with ``autoencoder`` (an ``Autoencoder`` or a
    SPEC) into a latent dataset in ``out``; returns it opened (``PreparedImages``).

    With ``flips`` the latent of each mirrored image is stored too. ``batch_size`` images are encoded at a time,
    on the autoencoder's device. Resumable: an interrupted run leaves its committed work in ``.OUT.partial`` and
    the same call continues it (with the same batch size, to the same bytes); a finished ``out`` made from the same
    files, settings and autoencoder is opened, not made again; any other existing ``out`` is refused. Processes
    that ask for the same ``out`` at once wait for the one that writes it. ``warn`` hears each file skipped and
    every resume (default: stderr); ``progress`` shows a progress bar (images/s) on stderr."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    source, out = Path(source), Path(out)
    _check_source(source, out, image_size, channels)
    if out.exists() and not out.is_dir():
        raise _already_exists(out)
    job = _latent_job(source, image_size, autoencoder, channels, class_cond, background, flips, shard_bytes, warn)
    return _write_latents(job, out, batch_size, warn, progress)


def latent_cache(
    source: str | Path, image_size: int | Sequence[int], autoencoder: Autoencoder | str | Path, *,
    channels: int = 3, class_cond: bool = False, background: tuple[int, int, int] = (255, 255, 255),
    flips: bool = True, batch_size: int = 16, warn: Callable[[str], None] | None = None, progress: bool = True,
) -> PreparedImages:
    """The latent dataset of the image folder ``source``, made by ``prepare_latents`` once into resdiff's cache
    (``cache_root()/latents/NAME-SIZE-DIGEST``) and found there afterwards: the digest covers the folder's listing
    (names, sizes, modification times), the settings and the autoencoder's files, so a changed folder or another
    autoencoder gets its own. Every process of a run may call it at once: one encodes, the others wait for it."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    source = Path(source)
    _check_source(source, cache_root(), image_size, channels)
    job = _latent_job(source, image_size, autoencoder, channels, class_cond, background, flips, SHARD_BYTES, warn)
    name = f"{source.resolve().name or 'images'}-{shape_name(job.shape)}-{job.digest[:16]}"
    return _write_latents(job, cache_root() / "latents" / name, batch_size, warn, progress)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="resdiff.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="DIR", help="image folder (searched recursively)")
    p.add_argument("out", metavar="OUT", help="new folder for the prepared dataset")
    p.add_argument("--config", help="take data.image_size, data.image_channels, data.class_cond and data.random_flip "
                                     "from this YAML config")
    p.add_argument("--image-size", help="training shape: one side (64) or HEIGHTxWIDTH (64x128)")
    p.add_argument("--channels", type=int, help="1 (grayscale) or 3 (RGB)")
    p.add_argument("--class-cond", action="store_true", default=None, help="labels from the first subfolder (one per class)")
    p.add_argument("--autoencoder", metavar="SPEC", help="store the latents of this autoencoder: a folder with a "
                   "NAME_encoder.pth/NAME_decoder.pth pair (DIR/NAME picks one), a diffusers AutoencoderKL or "
                   "AutoencoderTiny folder, or a Hub model id")
    p.add_argument("--no-flip", action="store_true", help="latents: do not store those of the mirrored images (half "
                   "the disk; training then needs data.random_flip=false)")
    p.add_argument("--batch-size", type=int, default=16, help="latents: images encoded at a time (default 16)")
    p.add_argument("--device", help="latents: where the autoencoder runs (default: the GPU if there is one)")
    args = p.parse_args(argv)
    from .config import load_config
    from .hardware import check_device, default_device

    overrides = [f"data.{k}={v}" for k, v in (("image_size", args.image_size), ("image_channels", args.channels),
                                                ("class_cond", args.class_cond),
                                                ("random_flip", False if args.no_flip else None)) if v is not None]
    d = load_config(args.config, overrides).data
    if args.autoencoder is None:
        if args.no_flip or args.device:
            raise UsageError("--no-flip and --device are for latents; add --autoencoder SPEC, or leave them out")
        data = prepare(args.source, args.out, d.image_size, d.image_channels, class_cond=d.class_cond)
        what = f"images{f', {len(data.skipped)} skipped' if data.skipped else ''} at {shape_name(data.shape)}, " \
               f"{data.channels} channel(s)"
    else:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        ae = load_autoencoder(args.autoencoder, check_device(args.device) or default_device())
        data = prepare_latents(args.source, args.out, d.image_size, ae, channels=d.image_channels,
                               class_cond=d.class_cond, flips=d.random_flip, batch_size=args.batch_size)
        what = f"images{f', {len(data.skipped)} skipped' if data.skipped else ''} at {shape_name(data.shape)} as " \
               f"{'x'.join(map(str, data.item_shape))} latents of {args.autoencoder}"
    print(f"prepared {len(data)} {what}, into {args.out}; train with: python train.py --data {args.out} "
          f"data.image_size={shape_name(data.shape)}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
