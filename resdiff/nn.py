"""The U-Net's building blocks: timestep embedding, ResBlocks, attention, down/up sampling.

Each time-conditioned block is self-contained, with ``forward(x, emb)``: GroupNorm, the timestep injected
(added, or as scale and shift), and the skip connection, all in its forward. Downsample and Upsample fill the
same resampler slot of a U-Net level as a resampling ResBlock, so they accept ``emb`` and drop it;
attention is time-independent and takes ``x`` only. In shape comments, H' x W' is the resolution after a
block's optional resampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "timestep_embedding",
    "TimestepEmbedding",
    "ResBlock",
    "BottleneckResBlock",
    "SqueezeExcite",
    "Attention",
    "Downsample",
    "Upsample",
    "BLOCKS",
    "RES_BLOCKS",
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


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient is recorded (sampling then skips one allocation); never apply it to an input."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def norm_act(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))``, the activation in place when no gradient is recorded (see ``silu``)."""
    return silu(norm(x))


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from 16 random bits per value, four values to a 64-bit draw.

    On CPU, ``F.dropout`` draws its mask with ``bernoulli_`` (one 32-bit draw per value, on one core) and
    keeps a float mask for backward. Here each value gets 16 bits of one 64-bit draw, so the serial random
    number generator does a quarter of the draws, and two multiplies replace ``torch.where``. A value is
    dropped with probability ``round(p * 65536) / 65536`` (within 2^-17 of ``p``; at least 1/65536) and
    the kept are scaled by the inverse of the kept fraction, so the expectation is exactly the input
    (measured against ``torch.rand`` + ``torch.where``: docs/benchmarks.md). Other devices, and code
    under ``torch.compile``, keep torch's own dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile, torch's dropout: Inductor fuses its mask into the neighbouring kernels, and
        # the in-place random_ below would split the compiled graph in two.
        if not self.training or self.p == 0 or self.p == 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        keep, kept = _keep_mask(x, self.p)
        # Scale, then mask: the scale multiplies at float precision (a bf16 mask of 1/(1 - p) would round it
        # and bias every output by up to 0.2%); a 0/1 mask is exact in any dtype.
        return x * (1 / kept) * keep


def _keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A 0/1 CPU tensor shaped and typed like ``x`` that drops with probability ~``p`` (to 1/65536), and the
    probability of a 1."""
    dropped = min(max(round(p * 65536), 1), 65535)  # of 65536 equally likely 16-bit values
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # every 64-bit value equally likely
    lanes = draws.view(torch.int16)[:n].view(x.shape)  # four independent uniform int16 per draw
    keep = lanes >= dropped - 32768  # int16 runs from -32768: P(drop) = dropped / 65536
    return keep.to(x.dtype), (65536 - dropped) / 65536


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


def time_projection(emb_dim: int, channels: int, mode: str) -> nn.Linear:
    """The linear map from the time embedding to a shift per channel ("additive") or a scale and a shift ("scale_shift")."""
    if mode not in TIME_INJECTIONS:
        raise ValueError(f"time_injection must be one of {TIME_INJECTIONS}, got {mode!r}")
    return nn.Linear(emb_dim, channels * (2 if mode == "scale_shift" else 1))


def check_cardinality(cardinality: int, *channels: int, what: str = "") -> None:
    """A grouped conv needs ``cardinality`` to divide each of its channel counts."""
    for c in channels:
        if c % cardinality:
            raise ValueError(f"cardinality {cardinality} does not divide {what or f'{c} channels'}")


class ResBlock(nn.Module):
    """Time-conditioned residual block of DDPM/ADM: two 3x3 convs, GroupNorm, the timestep, a skip connection."""

    branch_end = "conv2"  # the layer that ends the residual branch: UNet.initialize_weights zeroes it

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
        self.time_injection = time_injection
        self.norm1 = group_norm(in_channels, groups, eps)
        self.resample = _Resample(resample)
        self.dropout = Dropout(dropout)
        check_cardinality(cardinality, in_channels, out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=cardinality)  # ResNeXt when cardinality > 1
        self.time_proj = time_projection(emb_dim, out_channels, time_injection)
        self.norm2 = group_norm(out_channels, groups, eps)
        # Only conv1 is grouped: with both grouped, the branch would be `cardinality` paths that never mix.
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.gate = SqueezeExcite(out_channels) if squeeze_excite else nn.Identity()  # gates the branch's channels
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.resample(norm_act(self.norm1, x)))  # (N, out, H', W')
        t = self.time_proj(F.silu(emb))[:, :, None, None]  # (N, out or 2 out, 1, 1)
        if self.time_injection == "additive":
            h = norm_act(self.norm2, h + t)  # (N, out, H', W'): DDPM adds the time, then normalises
        else:
            scale, shift = t.chunk(2, dim=1)  # 2 x (N, out, 1, 1)
            h = silu(self.norm2(h) * (1 + scale) + shift)  # (N, out, H', W'): ADM normalises, then scales and shifts
        h = self.gate(self.conv2(self.dropout(h)))  # (N, out, H', W')
        return self.skip(self.resample(x)) + h  # (N, out, H', W')


class BottleneckResBlock(nn.Module):
    """Time-conditioned bottleneck block (1x1 reduce, 3x3, 1x1 expand; He et al. 2016), not the classic resnet.Bottleneck."""

    reduction = 4
    branch_end = "expand"  # the layer that ends the residual branch: UNet.initialize_weights zeroes it

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
        self.time_injection = time_injection
        self.norm1 = group_norm(in_channels, groups, eps)
        self.resample = _Resample(resample)
        self.dropout = Dropout(dropout)
        mid = out_channels // self.reduction  # far fewer FLOPs than ResBlock's two full-width 3x3 convs
        check_cardinality(cardinality, mid, what=f"the bottleneck width {mid} (= {out_channels} // {self.reduction})")
        # As many channels per group as the full-width norms have: one channel per group would subtract
        # each channel's mean and with it the additive time embedding.
        mid_groups = math.gcd(mid, max(groups // self.reduction, 1))
        self.reduce = nn.Conv2d(in_channels, mid, 1)
        self.norm2 = group_norm(mid, mid_groups, eps)
        self.conv = nn.Conv2d(mid, mid, 3, padding=1, groups=cardinality)  # ResNeXt when cardinality > 1
        self.time_proj = time_projection(emb_dim, mid, time_injection)
        self.norm3 = group_norm(mid, mid_groups, eps)
        self.expand = nn.Conv2d(mid, out_channels, 1)
        self.gate = SqueezeExcite(out_channels) if squeeze_excite else nn.Identity()  # gates the branch's channels
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.reduce(self.resample(norm_act(self.norm1, x)))  # (N, mid, H', W')
        h = self.conv(norm_act(self.norm2, h))  # (N, mid, H', W')
        t = self.time_proj(F.silu(emb))[:, :, None, None]  # (N, mid or 2 mid, 1, 1)
        if self.time_injection == "additive":
            h = norm_act(self.norm3, h + t)  # (N, mid, H', W'): DDPM adds the time, then normalises
        else:
            scale, shift = t.chunk(2, dim=1)  # 2 x (N, mid, 1, 1)
            h = silu(self.norm3(h) * (1 + scale) + shift)  # (N, mid, H', W'): ADM normalises, then scales and shifts
        h = self.gate(self.expand(self.dropout(h)))  # (N, out, H', W')
        return self.skip(self.resample(x)) + h  # (N, out, H', W')


# UNet(block=...) -> block class. Both share one interface: (in, out, emb_dim, **options), forward(x, emb).
BLOCKS: dict[str, type[nn.Module]] = {"basic": ResBlock, "bottleneck": BottleneckResBlock}
RES_BLOCKS = tuple(BLOCKS.values())  # for isinstance: every time-conditioned residual block


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        # Views only (a reshape, then a permute), as the hand-written view + permute before it.
        q, k, v = rearrange(self.qkv(h), "n l (three heads d) -> three n heads l d", three=3, heads=self.heads)  # 3 x (N, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, d)
        h = self.proj(rearrange(h, "n heads l d -> n l (heads d)"))  # (N, HW, C)
        return x + h.transpose(1, 2).reshape(n, c, hgt, wid)  # (N, C, H, W)
