"""Sample-quality metrics on features (`resdiff.features`): FID, KID, precision/recall, memorisation.

- `frechet_distance` / `fid_from_stats`: FID from two sets of float64 statistics (`FeatureStats`).
- `kid`: kernel inception distance, the mean and spread over random subsets.
- `precision_recall`: k-nearest-neighbour manifolds of real and generated features.
- `memorisation` and `nearest_pairs_image`: how close samples sit to training images, and a picture of the closest.

Only torch and numpy are needed; where the features come from (`resdiff.features`) and which images a data
set's features belong to (`resdiff.reference`) live beside this, so the mathematics reads alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .features import FeatureStats, as_float64
from .processes import gather_shares, rank_world

__all__ = [
    "frechet_distance", "fid_from_stats", "kid", "precision_recall", "Memorisation", "memorisation",
    "nearest_pairs_image",
]

# ----------------------------------------------------------------------------- FID and KID


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) in float64.

    Tr((sigma1 sigma2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric sigma1^(1/2) sigma2 sigma1^(1/2) (the same eigenvalues as sigma1 sigma2), with torch's
    eigh: no complex parts to drop and no epsilon to add, unlike scipy.linalg.sqrtm of the product.
    Tiny negative eigenvalues from rounding count as 0, and so does a tiny negative result.
    """
    mu1, mu2, s1, s2 = (as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
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
    are computed in float64 on `device`, one subset at a time (memory: the features as given, plus three
    subset_size^2 matrices).
    With ``split`` every process of torch.distributed must call it with the same features: each computes
    the subsets i with i % world == rank, and all get the same result as one process alone.
    """
    if subsets < 1:
        raise UsageError(f"KID needs at least 1 subset (--kid-subsets), got {subsets}")
    # the sets stay as given (float32 features: no float64 copy of all n); each subset is cast when it is drawn
    a, b = (_prepare(f, device, None) for f in (feats_a, feats_b))
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
            values.append(_polynomial_mmd(a[pick_a.to(a.device)].double(), b[pick_b.to(b.device)].double()))
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
