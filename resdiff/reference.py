"""The images to score and a data set's reference features: folders and .npz files read as training reads them,
and their features and statistics cached under $RESDIFF_CACHE.

- `image_dataset` / `iter_images` / `load_images`: images from an .npz (arr_0 uint8 (N, H, W, C), what
  `sample.py --npz` and OpenAI's tools write) or an image folder, prepared as training prepares it.
- `reference_features` / `reference_stats(folder_or_npz, net, ...)`: features and statistics of a data set,
  shared out across processes and cached under a key of its files, preparation and network.
- `reference_images`: the images behind those features' rows, for `resdiff.metrics.nearest_pairs_image`.

`resdiff.data` (for folders) is imported when used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .shapes import image_shape
from .errors import UsageError, one_line
from .features import NPZ_ERRORS, FeatureStats, extract_features, network_id
from .files import cache_root
from .images import GRID_NAME, image_name, load_npz
from .processes import gather_shares, on_main, rank_world

__all__ = ["image_dataset", "load_images", "iter_images", "reference_stats", "reference_features", "reference_images"]

STATS_VERSION = 1  # part of the reference-statistics cache key: bump when the preparation changes

# ----------------------------------------------------------------------------- images and reference statistics


def _image_files(root: Path) -> list[Path]:
    """Image files below root, as ImageFolder lists them: resdiff.data.find_images, the one folder walker (sorted,
    hidden names skipped, symlinked folders read once, so a symlink loop ends); ImageFolder warns about what it skips."""
    from .data import find_images

    return find_images(root, lambda _message: None)


def _is_sample_grid(path: Path, root: Path) -> bool:
    """sample.py's overview grid beside its numbered samples: not an image to score."""
    return path.parent == root and path.name == GRID_NAME and (root / image_name(0)).exists()


def _folder_size(root: Path, files: list[Path]) -> int | tuple[int, int]:
    """The one size of a folder's images: their side, or (height, width) if they are not square; mismatched sizes
    are a UsageError."""
    from PIL import Image

    sizes: dict[tuple[int, int], Path] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
        except Exception:  # unreadable: ImageFolder reports it
            continue
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = sizes.items()
            raise UsageError(f"images in {root} have different sizes ({f1.name} {s1[0]}x{s1[1]}, {f2.name} "
                             f"{s2[0]}x{s2[1]}); pass image_size to resize and crop them as training does")
    if not sizes:
        raise UsageError(f"no readable images in {root}")
    (w, h), = sizes
    return w if w == h else (h, w)


def _source(source: str | Path) -> tuple[Path, str]:
    path = Path(source)
    if path.is_dir():
        return path, "folder"
    if path.is_file() and path.suffix.lower() == ".npz":
        return path, "npz"
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass an image folder or an .npz of uint8 (N, H, W, C) images")
    raise UsageError(f"{path} is neither a folder nor an .npz file; pass an image folder or an .npz of images")


def image_dataset(source: str | Path, image_size: int | Sequence[int] | None = None, channels: int = 3):
    """The images of a folder or an .npz, indexable by position: uint8 (C, H, W) each (a folder's items are (image, label)).

    A folder is prepared as training prepares it (resdiff.data.ImageFolder: decode, convert to `channels`,
    resize to cover `image_size` (one side or (height, width)), centre crop, no flip); without `image_size` its images must
    all have one size (sample.py's grid.png beside numbered samples is skipped). An .npz holds arr_0
    uint8 (N, H, W, C) and is used as it is (`image_size`, when given, must match). The same object gives
    `nearest_pairs_image` its training images.
    """
    path, kind = _source(source)
    if kind == "npz":
        x = _read_npz(path, load_npz)
        if image_size is not None and tuple(x.shape[2:]) != image_shape(image_size):
            hgt, wid = image_shape(image_size)
            raise UsageError(f"{path} holds {x.shape[2]}x{x.shape[3]} images (height x width), expected {hgt}x{wid}")
        return x
    from .data import ImageFolder

    files = [f for f in _image_files(path) if not _is_sample_grid(f, path)]
    if not files:
        raise UsageError(f"no image files in {path}; add images there")
    size = image_size if image_size is not None else _folder_size(path, files)
    ds = ImageFolder(path, size, channels, random_crop=False, cache=False)
    keep = [k for k, f in enumerate(ds.files) if not _is_sample_grid(f, path)]
    ds.files, ds.labels = [ds.files[k] for k in keep], [ds.labels[k] for k in keep]
    return ds


def iter_images(source: str | Path, image_size: int | Sequence[int] | None = None, channels: int = 3,
                batch_size: int = 256) -> tuple[int, Iterator[torch.Tensor]]:
    """(count, batches of uint8 (B, C, H, W)) of `image_dataset(source, image_size, channels)`."""
    images = image_dataset(source, image_size, channels)
    if isinstance(images, torch.Tensor):
        return len(images), iter(images.split(batch_size))

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            yield torch.stack([images[i][0] for i in range(start, min(start + batch_size, len(images)))])

    return len(images), batches()


def load_images(source: str | Path, image_size: int | Sequence[int] | None = None, channels: int = 3) -> torch.Tensor:
    """All images of a folder or .npz as one uint8 (N, C, H, W) tensor (see iter_images)."""
    _, batches = iter_images(source, image_size, channels)
    return torch.cat(list(batches))


def _read_npz(path: Path, read):
    """``read(path)``, with a damaged .npz (cut off, a flipped bit) as one UsageError line naming it."""
    try:
        return read(path)
    except UsageError:
        raise
    except NPZ_ERRORS as err:
        raise UsageError(f"cannot read {path} (damaged or not an .npz: {one_line(err, 100)}); write it again") from None


def _is_statistics(path: Path) -> bool:
    """Whether an .npz holds statistics (mu, sigma) rather than images (arr_0)."""
    with np.load(path, allow_pickle=False) as data:
        return "mu" in data and "sigma" in data and "arr_0" not in data


def _listing(path: Path, kind: str) -> list:
    """What the cache key sees of a source: each file's relative name, size and modification time."""
    files = [path] if kind == "npz" else _image_files(path)
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(path)) if kind == "folder" else str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def reference_stats(source: str | Path, net: nn.Module, image_size: int | Sequence[int] | None = None, channels: int = 3,
                    batch_size: int = 50, cache: bool = True) -> FeatureStats:
    """Feature statistics of a data set: an image folder, an .npz of images, or a statistics .npz (mu, sigma).
    See `reference_features`, which this is the second half of."""
    return reference_features(source, net, image_size, channels, batch_size, cache)[1]


def _spread(count: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over range(count) (all of them without a limit): a folder sorted by class
    gives every class its share."""
    if limit is None or limit >= count:
        return list(range(count))
    return [i * count // limit for i in range(limit)]


def reference_features(
    source: str | Path, net: nn.Module, image_size: int | Sequence[int] | None = None, channels: int = 3,
    batch_size: int = 50, cache: bool = True, log: Callable[[str], None] | None = None, max_images: int | None = None,
) -> tuple[torch.Tensor | None, FeatureStats]:
    """Features (float32 (N, D)) and statistics of a data set: an image folder, an .npz of images, or a statistics
    .npz (mu, sigma), which gives (None, its statistics): FID can use it, KID and precision/recall cannot.

    Folders are prepared as training prepares them (see iter_images); ``max_images`` takes that many, spread
    evenly through the sorted files. Under torch.distributed every process must call it: each extracts its
    share of the images and all get the result, so no process waits for one doing it all. The result is
    cached in $RESDIFF_CACHE/fid-stats/ under a key made of the files' names, sizes and modification times,
    the image size, channels and max_images, and the network's identity (`network_id`), so a changed, added
    or removed file, another preparation or other weights compute them anew; a damaged cache file is
    computed again. ``log`` hears one line when they are. The network runs where its weights are.
    """
    path, kind = _source(source)
    if kind == "npz" and _read_npz(path, _is_statistics):
        return None, FeatureStats.load(path)

    def key() -> str:
        size = image_size
        if kind == "folder" and size is None:
            size = _folder_size(path, [f for f in _image_files(path) if not _is_sample_grid(f, path)])
        text = json.dumps({"version": STATS_VERSION, "kind": kind, "files": _listing(path, kind), "image_size": size,
                           "channels": channels, "network": network_id(net),
                           **({"max_images": max_images} if max_images is not None else {})})
        return hashlib.sha256(text.encode()).hexdigest()

    rank, world = rank_world()
    before = on_main(key) if cache else None
    cached = cache_root() / "fid-stats" / f"{before[:40]}.npz" if cache else None
    if cached is not None and on_main(cached.is_file):  # the main process decides, so all take one path
        found = _read_cache(cached)
        if on_main(lambda: found is not None):  # a damaged file (as the main process reads it): computed again
            return found if found is not None else _read_cache(cached)
    images = image_dataset(path, image_size, channels)
    chosen = _spread(len(images), max_images)
    if log is not None:
        log(f"reference: extracting the features of {len(chosen)} images of {path} on {world} process(es) "
            f"(cached for the next time)")
    mine = chosen[rank::world]
    batches = _batches(images, mine, batch_size, progress=log is not None and rank == 0)
    local = extract_features(batches, net, batch_size, channels_last=True) if mine else torch.zeros(0, 0)
    features = gather_shares(local, len(chosen))
    stats = FeatureStats.from_features(features)
    rows = {} if isinstance(images, torch.Tensor) else {"rows": np.array([str(images.files[i].relative_to(path)) for i in chosen])}
    stats.rows = list(rows["rows"]) if rows else None
    if cached is not None and rank == 0 and key() == before:  # files changed while reading: keep the result, not the cache
        stats.save(cached, features=features.numpy(), **rows)
    return features, stats


class _FolderRows:
    """A folder's reference images by feature row, each decoded and prepared (as ImageFolder does, centre crop) only
    when asked for: the nearest-pairs picture reads the 32 it shows, not the whole folder."""

    def __init__(self, root: Path, rows: list[str], image_size: int | Sequence[int], channels: int) -> None:
        self.root, self.rows, self.image_size, self.channels = root, rows, image_size, channels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        from .data import fit_image, open_image

        return fit_image(open_image(self.root / self.rows[i]), self.image_size, self.channels)  # (C, H, W)


def reference_images(source: str | Path, stats: FeatureStats, image_size: int | Sequence[int] | None = None,
                     channels: int = 3):
    """The reference images behind `reference_features`' rows, indexable by row (for `nearest_pairs_image`): a folder's
    are decoded one by one when asked for, an .npz's are its array."""
    path, kind = _source(source)
    if kind == "folder" and stats.rows is not None and image_size is not None:
        return _FolderRows(path, stats.rows, image_size, channels)
    return image_dataset(path, image_size, channels)


def _batches(images, indices: list[int], batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    """uint8 batches of the items ``indices``, counted on a progress bar when ``progress``: a folder of a few thousand
    images takes minutes on a CPU."""
    with tqdm(total=len(indices), unit="img", desc="reference -> features", disable=not progress, leave=False) as bar:
        for start in range(0, len(indices), batch_size):
            batch = _stacked(images, indices[start:start + batch_size])
            yield batch
            bar.update(len(batch))  # once the batch's features are done: the next batch is asked for after them


def _stacked(images, indices: list[int]) -> torch.Tensor:
    """uint8 (B, C, H, W) of the items ``indices`` of a tensor or an image dataset."""
    if isinstance(images, torch.Tensor):
        return images[indices]
    return torch.stack([images[i][0] for i in indices])


def _read_cache(cached: Path) -> tuple[torch.Tensor, FeatureStats] | None:
    """Cached (features, statistics), or None when absent or damaged (they are then computed again)."""
    if not cached.is_file():
        return None
    try:
        with np.load(cached, allow_pickle=False) as data:
            features = torch.from_numpy(data["features"])
        return features, FeatureStats.load(cached)
    except (UsageError, *NPZ_ERRORS):
        return None
