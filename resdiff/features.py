"""Features of a network (the FID Inception one, or any module mapping [0, 1] images to vectors) and their
statistics, the two things every metric starts from.

- `extract_features(images, net)`: uint8 (N, C, H, W) -> float32 (N, 2048) features of the FID
  Inception network (`resdiff.inception.load_inception`), or of any module mapping [0, 1] images to vectors.
- `sample_features(get_images, n, net)`: the features of images 0..n-1 that ``get_images`` makes (a model's samples),
  each process extracting its share; stoppable between batches.
- `network_id(net)`: the identity of a feature network's weights (part of the reference cache's key).
- `FeatureStats`: count, sum and sum of outer products in float64; processes combine them by summation
  (`merge`, `all_reduce`), so the FID of a sharded evaluation equals the single-process one.
  `save`/`load` use the common npz layout (`mu`, `sigma`; published reference files load).

The metrics on them are in `resdiff.metrics`, the data sets' cached reference features in `resdiff.reference`.
"""

from __future__ import annotations

import hashlib
import math
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .choices import IMAGE_CHANNELS
from .errors import UsageError, one_line
from .files import write_atomic

__all__ = ["FeatureStats", "extract_features", "sample_features", "Stopped", "timed", "network_id", "as_float64", "NPZ_ERRORS"]

# What reading a damaged .npz raises: numpy's ValueError/OSError, zipfile's BadZipFile (also a failed CRC-32 check,
# so a flipped bit in an uncompressed array is caught), EOFError for a cut-off member, zlib.error, a lost member.
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


# ----------------------------------------------------------------------------- features


def _batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (N, C, H, W) batches from a tensor, an array, a Dataset, or an iterable of batches / (batch, labels)."""
    if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.utils.data.IterableDataset):
        images = torch.utils.data.DataLoader(images, batch_size=batch_size)  # items (C, H, W) or (image, label)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise UsageError(f"expected images as uint8 (N, C, H, W), got shape {tuple(images.shape)}")
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size]
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def extract_features(
    images, net: nn.Module, batch_size: int = 50, device: torch.device | str | None = None, *,
    channels_last: bool = False, bf16: bool = False,
) -> torch.Tensor:
    """Features of uint8 (N, C, H, W) images (1 channel is repeated to 3) as a float32 (N, D) CPU tensor.

    `images` is a tensor, a numpy array, a map-style Dataset of images or (image, label) items (e.g.
    `image_dataset(folder)`), or an iterable of batches (e.g. `iter_images`, a DataLoader).
    `net` maps float (B, 3, H, W) in [0, 1] to (B, D); it runs in eval mode under torch.inference_mode
    on `device` (default: where its parameters are). `channels_last` and `bf16` (autocast, used only where
    resdiff.hardware.bf16_is_native says the device has it) are speed options; float32 is the default
    because FID is compared across papers to a few tenths.
    """
    from .hardware import bf16_is_native

    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    param = next(net.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    net.eval().to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    use_bf16 = bf16 and bf16_is_native(device)
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for batch in _batches(images, batch_size):
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in IMAGE_CHANNELS:
                raise UsageError(f"expected uint8 (N, 1 or 3, H, W) images in 0..255, got {batch.dtype} "
                                 f"{tuple(batch.shape)}; convert model outputs with resdiff.data.to_uint8")
            x = batch.to(device, non_blocking=True).float().div(255)  # (B, C, H, W) in [0, 1]
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(net(x).float().cpu())  # (B, D)
    if not out:
        raise UsageError("no images to extract features from")
    return torch.cat(out)


class Stopped(Exception):
    """A stoppable extraction was asked to stop (``sample_features``' ``should_stop``); every process raises it at
    the same batch."""


def sample_features(
    get_images: Callable[[list[int]], torch.Tensor], n: int, net: nn.Module, *, batch_size: int,
    device: torch.device, progress: bool = False, seconds: dict[str, float] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple["FeatureStats", torch.Tensor]:
    """Features of images 0..n-1, each process extracting its share ``range(n)[rank::world]`` (``get_images(indices)``
    gives uint8 (B, C, H, W)): the float64 statistics of all n, summed across processes, and all n features in
    image order, gathered on every process. ``seconds`` gathers this process's time in "generation" (``get_images``)
    and "inception" (the features). ``should_stop()`` (a collective when there are several processes: each process
    calls it before each of the same number of batches) ends the work early by raising ``Stopped``."""
    from .processes import gather_shares, rank_world, share

    from tqdm.auto import tqdm

    rank, world = rank_world()
    mine = share(n, rank, world)
    rounds = math.ceil(len(share(n, 0, world)) / batch_size)  # the main process has the largest share
    stats, features = FeatureStats(), []
    bar = tqdm(total=len(mine), unit="img", disable=not progress, desc="samples -> features", leave=False)
    for k in range(rounds):
        if should_stop is not None and should_stop():
            bar.close()
            raise Stopped(f"stopped after {k * batch_size * world} of {n} images")
        batch = mine[k * batch_size:(k + 1) * batch_size]
        if not batch:
            continue
        with timed(seconds, "generation", device):
            images = get_images(batch)
        # channels_last: the convolutions' faster layout; the same features to float32 rounding
        # (bench/inception_precision.py)
        with timed(seconds, "inception", device):
            f = extract_features(images, net, batch_size=batch_size, device=device, channels_last=True)  # (B, 2048)
        stats.update(f)
        features.append(f)
        bar.update(len(batch))
    bar.close()
    stats.all_reduce()  # float64 sums of every process: the statistics of all n samples
    local = torch.cat(features) if features else torch.zeros(0, stats.dim)
    return stats, gather_shares(local, n)


@contextmanager
def timed(seconds: dict[str, float] | None, part: str, device: torch.device):
    """Add the wall time of the block to ``seconds[part]`` (after the device's queued work is done). ``seconds``
    None times nothing, so training's evaluations do not wait for the GPU after every batch."""
    if seconds is None:
        yield
        return
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - start


def network_id(net: nn.Module) -> str:
    """The identity of a feature network's weights: the weight file's SHA-256, else a hash of its state_dict."""
    known = getattr(net, "weights_sha256", None)
    if known:
        return known
    digest = hashlib.sha256(type(net).__name__.encode())
    for key, t in net.state_dict().items():
        digest.update(key.encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()


# ----------------------------------------------------------------------------- statistics


def as_float64(x) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach()).to("cpu", torch.float64)


class FeatureStats:
    """Running feature statistics in float64: count, sum of x, sum of x x^T; combined across processes by summation.

    Statistics loaded from a file with only `mu` and `sigma` (published reference files) give `mu` and
    `sigma` but cannot be updated or merged.
    """

    def __init__(self, dim: int = 2048) -> None:
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)
        self._fixed: tuple[np.ndarray, np.ndarray] | None = None  # (mu, sigma) of a file without sums
        self._loaded: tuple[np.ndarray, np.ndarray] | None = None  # (mu, sigma) as read, until an update
        self.rows: list[str] | None = None  # a folder's reference: the file (relative name) of each feature row

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        """Statistics of one (N, D) array or tensor of features."""
        f = as_float64(features)
        return cls(f.shape[1]).update(f)

    def _check_open(self, action: str) -> None:
        if self._fixed is not None:
            raise UsageError(f"cannot {action} statistics loaded from a file with only mu and sigma")

    def update(self, features) -> FeatureStats:
        """Add (N, D) features."""
        self._check_open("update")
        f = as_float64(features)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise UsageError(f"expected features of shape (N, {self.dim}), got {tuple(f.shape)}")
        self._loaded = None
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another process's (or shard's) statistics to these."""
        self._check_open("merge")
        other._check_open("merge")
        if other.dim != self.dim:
            raise UsageError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self._loaded = None
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics of all processes in place (torch.distributed, when initialised; else unchanged)."""
        self._check_open("reduce")
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        device = torch.device("cpu")
        if torch.distributed.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum, self.sum_outer.reshape(-1)])
        self._loaded = None
        packed = packed.to(device)
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        self.count = int(round(packed[0].item()))  # exact: counts are far below 2**53
        self.sum = packed[1:1 + self.dim].clone()
        self.sum_outer = packed[1 + self.dim:].reshape(self.dim, self.dim).clone()
        return self

    @property
    def mu(self) -> np.ndarray:
        """The mean feature (D,), float64."""
        if self._fixed is not None or self._loaded is not None:
            return (self._fixed or self._loaded)[0]
        if self.count < 1:
            raise UsageError("no features in these statistics")
        return (self.sum / self.count).numpy()

    @property
    def sigma(self) -> np.ndarray:
        """The unbiased covariance (D, D), float64 (numpy.cov's, with N - 1)."""
        if self._fixed is not None or self._loaded is not None:
            return (self._fixed or self._loaded)[1]
        if self.count < 2:
            raise UsageError(f"a covariance needs at least 2 images, these statistics have {self.count}")
        centred = self.sum_outer - torch.outer(self.sum, self.sum) / self.count
        return (centred / (self.count - 1)).numpy()

    def save(self, path: str | Path, **arrays: np.ndarray) -> Path:
        """Write `mu`, `sigma` (the common layout), `count` and any extra ``arrays`` to an npz, whole or not at all."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self._fixed is not None else {"count": np.array(self.count)}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
                np.savez(f, mu=self.mu, sigma=self.sigma, **extra, **arrays)

        write_atomic(path, write, per_process=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Statistics from an npz with `mu` and `sigma` (and `count`, which makes them mergeable again)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise UsageError(f"{path} has no mu and sigma arrays (it has {', '.join(data.files) or 'nothing'})")
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                count = int(data["count"]) if "count" in data else None
                rows = [str(r) for r in data["rows"]] if "rows" in data else None
        except UsageError:
            raise
        except NPZ_ERRORS as err:
            raise UsageError(f"cannot read statistics from {path} (damaged or not an .npz: {one_line(err, 100)}); "
                             f"write it again") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UsageError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        stats = cls(mu.shape[0])
        stats.rows = rows
        if count is None:
            stats._fixed = (mu, sigma)
            return stats
        # the sums back from (count, mu, sigma): exact up to float64 rounding, so merging still works
        m, s = torch.from_numpy(mu), torch.from_numpy(sigma)
        stats.count = count
        stats.sum = m * count
        stats.sum_outer = s * (count - 1) + torch.outer(m, m) * count
        stats._loaded = (mu, sigma)  # mu and sigma exactly as saved until the sums change
        return stats
