"""Metrics: feature statistics and their reduce, FID/KID/precision-recall against their formulas,
memorisation and its picture, image sources and the cached reference statistics.

A tiny convolutional feature network stands in for Inception here (the real one is tested in
test_inception.py); the metrics only need a module mapping [0, 1] images to vectors.
"""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from resdiff import reference
from resdiff.errors import UsageError
from resdiff.features import FeatureStats, extract_features, network_id
from resdiff.metrics import fid_from_stats, frechet_distance, kid, memorisation, nearest_pairs_image, precision_recall
from resdiff.reference import image_dataset, load_images, reference_stats


class TinyNet(nn.Module):
    """A fixed random 3 -> 8 convolution, 2x2 average pool: 32-d features."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(8, generator=g) * 0.1)

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)  # (N, 32)


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text


def _random_cov(d: int, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    z = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d)) * 0.5
    return np.atleast_2d(np.cov(z, rowvar=False))


def _sqrtm_denman_beavers(a: np.ndarray, steps: int = 60) -> np.ndarray:
    """Textbook principal square root of a matrix with positive eigenvalues (Denman-Beavers iteration)."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(steps):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def _textbook_fd(mu1, s1, mu2, s2) -> float:
    covmean = _sqrtm_denman_beavers(s1 @ s2)
    assert np.allclose(covmean @ covmean, s1 @ s2, rtol=1e-8, atol=1e-10)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- statistics


def test_stats_are_numpys_mean_and_cov():
    f = np.random.default_rng(0).standard_normal((200, 16)) * 3 + 1
    stats = FeatureStats(16).update(f[:50]).update(torch.from_numpy(f[50:]))
    np.testing.assert_allclose(stats.mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.count == 200


def test_merged_shards_give_the_single_process_fid():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((301, 24)) + 0.4
    b = rng.standard_normal((257, 24)) * 1.2
    single = fid_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b))
    shards = [FeatureStats.from_features(a[:100]), FeatureStats.from_features(a[100:])]
    merged = shards[0].merge(shards[1])
    two = fid_from_stats(merged, FeatureStats.from_features(b))
    assert single > 1
    assert abs(two - single) <= 1e-9 * single
    with pytest.raises(UsageError, match="dimension"):
        merged.merge(FeatureStats(8))


def _reduce_worker(rank: int, world: int, init: str, features: np.ndarray, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        stats = FeatureStats(features.shape[1]).update(features[rank::world]).all_reduce()
        if rank == 0:
            np.savez(out, mu=stats.mu, sigma=stats.sigma, count=stats.count)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_processes(tmp_path):
    """Two gloo processes, each with half the features, reduce to the statistics of all of them."""
    features = np.random.default_rng(2).standard_normal((99, 12))
    out = tmp_path / "reduced.npz"
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.start_processes(_reduce_worker, args=(2, init, features, str(out)), nprocs=2,
                                          join=True, start_method="spawn")
    reduced = FeatureStats.load(out)
    assert reduced.count == 99
    np.testing.assert_allclose(reduced.mu, features.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(reduced.sigma, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-13)


def test_all_reduce_without_a_process_group_is_a_no_op():
    stats = FeatureStats.from_features(np.eye(4))
    assert stats.all_reduce().count == 4


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((80, 10)), rng.standard_normal((60, 10))
    full = FeatureStats.from_features(a)
    loaded = FeatureStats.load(full.save(tmp_path / "a.npz"))
    np.testing.assert_allclose(loaded.sigma, full.sigma, rtol=1e-12)
    # saved with count: the sums come back, so loaded statistics still merge exactly
    merged = loaded.merge(FeatureStats.from_features(b))
    np.testing.assert_allclose(merged.sigma, np.cov(np.concatenate([a, b]), rowvar=False), rtol=1e-9, atol=1e-12)
    # a published reference file has only mu and sigma
    np.savez(tmp_path / "ref.npz", mu=a.mean(0), sigma=np.cov(a, rowvar=False))
    ref = FeatureStats.load(tmp_path / "ref.npz")
    assert fid_from_stats(ref, full) == pytest.approx(0, abs=1e-9)
    ref.save(tmp_path / "ref2.npz")
    assert set(np.load(tmp_path / "ref2.npz").files) == {"mu", "sigma"}
    for action in (lambda: ref.update(a), lambda: ref.merge(full), lambda: full.merge(ref)):
        with pytest.raises(UsageError, match="only mu and sigma") as excinfo:
            action()
        _one_line(excinfo)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(UsageError, match="no mu and sigma") as excinfo:
        FeatureStats.load(tmp_path / "other.npz")
    _one_line(excinfo)


# ----------------------------------------------------------------------------- FID and KID


def test_frechet_distance_is_the_textbook_formula():
    rng = np.random.default_rng(4)
    for d in (1, 5, 40):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
        expected = _textbook_fd(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.5, 2, 30), rng.uniform(0.5, 2, 30)
    mu1, mu2 = rng.standard_normal(30), rng.standard_normal(30)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # identical statistics, also rank-deficient ones (fewer samples than dimensions): 0
    s = _random_cov(30, rng, n=12)
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0, abs=1e-9 * np.trace(s))
    with pytest.raises(UsageError, match="do not match"):
        frechet_distance(mu1, s, mu2[:5], s[:5, :5])


def _mmd_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased polynomial-kernel MMD^2 written out term by term."""
    m, d = x.shape
    k = lambda p, q: (p @ q / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((15, 6)), rng.standard_normal((15, 6)) + 0.3
    mean, std = kid(x, y, subsets=3, subset_size=100)  # each subset is the whole (permuted) set
    assert mean == pytest.approx(_mmd_loops(x, y), rel=1e-10) and std == pytest.approx(0, abs=1e-12)


def test_kid_is_unbiased_and_deterministic():
    rng = np.random.default_rng(7)
    values = [kid(rng.standard_normal((40, 8)), rng.standard_normal((40, 8)), subsets=5)[0] for _ in range(60)]
    # same distribution: the mean estimate sits at 0 within 4 standard errors, with both signs seen
    assert abs(np.mean(values)) < 4 * np.std(values) / math.sqrt(len(values))
    assert min(values) < 0 < max(values)
    a, b = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 0.5
    first = kid(a, b, subsets=20, subset_size=50, seed=3)
    assert first == kid(a, b, subsets=20, subset_size=50, seed=3)
    assert first != kid(a, b, subsets=20, subset_size=50, seed=4)
    assert first[0] > 5 * first[1] / math.sqrt(20)  # a shifted distribution: clearly positive
    with pytest.raises(UsageError, match="at least 2"):
        kid(a[:1], b)


# ----------------------------------------------------------------------------- precision, recall


def _grid_case():
    """Real: a 10x10 grid (k=3 radius 1, corners sqrt 2). Fake: rows 0-4 shifted by (0.3, 0.2), 50 far points."""
    real = np.array([[x, y] for y in range(10) for x in range(10)], dtype=np.float64)
    near = real[:50] + [0.3, 0.2]
    far = np.array([[100.0 + i, 100.0] for i in range(50)])
    return real, np.concatenate([near, far])


def test_precision_recall_on_a_constructed_case():
    real, fake = _grid_case()
    # precision: the 50 near fakes lie 0.36 from a real point, inside its radius; the far ones in none.
    # recall: real rows 0-4 are 0.36 from a fake; row 5 is 0.85 from a fake of radius >= 1; rows 6-9 are
    # at least 1.82 from every fake, whose radii are at most sqrt 2.
    assert precision_recall(real, fake, k=3) == (0.5, 0.6)
    assert precision_recall(real, fake, k=3, batch_size=7, dtype=torch.float32) == (0.5, 0.6)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((60, 5)), rng.standard_normal((45, 5)) * 1.3 + 0.2

    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
        return np.sort(d, axis=1)[:, 3]

    def inside(q, ref):
        d = np.linalg.norm(q[:, None] - ref[None], axis=2)
        return (d <= radii(ref)[None]).any(1).mean()

    p, r = precision_recall(real, fake, k=3, batch_size=16)
    assert p == pytest.approx(inside(fake, real)) and r == pytest.approx(inside(real, fake))
    assert 0 < p < 1 and 0 < r < 1


# ----------------------------------------------------------------------------- memorisation


def test_memorisation_finds_copies():
    rng = np.random.default_rng(9)
    train = rng.standard_normal((400, 8))
    copies = train[[5, 17, 300]] + 1e-6
    fresh = rng.standard_normal((400, 8))
    result = memorisation(train, np.concatenate([copies, fresh]), batch_size=64)
    assert result.nearest[:3].tolist() == [5, 17, 300]
    assert result.order[:3].sort().values.tolist() == [0, 1, 2]
    d = np.linalg.norm(train[:, None] - train[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert result.threshold == pytest.approx(np.median(d.min(1)), rel=1e-9)
    # fresh draws from the training distribution sit near the median by construction (0.5 +- 3 sigma)
    assert 0.42 < float((result.distance[3:] < result.threshold).double().mean()) < 0.58
    summary = result.summary()
    assert summary["closest_sample"] in (0, 1, 2) and summary["samples"] == 403
    assert memorisation(train, copies).fraction == 1.0


def test_nearest_pairs_image(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=g)
    gen = torch.cat([torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=g).expand(-1, 3, -1, -1),
                     train[7:8]])  # the last sample is a copy of training image 7
    net = TinyNet()
    result = memorisation(extract_features(train, net), extract_features(gen, net))
    assert result.order[0] == 4 and result.nearest[4] == 7
    folder_like = [(train[i], 0) for i in range(len(train))]  # what ImageFolder items look like
    path = nearest_pairs_image(gen, folder_like, result, tmp_path / "eval" / "nearest.png", count=5)
    picture = Image.open(path)
    # 5 pairs of (8 | 2 | 8) x 8 in a 3-column grid, 4 px apart: 3 * (18 + 4) + 4 wide, 2 * (8 + 4) + 4 high
    assert picture.size == (70, 28)
    top_left = torch.from_numpy(np.array(picture)).permute(2, 0, 1)[:, 4:12, 4:22]
    assert torch.equal(top_left[:, :, :8], gen[4]) and torch.equal(top_left[:, :, 10:], train[7])
    with pytest.raises(UsageError, match="prepare the training images") as excinfo:
        nearest_pairs_image(gen, torch.zeros(20, 3, 16, 16, dtype=torch.uint8), result, tmp_path / "x.png")
    _one_line(excinfo)


# ----------------------------------------------------------------------------- images and reference statistics


def _write_pngs(folder, n: int, size=(12, 12), seed: int = 0, mode: str = "RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:05d}.png")
    return folder


def test_npz_images(tmp_path):
    x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=x.permute(0, 2, 3, 1).numpy())  # sample.py --npz's layout
    assert torch.equal(load_images(tmp_path / "samples.npz"), x)
    np.savez(tmp_path / "gray.npz", arr_0=x[:, 0].numpy())  # (N, H, W)
    assert load_images(tmp_path / "gray.npz").shape == (5, 1, 6, 6)
    with pytest.raises(UsageError, match="expected 8x8") as excinfo:
        load_images(tmp_path / "samples.npz", image_size=8)
    _one_line(excinfo)
    np.savez(tmp_path / "floats.npz", arr_0=x.permute(0, 2, 3, 1).numpy() / 255.0)
    with pytest.raises(UsageError, match="uint8") as excinfo:
        load_images(tmp_path / "floats.npz")
    _one_line(excinfo)


def test_folder_images_and_their_errors(tmp_path):
    samples = _write_pngs(tmp_path / "samples", 3, size=(10, 10))
    Image.new("RGB", (34, 34)).save(samples / "grid.png")  # sample.py's overview grid is not a sample
    assert load_images(samples).shape == (3, 3, 10, 10)
    ds = image_dataset(samples)
    assert len(ds) == 3 and ds[2][0].shape == (3, 10, 10)
    net = TinyNet()
    torch.testing.assert_close(extract_features(ds, net, batch_size=2), extract_features(load_images(samples), net))
    assert load_images(samples, image_size=6, channels=1).shape == (3, 1, 6, 6)
    mixed = _write_pngs(tmp_path / "mixed", 2, size=(10, 10))
    _write_pngs(mixed / "sub", 1, size=(16, 12))
    with pytest.raises(UsageError, match="different sizes") as excinfo:
        load_images(mixed)
    _one_line(excinfo)
    assert load_images(mixed, image_size=8).shape == (3, 3, 8, 8)  # resized and cropped as training does
    (tmp_path / "empty").mkdir()
    for source, match in ((tmp_path / "empty", "no image files"), (tmp_path / "nowhere", "does not exist")):
        with pytest.raises(UsageError, match=match) as excinfo:
            load_images(source)
        _one_line(excinfo)


def test_reference_stats_are_the_training_preparation(tmp_path, monkeypatch):
    from resdiff.data import ImageFolder

    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path / "cache"))
    folder = _write_pngs(tmp_path / "data", 6, size=(14, 11), mode="L")
    net = TinyNet()
    stats = reference_stats(folder, net, image_size=8, channels=1, batch_size=4)
    ds = ImageFolder(folder, 8, 1, random_crop=False, cache=False)
    direct = FeatureStats.from_features(extract_features(torch.stack([ds[i][0] for i in range(len(ds))]), net))
    np.testing.assert_allclose(stats.sigma, direct.sigma, rtol=1e-10, atol=1e-14)
    assert stats.count == 6


def test_reference_stats_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path / "cache"))
    calls = []
    real = reference.extract_features
    monkeypatch.setattr(reference, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder = _write_pngs(tmp_path / "data", 5, size=(9, 9))
    net = TinyNet()
    first = reference_stats(folder, net, image_size=9)
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "fid-stats").glob("*.npz"))) == 1
    hit = reference_stats(folder, net, image_size=9)
    assert len(calls) == 1 and np.array_equal(hit.sigma, first.sigma)  # from the cache, bit for bit
    reference_stats(folder, net, image_size=7)
    reference_stats(folder, TinyNet(seed=1))
    assert len(calls) == 3  # another preparation, another network (and image_size None = 9 is the first key)
    # a changed file (new content, new mtime) invalidates the entry
    Image.fromarray(np.full((9, 9, 3), 200, np.uint8)).save(folder / "00002.png")
    st = os.stat(folder / "00002.png")
    os.utime(folder / "00002.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = reference_stats(folder, net, image_size=9)
    assert len(calls) == 4 and not np.allclose(changed.mu, first.mu)
    # an added file too; a mu/sigma file is read as it is, never cached
    _write_pngs(folder / "more", 1, size=(9, 9), seed=5)
    reference_stats(folder, net, image_size=9)
    assert len(calls) == 5
    first.save(tmp_path / "published.npz")
    assert np.array_equal(reference_stats(tmp_path / "published.npz", net).mu, first.mu) and len(calls) == 5


def test_reference_stats_of_an_npz_is_cached_too(tmp_path, monkeypatch):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", arr_0=x)
    net = TinyNet()
    a = reference_stats(tmp_path / "train.npz", net)
    b = reference_stats(tmp_path / "train.npz", net, cache=False)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-12)
    assert len(list((tmp_path / "cache" / "fid-stats").glob("*.npz"))) == 1


def test_network_id():
    a, b = TinyNet(0), TinyNet(1)
    assert network_id(a) == network_id(TinyNet(0)) != network_id(b)
    a.weights_sha256 = "ab" * 32
    assert network_id(a) == "ab" * 32


# ----------------------------------------------------------------------------- damaged files and folders (issue #27)


def _damaged(path, how: str):
    """The file cut in half, or one bit flipped in its last array's data (np.savez stores arrays uncompressed)."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) - 200] ^= 0x10  # inside the last member's bytes, before the zip directory
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_npz_is_one_line_naming_it(tmp_path, how):
    rng = np.random.default_rng(0)
    images = _damaged(_save_npz(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)), how)
    stats = FeatureStats.from_features(rng.standard_normal((40, 32))).save(tmp_path / "stats.npz")
    _damaged(stats, how)
    for path, read in ((images, image_dataset), (stats, FeatureStats.load),
                       (stats, lambda p: reference_stats(p, TinyNet())), (images, lambda p: reference_stats(p, TinyNet()))):
        with pytest.raises(UsageError) as excinfo:
            read(path)
        text = _one_line(excinfo)
        assert str(path) in text and "damaged" in text, text


def _save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_statistics_cache_is_computed_again(tmp_path, monkeypatch, how):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path / "cache"))
    folder = _write_pngs(tmp_path / "data", 5, size=(9, 9))
    first = reference_stats(folder, TinyNet(), image_size=9)
    (cached,) = (tmp_path / "cache" / "fid-stats").glob("*.npz")
    _damaged(cached, how)
    again = reference_stats(folder, TinyNet(), image_size=9)
    np.testing.assert_allclose(again.sigma, first.sigma, rtol=1e-12)
    assert FeatureStats.load(cached).count == 5  # and the cache was written whole again


def test_symlink_loops_are_walked_once(tmp_path):
    """A folder linking to itself and to its parent: each image is listed once, as ImageFolder lists it."""
    folder = _write_pngs(tmp_path / "data", 3, size=(8, 8))
    (folder / "sub").mkdir()
    _write_pngs(folder / "sub", 2, size=(8, 8), seed=1)
    (folder / "sub" / "loop").symlink_to(folder / "sub", target_is_directory=True)
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)
    (folder / "again").symlink_to(folder, target_is_directory=True)
    files = reference._image_files(folder)
    assert len(files) == 5 and len({f.resolve() for f in files}) == 5
    assert len(image_dataset(folder)) == 5


def test_kid_memory_does_not_grow_with_n():
    """At n = 50,000 a float64 copy of both feature sets is 1.6 GB: KID only casts the subsets it draws."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 64, generator=g), torch.randn(20000, 64, generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kid(a, b, subsets=3, subset_size=100)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < a.numel() * 8 / 10, largest  # a subset's matrices, not the whole set in float64
    assert kid(a, b, subsets=3, subset_size=100) == kid(a.double(), b.double(), subsets=3, subset_size=100)


def test_kid_needs_a_subset():
    f = torch.randn(10, 4)
    with pytest.raises(UsageError, match="at least 1 subset") as excinfo:
        kid(f, f, subsets=0)
    _one_line(excinfo)


# ----------------------------------------------------------------------------- reference rows and their pictures


def test_max_images_spreads_the_reference_through_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path / "cache"))
    folder = _write_pngs(tmp_path / "data", 6, size=(9, 9))
    features, stats = reference.reference_features(folder, TinyNet(), 9, max_images=3)
    assert stats.rows == ["00000.png", "00002.png", "00004.png"] and features.shape == (3, 32)
    full, _ = reference.reference_features(folder, TinyNet(), 9)
    assert torch.equal(features, full[[0, 2, 4]])
    again = reference.reference_features(folder, TinyNet(), 9, max_images=3)  # cached, rows and all
    assert again[1].rows == stats.rows and torch.equal(again[0], features)


def test_extracting_a_reference_shows_a_progress_bar_only_when_it_speaks(tmp_path, monkeypatch, capsys):
    """A few thousand reference images take minutes on a CPU: evaluate.py (log given) counts them on the terminal."""
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path / "cache"))
    folder = _write_pngs(tmp_path / "data", 5, size=(9, 9))
    reference.reference_features(folder, TinyNet(), 9, batch_size=2, cache=False)  # quiet: no log, no bar
    assert "reference -> features" not in capsys.readouterr().err
    reference.reference_features(folder, TinyNet(), 9, batch_size=2, cache=False, log=print)
    out, err = capsys.readouterr()
    assert "extracting the features of 5 images" in out and "reference -> features" in err and "0/5 [" in err


def test_reference_images_decode_only_the_rows_asked_for(tmp_path, monkeypatch):
    """nearest.png's training images: the rows it shows are read, the rest of the folder is not touched."""
    from resdiff.data import ImageFolder

    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path / "cache"))
    folder = _write_pngs(tmp_path / "data", 6, size=(14, 11))
    _, stats = reference.reference_features(folder, TinyNet(), 8)
    prepared = ImageFolder(folder, 8, 3, cache=False)
    for name in ("00000.png", "00001.png", "00003.png", "00005.png"):
        (folder / name).write_bytes(b"not an image any more")  # reading any of these would fail
    rows = reference.reference_images(folder, stats, 8, 3)
    assert len(rows) == 6
    for i in (2, 4):
        assert torch.equal(rows[i], prepared[i][0])


def _split_worker(rank: int, world: int, init: str, real, fake, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        figures = {"kid": kid(fake, real, subsets=7, subset_size=20, split=True),
                   "pr": precision_recall(real, fake, k=3, batch_size=8, split=True)}
        mem = memorisation(real, fake, batch_size=8, split=True)
        if rank == 0:
            np.savez(out, kid=figures["kid"], pr=figures["pr"], nearest=mem.nearest.numpy(), distance=mem.distance.numpy(),
                     threshold=mem.threshold)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_kid_precision_recall_and_memorisation_shared_by_two_processes_equal_one(tmp_path):
    """Each process takes its share of KID's subsets and of the nearest-neighbour rows (chunks of 8): same figures."""
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((45, 6)), rng.standard_normal((37, 6)) + 0.3
    out = tmp_path / "split.npz"
    torch.multiprocessing.start_processes(_split_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", real, fake, str(out)),
                                          nprocs=2, join=True, start_method="spawn")
    one = memorisation(real, fake)
    with np.load(out) as split:
        np.testing.assert_allclose(split["kid"], kid(fake, real, subsets=7, subset_size=20), rtol=1e-12)
        assert tuple(split["pr"]) == precision_recall(real, fake, k=3)
        assert np.array_equal(split["nearest"], one.nearest.numpy()) and float(split["threshold"]) == one.threshold
        np.testing.assert_allclose(split["distance"], one.distance.numpy(), rtol=1e-12)
