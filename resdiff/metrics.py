"""Sample-quality metrics on Inception features: FID, KID, precision/recall, memorisation.

The pieces, in the order an evaluation uses them:

- `image_dataset` / `iter_images` / `load_images`: images from an .npz (arr_0 uint8 (N, H, W, C), what
  `sample.py --npz` and OpenAI's tools write) or an image folder, prepared as training prepares it.
- `extract_features(images, net)`: uint8 (N, C, H, W) -> float32 (N, 2048) features of the FID
  Inception network (`resdiff.inception.load_inception`), or of any module mapping [0, 1] images to vectors.
- `FeatureStats`: count, sum and sum of outer products in float64; processes combine them by summation
  (`merge`, `all_reduce`), so the FID of a sharded evaluation equals the single-process one.
  `save`/`load` use the common npz layout (`mu`, `sigma`; published reference files load).
- `frechet_distance` / `fid_from_stats`, `kid`, `precision_recall`, `memorisation` and `nearest_pairs_image`.
- `reference_stats(folder_or_npz, net, ...)`: statistics of a data set, cached under $RESDIFF_CACHE.

Only torch, numpy and pillow are needed; `resdiff.data` (for folders) and `resdiff.sampling` (for the
picture of nearest pairs) are imported when used.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .choices import IMAGE_CHANNELS
from .data import image_shape
from .errors import UsageError, one_line
from .files import cache_root, write_atomic
from .images import GRID_NAME, image_name, load_npz
from .processes import gather_shares, on_main, rank_world

__all__ = [
    "FeatureStats", "extract_features", "frechet_distance", "fid_from_stats", "kid", "precision_recall",
    "Memorisation", "memorisation", "nearest_pairs_image", "image_dataset", "load_images", "iter_images",
    "reference_stats", "reference_features", "reference_images", "network_id",
]

STATS_VERSION = 1  # part of the reference-statistics cache key: bump when the preparation changes
# What reading a damaged .npz raises: numpy's ValueError/OSError, zipfile's BadZipFile (also a failed CRC-32 check,
# so a flipped bit in an uncompressed array is caught), EOFError for a cut-off member, zlib.error, a lost member.
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


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


def _as_float64(x) -> torch.Tensor:
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
        f = _as_float64(features)
        return cls(f.shape[1]).update(f)

    def _check_open(self, action: str) -> None:
        if self._fixed is not None:
            raise UsageError(f"cannot {action} statistics loaded from a file with only mu and sigma")

    def update(self, features) -> FeatureStats:
        """Add (N, D) features."""
        self._check_open("update")
        f = _as_float64(features)
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
        except _NPZ_ERRORS as err:
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


# ----------------------------------------------------------------------------- FID and KID


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) in float64.

    Tr((sigma1 sigma2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric sigma1^(1/2) sigma2 sigma1^(1/2) (the same eigenvalues as sigma1 sigma2), with torch's
    eigh: no complex parts to drop and no epsilon to add, unlike scipy.linalg.sqrtm of the product.
    Tiny negative eigenvalues from rounding count as 0, and so does a tiny negative result.
    """
    mu1, mu2, s1, s2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise UsageError(f"statistics do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # sigma1^(1/2)
    m = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    fd = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(fd), 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet Inception Distance between two sets of statistics."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _polynomial_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Bińkowski et al. 2018, KID) between equal-size sets."""
    m, d = x.shape
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        device: torch.device | str = "cpu", split: bool = False) -> tuple[float, float]:
    """Kernel Inception Distance: mean and (population) std of the unbiased MMD^2 over random subsets.

    Each of `subsets` rounds draws min(subset_size, len(a), len(b)) features from each set without
    replacement, from a CPU generator seeded with `seed`, so the result is deterministic; the kernels
    are computed in float64 on `device`, one subset at a time (memory: three subset_size^2 matrices, whatever n).
    With ``split`` every process of torch.distributed must call it with the same features: each computes
    the subsets i with i % world == rank, and all get the same result as one process alone.
    """
    if subsets < 1:
        raise UsageError(f"KID needs at least 1 subset (--kid-subsets), got {subsets}")
    a, b = _as_float64(feats_a).to(device), _as_float64(feats_b).to(device)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise UsageError(f"KID needs at least 2 features in each set, got {len(a)} and {len(b)}")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    rank, world = rank_world() if split else (0, 1)
    values = []
    for i in range(subsets):
        pick_a, pick_b = torch.randperm(len(a), generator=g)[:m], torch.randperm(len(b), generator=g)[:m]  # every process draws all
        if i % world == rank:
            values.append(_polynomial_mmd(a[pick_a.to(a.device)], b[pick_b.to(b.device)]))
    values = gather_shares(torch.tensor(values, dtype=torch.float64)[:, None], subsets)[:, 0].numpy() if world > 1 else values
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------- nearest neighbours


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), from ||a||^2 + ||b||^2 - 2 a.b, clamped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return d.clamp_(min=0)


def _prepare(feats, device, dtype) -> torch.Tensor:
    f = feats if isinstance(feats, torch.Tensor) else torch.from_numpy(np.asarray(feats))
    return f.detach().to(device=device, dtype=dtype)


def _by_rows(rows: torch.Tensor, compute, batch_size: int, split: bool) -> torch.Tensor:
    """``compute(chunk)`` (B, D) -> (B, ...) over ``rows`` in chunks of ``batch_size`` (bounded memory), all rows in
    order; with ``split`` each process of torch.distributed takes rows rank::world and all get every row."""
    rank, world = rank_world() if split else (0, 1)
    mine = rows[rank::world]
    parts = [compute(mine[s:s + batch_size]).cpu() for s in range(0, len(mine), batch_size)]
    local = torch.cat(parts) if parts else torch.zeros(0)
    return gather_shares(local, len(rows)).to(rows.device) if world > 1 else local.to(rows.device)


def _kth_radii(x: torch.Tensor, k: int, batch_size: int, split: bool = False) -> torch.Tensor:
    """Squared distance from each row of x to its k-th nearest other row (the row itself is the 0-th)."""
    if len(x) <= k:
        raise UsageError(f"k-nearest-neighbour radii with k={k} need more than {k} features, got {len(x)}")
    return _by_rows(x, lambda q: _sq_dists(q, x).topk(k + 1, dim=1, largest=False).values[:, -1], batch_size, split)


def _inside(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch_size: int, split: bool = False) -> torch.Tensor:
    """For each query row: whether it lies in the ball of at least one ref row (squared radius `radii`)."""
    inside = _by_rows(query, lambda q: (_sq_dists(q, ref) <= radii[None, :]).any(1).to(radii.dtype), batch_size, split)
    return inside > 0


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float64, split: bool = False) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls in feature space.

    Precision: the fraction of fake samples inside the union of the balls around the real samples, each
    ball reaching to that real sample's k-th nearest real neighbour. Recall: the fraction of real samples
    inside the fake samples' balls. Distances are computed `batch_size` rows at a time, so memory stays at
    batch_size x max(len(real), len(fake)); the cost is O(n^2 d), so prefer a GPU `device` past ~10k samples.
    With ``split`` every process of torch.distributed calls it with the same features and takes its share of rows.
    """
    r, f = _prepare(real, device, dtype), _prepare(fake, device, dtype)
    if r.shape[1] != f.shape[1]:
        raise UsageError(f"feature dimensions differ: {r.shape[1]} and {f.shape[1]}")
    precision = _inside(f, r, _kth_radii(r, k, batch_size, split), batch_size, split).double().mean().item()
    recall = _inside(r, f, _kth_radii(f, k, batch_size, split), batch_size, split).double().mean().item()
    return precision, recall


@dataclass
class Memorisation:
    """Each generated sample's nearest training image in feature space, and how close that is.

    `threshold` is the `quantile` (default the median) of the training images' nearest-neighbour
    distances to the other training images. `fraction` is the share of samples whose nearest training
    image is closer than that. Samples drawn afresh from the training distribution land near `quantile`
    (about 0.5 by default): a sample's distance to the nearest of N training images is distributed like
    a training image's distance to the nearest of the other N - 1. A fraction well above it means the
    samples sit closer to training images than new data would: look at `nearest_pairs_image`.
    """

    nearest: torch.Tensor  # (N_gen,) int64: index of the nearest training image
    distance: torch.Tensor  # (N_gen,) float64: Euclidean feature distance to it
    threshold: float
    quantile: float
    fraction: float

    @property
    def order(self) -> torch.Tensor:
        """Sample indices, most suspicious (closest to a training image) first."""
        return torch.argsort(self.distance, stable=True)

    def summary(self) -> dict:
        """JSON-ready numbers: fraction, threshold and the distribution of the samples' distances."""
        d = self.distance
        return {
            "fraction_closer_than_threshold": self.fraction, "threshold": self.threshold,
            "threshold_quantile": self.quantile, "samples": len(d),
            "distance_min": float(d.min()), "distance_median": float(d.median()),
            "closest_sample": int(self.order[0]), "its_training_image": int(self.nearest[self.order[0]]),
        }


def memorisation(train_feats, gen_feats, quantile: float = 0.5, batch_size: int = 1024,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64, split: bool = False) -> Memorisation:
    """Nearest training image of every generated sample, against the training set's own spacing (see Memorisation).
    Distances are computed ``batch_size`` rows at a time; with ``split`` each process of torch.distributed (all
    calling it with the same features) takes its share of rows."""
    t, g = _prepare(train_feats, device, dtype), _prepare(gen_feats, device, dtype)
    if len(t) < 2 or len(g) < 1:
        raise UsageError(f"memorisation needs at least 2 training and 1 generated features, got {len(t)} and {len(g)}")
    if t.shape[1] != g.shape[1]:
        raise UsageError(f"feature dimensions differ: {t.shape[1]} and {g.shape[1]}")
    if not 0 < quantile < 1:
        raise UsageError(f"quantile must lie between 0 and 1, got {quantile}")
    train_nn = _kth_radii(t, 1, batch_size, split)  # squared distance to the nearest other training image
    threshold = float(train_nn.double().sqrt().quantile(quantile))  # numpy's linear interpolation

    def nearest_of(q: torch.Tensor) -> torch.Tensor:
        value, index = _sq_dists(q, t).min(1)
        return torch.stack([value.double(), index.double()], 1)  # (B, 2): indices are exact in float64

    found = _by_rows(g, nearest_of, batch_size, split).cpu()
    dist = found[:, 0].sqrt()
    return Memorisation(found[:, 1].long(), dist, threshold, quantile, float((dist < threshold).double().mean()))


def _image(images, i: int) -> torch.Tensor:
    x = images[i]
    return x[0] if isinstance(x, (tuple, list)) else x  # an ImageFolder item is (image, label)


def nearest_pairs_image(gen_images, train_images, result: Memorisation, path: str | Path, count: int = 32,
                        padding: int = 2) -> Path:
    """Write a PNG of the `count` most suspicious pairs, each as (sample | its nearest training image).

    `gen_images` is uint8 (N, C, H, W); `train_images` anything indexable by training index that gives
    uint8 (C, H, W) images or (image, label) pairs: a tensor, or `image_dataset(...)` of the folder the
    training features came from.
    Pairs fill a near-square grid row by row, the closest pair first.
    """
    from .images import make_grid

    pairs = []
    for i in result.order[:count].tolist():
        a, b = _image(gen_images, i), _image(train_images, int(result.nearest[i]))
        if a.shape[1:] != b.shape[1:]:
            raise UsageError(f"sample {i} is {a.shape[2]}x{a.shape[1]} but training image {int(result.nearest[i])} is "
                             f"{b.shape[2]}x{b.shape[1]}; prepare the training images at the samples' size")
        a, b = (x.expand(3, -1, -1) if x.shape[0] == 1 else x for x in (a, b))
        gap = torch.full((3, a.shape[1], padding), 128, dtype=torch.uint8)  # a grey seam between the two
        pairs.append(torch.cat([a, gap, b], dim=2))  # (3, H, 2W + padding)
    if not pairs:
        raise UsageError("no pairs to draw")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = math.ceil(math.sqrt(len(pairs)))  # the pairs are wide by design: columns by count, not by aspect ratio
    make_grid(torch.stack(pairs), padding=2 * padding, cols=cols).save(path, format="PNG")
    return path


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
    ds = ImageFolder(path, size, channels, random_flip=False, random_crop=False, cache=False)
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
    except _NPZ_ERRORS as err:
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
    batches = (_stacked(images, mine[s:s + batch_size]) for s in range(0, len(mine), batch_size))
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
    except (UsageError, *_NPZ_ERRORS):
        return None
