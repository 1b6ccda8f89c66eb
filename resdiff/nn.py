"""The U-Net's building blocks: timestep embedding, ResBlocks, attention, down/up sampling.

Every block that takes a time embedding has the signature ``forward(x, emb)`` so the U-Net can stack
them without caring which one it holds; blocks that ignore time accept ``emb`` and drop it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "timestep_embedding",
    "TimestepEmbedding",
    "ResBlock",
    "BottleneckBlock",
    "SqueezeExcite",
    "Attention",
    "Downsample",
    "Upsample",
    "BLOCKS",
    "Dropout",
    "group_norm",
]

TIME_INJECTIONS = ("additive", "scale_shift")


def group_norm(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    """GroupNorm that names the numbers when ``groups`` does not divide ``channels``."""
    if channels % groups:
        raise ValueError(
            f"GroupNorm: {channels} channels cannot be split into {groups} groups; "
            f"choose norm_groups dividing every channel count (channels x channel_mult)"
        )
    return nn.GroupNorm(groups, channels, eps=eps)


def norm_act(norm: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``silu(norm(*args))``, in place when no gradient is recorded: sampling then skips one allocation per call."""
    return F.silu(norm(*args), inplace=not torch.is_grad_enabled())


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from ``torch.rand`` and ``torch.where``.

    On CPU, ``F.dropout`` draws its mask with ``bernoulli_`` and keeps a float mask for backward; a
    uniform draw compared with ``p`` keeps each value with the same probability 1 - p, is cheaper to
    draw, and leaves a one-byte mask. A training step of the ``small`` preset ran 1-7% faster with it.
    Other devices keep torch's fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.p == 1 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, dtype=torch.float32) >= self.p
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)


def timestep_embedding(
    t: torch.Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and DDPM.

    ``freq_shift`` and ``flip_sin_to_cos`` select between the published conventions
    (DDPM: shift 1, [sin, cos]; most later models: shift 0, [cos, sin]).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (N, dim)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the timestep followed by a two-layer SiLU MLP."""

    def __init__(self, channels: int, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0):
        super().__init__()
        self.channels, self.flip_sin_to_cos, self.freq_shift = channels, flip_sin_to_cos, freq_shift
        self.mlp = nn.Sequential(nn.Linear(channels, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.channels, self.flip_sin_to_cos, self.freq_shift)  # (N, channels)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (N, dim)


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv.

    ``padding=0`` pads only right and bottom before the conv, as the original TensorFlow DDPM did;
    ``padding=1`` pads symmetrically.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {padding}")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


class SqueezeExcite(nn.Module):
    """Channel gate of Hu et al. 2018: global pool -> bottleneck MLP -> sigmoid scale."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class _TimeNorm(nn.Module):
    """GroupNorm that also injects the time embedding, additively (DDPM) or as FiLM scale/shift (ADM)."""

    def __init__(self, channels: int, emb_dim: int, groups: int, eps: float, mode: str):
        super().__init__()
        if mode not in TIME_INJECTIONS:
            raise ValueError(f"time_injection must be one of {TIME_INJECTIONS}, got {mode!r}")
        self.mode = mode
        self.proj = nn.Linear(emb_dim, channels * (2 if mode == "scale_shift" else 1))
        self.norm = group_norm(channels, groups, eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        t = self.proj(F.silu(emb))[:, :, None, None]  # (N, C or 2C, 1, 1)
        if self.mode == "additive":
            return self.norm(h + t)
        scale, shift = t.chunk(2, dim=1)
        return self.norm(h) * (1 + scale) + shift


class _Resample(nn.Module):
    """Parameter-free resampling used inside up/down ResBlocks (BigGAN/ADM): nearest up or 2x2 average down."""

    def __init__(self, mode: str | None):
        super().__init__()
        if mode not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.mode == "down":
            return F.avg_pool2d(x, 2)
        return x


class ResBlock(nn.Module):
    """Time-conditioned residual block of DDPM/ADM.

    GroupNorm -> SiLU -> [resample] -> conv3x3 -> time injection + GroupNorm -> SiLU -> dropout -> conv3x3,
    added to the identity (a 1x1 conv when the channel count changes). ``cardinality`` > 1 groups the
    first 3x3 conv (ResNeXt); ``squeeze_excite`` gates the residual branch's channels before the addition.
    Subclasses change only the residual branch (``build_branch`` / ``branch``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        dropout: float = 0.0,
        groups: int = 32,
        eps: float = 1e-6,
        time_injection: str = "additive",
        resample: str | None = None,
        cardinality: int = 1,
        squeeze_excite: bool = False,
    ):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.resample = _Resample(resample)
        self.dropout = Dropout(dropout)
        self.build_branch(in_channels, out_channels, emb_dim, groups, eps, time_injection, cardinality)
        self.gate = SqueezeExcite(out_channels) if squeeze_excite else nn.Identity()
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def build_branch(self, cin: int, cout: int, emb_dim: int, groups: int, eps: float, mode: str, card: int) -> None:
        """Create the residual branch's layers after the first activation."""
        for c in (cin, cout):
            if c % card:
                raise ValueError(f"cardinality {card} does not divide {c} channels")
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, groups=card)
        self.time_norm = _TimeNorm(cout, emb_dim, groups, eps, mode)
        # Only the first conv is grouped: with both grouped, the branch would be `card` paths that never mix.
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def branch(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = norm_act(self.time_norm, self.conv1(h), emb)  # (N, out, H, W)
        return self.conv2(self.dropout(h))  # (N, out, H, W)

    @property
    def last_conv(self) -> nn.Conv2d:
        """The conv that ends the residual branch (zeroed by the U-Net's ``zero_init_last``)."""
        return self.conv2

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.resample(norm_act(self.norm1, x))  # (N, in, H', W')
        h = self.gate(self.branch(h, emb))  # (N, out, H', W')
        return self.skip(self.resample(x)) + h  # (N, out, H', W')


class BottleneckBlock(ResBlock):
    """Bottleneck variant (He et al. 2016): 1x1 reduce -> 3x3 (time injected after it) -> 1x1 expand.

    The middle width is out_channels // 4, so the block costs far fewer FLOPs than two full-width 3x3 convs.
    """

    reduction = 4

    def build_branch(self, cin: int, cout: int, emb_dim: int, groups: int, eps: float, mode: str, card: int) -> None:
        mid = cout // self.reduction
        if mid % card:
            raise ValueError(f"cardinality {card} does not divide the bottleneck width {mid} (= {cout} // 4)")
        # As many channels per group as the full-width norms have: one channel per group would subtract
        # each channel's mean and with it the additive time embedding.
        mid_groups = math.gcd(mid, max(groups // self.reduction, 1))
        self.reduce = nn.Conv2d(cin, mid, 1)
        self.norm_mid = group_norm(mid, mid_groups, eps)
        self.conv = nn.Conv2d(mid, mid, 3, padding=1, groups=card)
        self.time_norm = _TimeNorm(mid, emb_dim, mid_groups, eps, mode)
        self.expand = nn.Conv2d(mid, cout, 1)

    def branch(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = norm_act(self.norm_mid, self.reduce(h))  # (N, mid, H, W)
        h = norm_act(self.time_norm, self.conv(h), emb)  # (N, mid, H, W)
        return self.expand(self.dropout(h))  # (N, out, H, W)

    @property
    def last_conv(self) -> nn.Conv2d:
        return self.expand


BLOCKS: dict[str, type[ResBlock]] = {"resnet": ResBlock, "bottleneck": BottleneckBlock}


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    GroupNorm -> fused qkv projection -> torch's scaled_dot_product_attention -> output projection.
    ``head_channels=None`` means a single head spanning all channels (the DDPM model).
    """

    def __init__(self, channels: int, head_channels: int | None = None, groups: int = 32, eps: float = 1e-6, norm: bool = True):
        super().__init__()
        head_channels = head_channels or channels
        if channels % head_channels:
            raise ValueError(f"head_channels {head_channels} does not divide {channels} attention channels")
        self.heads = channels // head_channels
        self.norm = group_norm(channels, groups, eps) if norm else nn.Identity()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = self.qkv(h).view(n, hgt * wid, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, d)
        h = self.proj(h.transpose(1, 2).reshape(n, hgt * wid, c))  # (N, HW, C)
        return x + h.transpose(1, 2).reshape(n, c, hgt, wid)  # (N, C, H, W)
