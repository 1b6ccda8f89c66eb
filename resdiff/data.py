"""Where training images live: a recursive image folder dataset and a procedurally drawn demo dataset
(the prepared, memory-mapped dataset is ``resdiff.prepare``). What each process draws from them at each step is ``resdiff.batches``.

Images leave this module as uint8 tensors (C, H, W); `to_model_range` maps them to the [-1, 1]
floats the model works in, and `to_uint8` maps model output back.

Shapes: `image_size` is one side (square) or (height, width). Every image is resized (antialiased
bicubic) to the smallest size that covers that shape, keeping its aspect ratio, then cropped to it:
in the centre, or at a random place with `random_crop`.

Caching: `ImageFolder` decodes every file once at construction (that is also how bad files are
found). With center crops the decoded, resized, cropped images are kept as one (N, C, H, W) uint8
tensor. With `random_crop` each image is kept resized to cover (H, W) (the crop window is picked
per item), packed into one flat uint8 buffer. `cache="auto"` keeps them when they need at most
`cache_limit` bytes (`CACHE_LIMIT_BYTES` by default); `True` always keeps them; `False` decodes per
item. A folder that does not fit is read from disk per batch, holding only the batches in flight.

A prepared dataset (decoded once into memory-mapped NumPy .npy files) is read and written in
``resdiff.prepare``, its format in one place.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .choices import IMAGE_CHANNELS
from .errors import UsageError, one_line
from .images import save_png
from .shapes import image_shape, is_image_size

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {"png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"}
)
CACHE_LIMIT_BYTES = 2 * 1024**3  # cache="auto" keeps decoded images in memory up to this size
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_GRAY_MODES = frozenset({"1", "L", "I", "F"}) | _SIXTEEN_BIT_MODES
_CHUNK = 4096  # files validated per batch of thread-pool work (bounds pending results)


def _print_warning(message: str) -> None:
    """Default `warn`: one line on stderr."""
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- decoding


def _check_pixels(im: Image.Image) -> None:
    """Reject images above pillow's decompression-bomb limit (the warning range included)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        raise Image.DecompressionBombError(
            f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}"
        )


def _gray_to_l(im: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float grayscale image to 8-bit 'L' (scaled, not clipped)."""
    a = np.asarray(im).astype(np.float64)
    if im.mode in _SIXTEEN_BIT_MODES:
        a = a / 257.0  # 65535 -> 255, 32768 -> 127.5
    elif im.mode == "I":
        if a.size and a.max() > 255:  # integer data beyond 8 bit: read it as 16 bit
            a = a / 257.0
    elif im.mode == "F":
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:  # float images in [0, 1]
            a = a * 255.0
    a = np.nan_to_num(a, nan=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def has_alpha(im: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha band or a transparent palette/colour key)."""
    return "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info


def _convert(im: Image.Image, channels: int, background: tuple[int, int, int]) -> Image.Image:
    """Convert any pillow mode to 'L' or 'RGB', compositing transparency onto `background`."""
    target = "L" if channels == 1 else "RGB"
    if im.mode in ("I", "F") or im.mode in _SIXTEEN_BIT_MODES:
        im = _gray_to_l(im)  # 16-bit transparency keys are not supported; alpha is ignored here
    elif has_alpha(im):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", im.size, (*background, 255))
        im = Image.alpha_composite(base, rgba).convert("RGB")
    elif im.mode not in _GRAY_MODES and im.mode != "RGB":
        im = im.convert("RGB")  # P, CMYK, YCbCr, ...
    return im.convert(target) if im.mode != target else im


def _resize_cover(im: Image.Image, shape: tuple[int, int]) -> Image.Image:
    """Resize (antialiased bicubic, aspect kept) to the smallest size covering (H, W); upscales small images too.
    For a square that is: the shorter side becomes the side."""
    (hgt, wid), (w, h) = shape, im.size
    scale = max(wid / w, hgt / h)
    new = (max(wid, round(w * scale)), max(hgt, round(h * scale)))
    return im if new == (w, h) else im.resize(new, Image.Resampling.BICUBIC)


def open_image(path: str | Path) -> Image.Image:
    """Decode a file as training does: decompression bombs refused, EXIF orientation applied."""
    with Image.open(path) as im:
        _check_pixels(im)
        im.load()
        return ImageOps.exif_transpose(im)


def _covering(im: Image.Image, image_size: int | Sequence[int], channels: int, background: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (C, h, w): ``im`` converted to ``channels`` and resized to cover ``image_size`` (see `_resize_cover`)."""
    im = _resize_cover(_convert(im, channels, background), image_shape(image_size))
    a = torch.from_numpy(np.array(im, dtype=np.uint8))  # (h, w) or (h, w, 3)
    return a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1).contiguous()  # (C, h, w)


def fit_image(
    im: Image.Image, image_size: int | Sequence[int], channels: int = 3, background: tuple[int, int, int] = (255, 255, 255)
) -> torch.Tensor:
    """A pillow image as training prepares it, with the centre crop: converted to ``channels`` (transparency composited
    onto ``background``), resized to cover ``image_size`` and centre-cropped to it: uint8 (C, H, W)."""
    return _center_crop(_covering(im, image_size, channels, background), image_shape(image_size)).contiguous()


def _load_image(
    path: str | Path, image_size: int | Sequence[int], channels: int = 3,
    background: tuple[int, int, int] = (255, 255, 255),
) -> torch.Tensor:
    """Decode one file to uint8 (C, h, w), resized to cover `image_size` (the crop comes later: centre or random)."""
    return _covering(open_image(path), image_size, channels, background)


def why_unusable(path: Path, err: BaseException) -> str:
    """A short, one-line reason why a file could not be used."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"possible decompression bomb ({one_line(err)}); "
                "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file")
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image file pillow can read"
    if isinstance(err, FileNotFoundError):
        return "file not found (a broken symlink or deleted file)"
    return f"{type(err).__name__}: {one_line(err)}"


def _center_crop(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Central H x W window of a (C, h, w) tensor."""
    (hgt, wid), (h, w) = shape, x.shape[-2:]
    top, left = (h - hgt) // 2, (w - wid) // 2
    return x[:, top:top + hgt, left:left + wid]


def _random_crop(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Random H x W window of a (C, h, w) tensor, drawn from torch's global RNG."""
    (hgt, wid), (h, w) = shape, x.shape[-2:]
    top = int(torch.randint(h - hgt + 1, ())) if h > hgt else 0
    left = int(torch.randint(w - wid + 1, ())) if w > wid else 0
    return x[:, top:top + hgt, left:left + wid]


# ----------------------------------------------------------------------------- scanning


def find_images(root: Path, warn: Callable[[str], None]) -> list[Path]:
    """Image files below `root` in sorted depth-first order; follows symlinks, skips loops and hidden names."""
    found: list[Path] = []
    seen: set[str] = set()

    def walk(folder: Path) -> None:
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop or a second link to a folder already read
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            warn(f"cannot list {folder}: {one_line(err)}")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir():
                walk(path)
            elif path.suffix[1:].lower() in IMAGE_EXTENSIONS:
                found.append(path)

    walk(root)
    return found


def class_labels(root: Path, files: list[Path], class_cond: bool) -> tuple[list[int], list[str]]:
    """Class labels from the first folder below root (all 0 unless class_cond), and the sorted class names."""
    if not class_cond:
        return [0] * len(files), []
    loose = [f for f in files if f.parent == root]
    if loose:
        raise UsageError(
            f"{root} has {len(loose)} image file(s) directly inside it (e.g. {loose[0].name}); "
            f"with class conditioning put the images in one subfolder per class ({root}/<class>/...)"
        )
    tops = [f.relative_to(root).parts[0] for f in files]
    classes = sorted(set(tops))
    index = {name: k for k, name in enumerate(classes)}
    return [index[t] for t in tops], classes


# ----------------------------------------------------------------------------- dataset


class ImageFolder(torch.utils.data.Dataset):
    """Every image below a folder as uint8 (C, H, W) tensors with an integer class label."""

    def __init__(
        self, root: str | Path, image_size: int | Sequence[int], channels: int = 3, *, class_cond: bool = False,
        random_crop: bool = False, cache: bool | str = "auto",
        background: tuple[int, int, int] = (255, 255, 255),
        warn: Callable[[str], None] | None = None, cache_limit: int = CACHE_LIMIT_BYTES,
    ) -> None:
        if channels not in IMAGE_CHANNELS:
            raise UsageError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        if cache not in (True, False, "auto"):
            raise UsageError(f"cache must be True, False or 'auto', got {cache!r}")
        if len(background) != 3 or not all(0 <= int(v) <= 255 for v in background):
            raise UsageError(f"background must be three integers in 0..255, got {background!r}")
        self.root = Path(root)
        self.image_size = image_size
        self.shape = image_shape(image_size, "image_size")  # (H, W)
        self.cache_limit = cache_limit
        self.mode = ""  # how items are read, and why: for the start-up summary
        self.channels = channels
        self.class_cond = class_cond
        self.random_crop = random_crop
        self.background = tuple(int(v) for v in background)
        self.warn = warn if warn is not None else _print_warning
        if not self.root.exists():
            raise UsageError(f"image folder {self.root} does not exist; pass a folder that holds images")
        if not self.root.is_dir():
            raise UsageError(f"{self.root} is not a folder; pass a folder that holds images")

        candidates = find_images(self.root, self.warn)
        if not candidates:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise UsageError(f"no image files in {self.root} (searched recursively for {exts}); add images there")
        candidate_labels, self.classes = class_labels(self.root, candidates, class_cond)
        self.files: list[Path] = []
        self.labels: list[int] = []
        self.skipped: list[tuple[Path, str]] = []
        self._cache: torch.Tensor | None = None  # (N, C, H, W), or flat uint8 with random_crop
        self._offsets: list[int] = []  # random_crop cache: start of each image in the flat buffer
        self._sizes: list[tuple[int, int]] = []  # random_crop cache: (h, w) of each image
        self._validate(candidates, candidate_labels, cache)

    def _validate(self, candidates: list[Path], labels: list[int], cache: bool | str) -> None:
        """Decode every file once: record bad files, keep good ones and (maybe) their pixels."""
        n, c, (hgt, wid) = len(candidates), self.channels, self.shape
        need, limit = n * c * hgt * wid, self.cache_limit
        keep = cache is True or (cache == "auto" and (self.random_crop or need <= limit))
        fixed = torch.empty(n, c, hgt, wid, dtype=torch.uint8) if keep and not self.random_crop else None
        parts: list[torch.Tensor] = []  # random_crop: resized images before packing
        held = 0

        workers = max(1, min(16, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, n, _CHUNK):
                chunk = candidates[start:start + _CHUNK]
                for k, result in enumerate(self._decode_chunk(pool, chunk, keep)):
                    path, label = chunk[k], labels[start + k]
                    if isinstance(result, str):
                        self.skipped.append((path, result))
                        self.warn(f"skipping {path}: {result}")
                        continue
                    if fixed is not None:
                        fixed[len(self.files)] = _center_crop(result, self.shape)
                    elif keep:
                        held += result.numel()
                        if cache == "auto" and held > limit:
                            keep, parts = False, []  # over budget: decode per item instead
                        else:
                            parts.append(result)
                    self.files.append(path)
                    self.labels.append(label)

        if self.skipped:
            self.warn(f"skipped {len(self.skipped)} of {n} files in {self.root}")
        if not self.files:
            raise UsageError(
                f"no readable images in {self.root}: all {n} image files were skipped "
                "(see the warnings above); add images pillow can open"
            )
        if cache is False:
            self.mode = "read from disk per batch (data.cache=false)"
        elif not keep:
            size = f"{need / 2**30:.2f} GiB" if fixed is None and not self.random_crop else "the resized images"
            self.mode = (f"read from disk per batch ({size} would exceed the {limit / 2**30:.2f} GiB cache limit, "
                         "data.cache_limit_gb; memory holds only the batches in flight)")
        else:
            self.mode = "decoded once, cached in memory"
        if fixed is not None:
            self._cache = fixed[: len(self.files)]
        elif keep:
            self._sizes = [(int(p.shape[1]), int(p.shape[2])) for p in parts]
            self._offsets = [0]
            for p in parts:
                self._offsets.append(self._offsets[-1] + p.numel())
            self._cache = torch.cat([p.reshape(-1) for p in parts])

    def _decode_chunk(
        self, pool: ThreadPoolExecutor, files: list[Path], keep: bool
    ) -> list[torch.Tensor | str | None]:
        """Decode files in parallel, in order: the tensor (None unless `keep`) or a skip reason."""

        def work(path: Path) -> torch.Tensor | str | None:
            try:
                x = _load_image(path, self.image_size, self.channels, self.background)
            except Exception as err:  # any decoder failure means: skip this file
                return why_unusable(path, err)
            return x if keep else None

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _check_pixels reports it
            return list(pool.map(work, files))

    @property
    def cached(self) -> bool:
        """Whether the decoded images are held in memory (items are then slices, not file decodes)."""
        return self._cache is not None

    def __len__(self) -> int:
        """Number of readable images."""
        return len(self.files)

    def _stored(self, i: int) -> torch.Tensor:
        """Image i before cropping: from the cache, or decoded now (falling back to later files)."""
        c = self.channels
        if self._cache is not None and not self.random_crop:
            return self._cache[i]  # (C, H, W)
        if self._cache is not None:
            h, w = self._sizes[i]
            return self._cache[self._offsets[i]:self._offsets[i + 1]].view(c, h, w)
        for k in range(len(self.files)):  # validated at construction, but files can change since
            j = (i + k) % len(self.files)
            try:
                return _load_image(self.files[j], self.image_size, c, self.background)
            except Exception as err:
                self.warn(f"skipping {self.files[j]} this time: {why_unusable(self.files[j], err)}; using the next image")
        raise UsageError(f"none of the {len(self.files)} images in {self.root} can be read any more; check the folder")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image i as a contiguous uint8 (C, H, W) tensor and its class label."""
        x = self._stored(i)
        x = _random_crop(x, self.shape) if self.random_crop else _center_crop(x, self.shape)
        return x.clone(memory_format=torch.contiguous_format), self.labels[i]  # (C, H, W)


# ----------------------------------------------------------------------------- augmentation and value ranges


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped and rounded."""
    return ((x.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- demo data


def demo_shapes(n: int, image_size: int | Sequence[int] = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """`n` seeded images of one bright circle or square on a dark plain background: uint8 (n, C, H, W).

    `image_size` is one side or (H, W); a shape's size follows the shorter side, its place the whole image."""
    if n < 0 or not is_image_size(image_size) or min(image_shape(image_size)) < 4 or channels not in IMAGE_CHANNELS:
        raise UsageError(
            f"demo_shapes needs n >= 0, image sides >= 4 and channels 1 or 3; got {n}, {image_size}, {channels}"
        )
    g = torch.Generator().manual_seed(seed)
    hgt, wid = image_shape(image_size)
    radius = min(hgt, wid) * (0.12 + 0.18 * torch.rand(n, 1, 1, generator=g))  # half the side for squares
    cx = radius + (wid - 2 * radius) * torch.rand(n, 1, 1, generator=g)
    cy = radius + (hgt - 2 * radius) * torch.rand(n, 1, 1, generator=g)
    is_circle = torch.rand(n, 1, 1, generator=g) < 0.5
    fg = torch.rand(n, channels, generator=g) * 255  # bright: a random colour with one channel at full
    fg[torch.arange(n), torch.randint(channels, (n,), generator=g)] = 255.0
    if channels == 1:
        fg = 128 + torch.rand(n, 1, generator=g) * 127  # a light grey
    bg = torch.rand(n, channels, generator=g) * 40  # dark, plain

    dx = (torch.arange(wid, dtype=torch.float32) + 0.5).view(1, 1, -1) - cx  # pixel centres, (n, 1, W)
    dy = (torch.arange(hgt, dtype=torch.float32) + 0.5).view(1, -1, 1) - cy  # (n, H, 1)
    dist = torch.where(is_circle, torch.sqrt(dx**2 + dy**2), torch.maximum(dx.abs(), dy.abs()))  # (n, H, W)
    cover = (radius - dist + 0.5).clamp(0, 1).unsqueeze(1)  # antialiased edge, (n, 1, H, W)
    img = bg[:, :, None, None] + cover * (fg - bg)[:, :, None, None]  # (n, C, H, W)
    return img.round().to(torch.uint8)


def write_demo_folder(root: str | Path, n: int = 2000, image_size: int | Sequence[int] = 32, seed: int = 0) -> Path:
    """Write `demo_shapes` as 00000.png ... into `root`; does nothing if those n PNGs are already there."""
    root = Path(root)
    width = max(5, len(str(max(n - 1, 0))))
    names = [f"{k:0{width}d}.png" for k in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    present = {p.name for p in root.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")}
    if present == set(names):
        return root
    if present - set(names):
        raise UsageError(
            f"{root} already holds {len(present - set(names))} other PNG files; "
            "give the demo data an empty or new folder"
        )
    images = demo_shapes(n, image_size, 3, seed).permute(0, 2, 3, 1).numpy()  # (n, H, W, C)
    for name, pixels in zip(names, images):
        save_png(Image.fromarray(pixels), root / name)  # atomic: a half-written file never has the final name
    return root
