"""resdiff: diffusion models built around a ResNet U-Net.

The U-Net and its blocks import without the trainer, accelerate or data code:
``from resdiff import UNet``.
"""

from .errors import UsageError
from .nn import (
    Attention,
    BottleneckBlock,
    BottleneckResBlock,
    Downsample,
    ResBlock,
    SqueezeExcite,
    TimestepEmbedding,
    Upsample,
)
from .unet import PRESETS, UNet, UNetOutput

__version__ = "0.1.0"

__all__ = [
    "UNet",
    "UNetOutput",
    "PRESETS",
    "ResBlock",
    "BottleneckResBlock",
    "BottleneckBlock",  # the old name of BottleneckResBlock
    "SqueezeExcite",
    "Attention",
    "Downsample",
    "Upsample",
    "TimestepEmbedding",
    "UsageError",
]
