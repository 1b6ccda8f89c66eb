"""The classic ResNet family: ImageNet ResNets (He et al. 2015), ResNeXt, Wide ResNet, CIFAR ResNets and
pre-activation ResNets (He et al. 2016), all built by one `ResNet` class from interchangeable blocks.

ImageNet models use torchvision's state_dict names and shapes, so its checkpoints load with strict=True.
These blocks know nothing of diffusion time; the U-Net's time-conditioned blocks are resdiff.nn.ResBlock and
resdiff.nn.BottleneckResBlock.
"""

from __future__ import annotations

from typing import Callable, Sequence, Type, Union

import torch
from torch import nn

from .errors import UsageError

__all__ = [
    "conv3x3",
    "conv1x1",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "cifar_resnet",
    "resnet20",
    "resnet56",
    "resnet110",
    "preact_resnet20",
    "preact_resnet56",
    "preact_resnet110",
]

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a norm always follows or precedes it)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


# Every block takes (inplanes, planes, stride, downsample, groups, base_width, norm_layer), outputs
# planes * expansion channels, says whether it is pre-activation (`preact`) and can zero the last layer
# of its residual branch (`zero_init_last`), so `ResNet._make_layer` stacks any of them.


class BasicBlock(nn.Module):
    """Two 3x3 convs, post-activation: conv-norm-ReLU-conv-norm, add the shortcut, ReLU."""

    expansion: int = 1
    preact: bool = False

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise UsageError("BasicBlock supports only groups=1 and width_per_group=64; use Bottleneck")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (N, planes, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (N, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (N, planes, H/s, W/s)
        return self.relu(out + identity)  # (N, planes, H/s, W/s)

    def zero_init_last(self) -> None:
        """Zero the last norm's scale so the residual branch outputs zero."""
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, grouped), 1x1 expand by 4; post-activation (torchvision's "ResNet V1.5")."""

    expansion: int = 4
    preact: bool = False

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups  # ResNeXt / Wide ResNet widen the 3x3 only
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (N, 4*planes, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (N, width, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (N, width, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (N, 4*planes, H/s, W/s)
        return self.relu(out + identity)  # (N, 4*planes, H/s, W/s)

    def zero_init_last(self) -> None:
        """Zero the last norm's scale so the residual branch outputs zero."""
        nn.init.zeros_(self.bn3.weight)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): norm-ReLU-conv twice, clean identity, no ReLU after the add.

    A projection shortcut (`downsample`) reads the pre-activated input, as in the paper's code; the identity
    shortcut reads the raw input, so the sum stream is never normalized or rectified inside a stage.
    """

    expansion: int = 1
    preact: bool = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise UsageError("PreActBasicBlock supports only groups=1 and width_per_group=64; use PreActBottleneck")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))  # (N, inplanes, H, W); x itself is kept for the identity
        identity = x if self.downsample is None else self.downsample(pre)  # (N, planes, H/s, W/s)
        out = self.conv1(pre)  # (N, planes, H/s, W/s)
        out = self.conv2(self.relu(self.bn2(out)))  # (N, planes, H/s, W/s)
        return out + identity  # (N, planes, H/s, W/s)

    def zero_init_last(self) -> None:
        """Zero the last conv (no norm follows it in a pre-activation block) so the residual branch outputs zero."""
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al. 2016): norm-ReLU before each of 1x1, 3x3 (strided, grouped), 1x1."""

    expansion: int = 4
    preact: bool = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv1x1(inplanes, width)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))  # (N, inplanes, H, W); x itself is kept for the identity
        identity = x if self.downsample is None else self.downsample(pre)  # (N, 4*planes, H/s, W/s)
        out = self.conv1(pre)  # (N, width, H, W)
        out = self.conv2(self.relu(self.bn2(out)))  # (N, width, H/s, W/s)
        out = self.conv3(self.relu(self.bn3(out)))  # (N, 4*planes, H/s, W/s)
        return out + identity  # (N, 4*planes, H/s, W/s)

    def zero_init_last(self) -> None:
        """Zero the last conv (no norm follows it in a pre-activation block) so the residual branch outputs zero."""
        nn.init.zeros_(self.conv3.weight)


Block = Type[Union[BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck]]


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks (each after the first halves the resolution), pooling, linear head.

    stem="imagenet": 7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max pool (output stride 32 with 4 stages).
    stem="cifar": 3x3 stride-1 conv, norm, ReLU (output stride 4 with 3 stages).
    Pre-activation blocks get a bare conv stem (each block normalizes its own input) and a final norm + ReLU
    before pooling, since their last block ends in a conv.
    num_classes=0 or features_only=True replaces the head by the identity, so forward returns (N, num_features).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "imagenet",
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormLayer | None = None,
        zero_init_residual: bool = False,
        features_only: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise UsageError(f"layers {list(layers)} and widths {list(widths)} must have the same length")
        if stem not in ("imagenet", "cifar"):
            raise UsageError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self._norm_layer = norm_layer = norm_layer or nn.BatchNorm2d
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = widths[0]

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, self.inplanes)
            self.maxpool = nn.Identity()
        self.bn1 = nn.Identity() if block.preact else norm_layer(self.inplanes)
        self.relu = nn.Identity() if block.preact else nn.ReLU(inplace=True)

        self.stage_names = [f"layer{i + 1}" for i in range(len(layers))]
        for i, (name, width, depth) in enumerate(zip(self.stage_names, widths, layers)):
            self.add_module(name, self._make_layer(block, width, depth, stride=1 if i == 0 else 2))

        self.num_features = self.inplanes
        self.final_norm = norm_layer(self.num_features) if block.preact else nn.Identity()
        self.final_relu = nn.ReLU(inplace=True) if block.preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity() if features_only or num_classes == 0 else nn.Linear(self.num_features, num_classes)

        self.initialize_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """Stack `blocks` blocks; the first one changes stride/width, with a 1x1 conv + norm shortcut if needed."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                self._norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, self._norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, groups=self.groups, base_width=self.base_width, norm_layer=self._norm_layer)
            )
        return nn.Sequential(*layers)

    def initialize_weights(self, zero_init_residual: bool = False) -> None:
        """Kaiming-normal convs (fan_out, ReLU gain), unit-scale zero-shift norms, optional zero-init residuals."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): zeroing the last layer of each residual branch
        # makes every block start as its shortcut, which eases early training of deep nets. Post-activation
        # blocks zero their last norm's scale; pre-activation blocks zero their last conv, since no norm follows it.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the head."""
        x = self.relu(self.bn1(self.conv1(x)))  # (N, w0, H/2, W/2) imagenet, (N, w0, H, W) cifar
        x = self.maxpool(x)  # (N, w0, H/4, W/4) imagenet, unchanged for cifar
        for name in self.stage_names:
            x = getattr(self, name)(x)  # each stage after the first halves H and W
        x = self.final_relu(self.final_norm(x))  # (N, num_features, h, w)
        return torch.flatten(self.avgpool(x), 1)  # (N, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)  # (N, num_features)
        return self.fc(x)  # (N, num_classes), or (N, num_features) with an identity head


# ImageNet models: torchvision's layer counts and names.


def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (11.7M params with 1000 classes)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (21.8M params)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (25.6M params)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (44.5M params)."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (60.2M params)."""
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017): 32 groups of width 4 in each 3x3."""
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


def wide_resnet50_2(**kwargs) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016): the bottleneck's inner width doubled."""
    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=128, **kwargs)


# CIFAR models (He et al. 2015, sec. 4.2): 3 stages of 16/32/64 channels, n blocks each, depth 6n + 2.


def cifar_resnet(depth: int, preact: bool = False, num_classes: int = 10, **kwargs) -> ResNet:
    """A CIFAR ResNet of depth 6n + 2 built from (pre-activation) basic blocks."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise UsageError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    block = PreActBasicBlock if preact else BasicBlock
    return ResNet(block, [n, n, n], num_classes=num_classes, widths=(16, 32, 64), stem="cifar", **kwargs)


def resnet20(**kwargs) -> ResNet:
    """CIFAR ResNet-20."""
    return cifar_resnet(20, **kwargs)


def resnet56(**kwargs) -> ResNet:
    """CIFAR ResNet-56."""
    return cifar_resnet(56, **kwargs)


def resnet110(**kwargs) -> ResNet:
    """CIFAR ResNet-110."""
    return cifar_resnet(110, **kwargs)


def preact_resnet20(**kwargs) -> ResNet:
    """CIFAR pre-activation ResNet-20."""
    return cifar_resnet(20, preact=True, **kwargs)


def preact_resnet56(**kwargs) -> ResNet:
    """CIFAR pre-activation ResNet-56."""
    return cifar_resnet(56, preact=True, **kwargs)


def preact_resnet110(**kwargs) -> ResNet:
    """CIFAR pre-activation ResNet-110."""
    return cifar_resnet(110, preact=True, **kwargs)
