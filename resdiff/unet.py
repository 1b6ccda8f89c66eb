"""The ResNet U-Net of DDPM (Ho et al. 2020) and its descendants, as a diffusers model.

Encoder levels of time-conditioned ResBlocks (with self-attention at chosen resolutions) halve the
resolution; a middle ResBlock-attention-ResBlock; decoder levels mirror the encoder, each block
taking the matching encoder activation as a skip connection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .nn import BLOCKS, RES_BLOCKS, Attention, Downsample, TimestepEmbedding, Upsample, group_norm

__all__ = ["UNet", "UNetOutput", "PRESETS", "sample_shape", "sized_preset"]


_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def no_safetensors(folder: Path) -> str | None:
    """Why ``folder``'s weights cannot be loaded (it has no .safetensors file, and which pickle files it has
    instead: those can run code when loaded and are never opened), or None when it has safetensors weights.
    The one place both ``UNet.from_pretrained`` and ``model_folder.load_model`` refuse pickles."""
    if any(folder.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLES) if folder.is_dir() else []
    found = f" (it has {', '.join(pickles)}: pickle files, which can run code and are never loaded)" if pickles else ""
    return f"{folder} has no .safetensors weights{found}"


def sample_shape(sample_size: int | Sequence[int]) -> tuple[int, int]:
    """``sample_size`` as (height, width): one number is a square; a pair is (height, width), as in diffusers."""
    if isinstance(sample_size, int) and not isinstance(sample_size, bool):
        return sample_size, sample_size
    if isinstance(sample_size, Sequence) and len(sample_size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in sample_size):
        return int(sample_size[0]), int(sample_size[1])
    raise ValueError(f"sample_size must be an integer or a (height, width) pair of integers, got {sample_size!r}")


@dataclass
class UNetOutput(BaseOutput):
    """What ``UNet.forward`` returns: the predicted noise (or v / x0), shaped like the input."""

    sample: torch.Tensor


def level_resolutions(sample_size: int | Sequence[int], levels: int) -> list[int]:
    """The resolution that ``attention_resolutions`` names for each level: its shorter side."""
    return [min(sample_shape(sample_size)) // 2**i for i in range(levels)]


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks, each optionally followed by attention, then a resampler."""

    def __init__(self, blocks: list[nn.Module], attentions: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


def resblock_resamplers(resblock_updown: bool | Sequence[bool], levels: int) -> tuple[list[bool], list[bool]]:
    """``resblock_updown`` for each resampler: (the encoder's downsamplers, top level first; the decoder's upsamplers,
    bottom level first)."""
    n = levels - 1
    if isinstance(resblock_updown, str) or not isinstance(resblock_updown, Sequence):
        flags = [bool(resblock_updown)] * (2 * n)
    else:
        flags = list(resblock_updown)
        if len(flags) != 2 * n or not all(isinstance(f, bool) for f in flags):
            raise ValueError(
                f"resblock_updown must be a bool or {2 * n} bools, one per resampler ({n} down, then {n} up), "
                f"got {resblock_updown!r}"
            )
    return flags[:n], flags[n:]


class UNet(ModelMixin, ConfigMixin):
    """ResNet U-Net for diffusion: ``forward(sample, timestep, class_labels=None)`` predicts the noise.

    Args:
        sample_size: training resolution: one side (square) or (height, width); attention levels are found from it.
        in_channels / out_channels: image channels (out defaults to in; 2x in for learned variance).
        channels: width of the first level; level i has ``channels * channel_mult[i]``.
        num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
        attention_resolutions: resolutions (e.g. 16 for 16x16) whose blocks are followed by self-attention. A level's
            resolution is its shorter side: with sample_size (64, 128), 16 names the 16x32 level (so a portrait or
            landscape model puts attention where the square model of its shorter side does).
        head_channels: width of one attention head; None is one head over all channels.
        norm_groups / norm_eps: GroupNorm settings used everywhere.
        flip_sin_to_cos / freq_shift: timestep-embedding convention (DDPM: False / 1).
        time_injection: "additive" (DDPM) or "scale_shift" (FiLM, improved DDPM / ADM).
        resblock_updown: resample with ResBlocks (BigGAN / ADM) instead of strided conv / nearest+conv; True or False
            for every resampler, or one bool per resampler in the order forward applies them: the encoder's
            ``levels - 1`` downsamplers from the top level down, then the decoder's ``levels - 1`` upsamplers from
            the bottom up (diffusers' ``down_block_types[:-1]`` then ``up_block_types[:-1]``).
        downsample_padding: 1 pads the strided conv symmetrically, 0 pads right/bottom (TF DDPM).
        zero_init_last: start the last layer of every residual branch (ResBlock and attention) and the output conv
            at zero, as DDPM did: each block starts as its skip path (see ``initialize_weights``).
        num_classes: class-conditional when set; label ``num_classes`` is the null class used for
            classifier-free guidance and when no labels are given.
        block / cardinality / squeeze_excite: ResBlock variant ("basic": nn.ResBlock, "bottleneck":
            nn.BottleneckResBlock), grouped 3x3 convs
            (ResNeXt) and a squeeze-and-excitation gate.
        mid_attention_norm: GroupNorm before the middle attention (diffusers omits it for scale_shift models).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        head_channels: int | None = None,
        dropout: float = 0.0,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        flip_sin_to_cos: bool = False,
        freq_shift: float = 1,
        time_injection: str = "additive",
        resblock_updown: bool | Sequence[bool] = False,
        downsample_padding: int = 1,
        zero_init_last: bool = True,
        num_classes: int | None = None,
        block: str = "basic",
        cardinality: int = 1,
        squeeze_excite: bool = False,
        mid_attention_norm: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        levels = len(channel_mult)
        Block = BLOCKS.get(block)
        if Block is None:
            raise ValueError(f"unknown block {block!r}; choose one of {sorted(BLOCKS)}")
        hgt, wid = sample_shape(sample_size)
        if hgt < 1 or wid < 1 or hgt % 2 ** (levels - 1) or wid % 2 ** (levels - 1):
            shown = hgt if hgt == wid else f"{hgt}x{wid}"
            raise ValueError(
                f"sample_size {shown} is not divisible by 2**{levels - 1} = {2 ** (levels - 1)} "
                f"(the U-Net halves the resolution {levels - 1} times)"
            )
        resolutions = level_resolutions(sample_size, levels)
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            sizes = "" if hgt == wid else " (the shorter side of its levels " + ", ".join(
                f"{hgt // 2**i}x{wid // 2**i}" for i in range(levels)) + ")"
            raise ValueError(f"attention_resolutions {unknown} are not resolutions of this U-Net; it has {resolutions}{sizes}")
        down_updown, up_updown = resblock_resamplers(resblock_updown, levels)
        self.gradient_checkpointing = False
        emb_dim = 4 * channels

        def res_block(cin: int, cout: int, resample: str | None = None) -> nn.Module:
            return Block(
                cin, cout, emb_dim, dropout=dropout, groups=norm_groups, eps=norm_eps, time_injection=time_injection,
                resample=resample, cardinality=cardinality, squeeze_excite=squeeze_excite,
            )

        def attention(ch: int, res: int, norm: bool = True) -> nn.Module:
            if res not in attention_resolutions:
                return nn.Identity()
            return Attention(ch, head_channels, norm_groups, norm_eps, norm=norm)

        self.time_embed = TimestepEmbedding(channels, emb_dim, flip_sin_to_cos, freq_shift)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # Encoder: remember each output's width, the decoder consumes them in reverse.
        widths = [channels * m for m in channel_mult]
        skips, ch = [channels], channels
        self.down = nn.ModuleList()
        for i, (cout, res) in enumerate(zip(widths, resolutions)):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(res_block(ch, cout))
                attns.append(attention(cout, res))
                ch = cout
                skips.append(ch)
            resample = None
            if i < levels - 1:
                resample = res_block(ch, ch, "down") if down_updown[i] else Downsample(ch, downsample_padding)
                skips.append(ch)
            self.down.append(Level(blocks, attns, resample))

        self.mid = Level(
            [res_block(ch, ch), res_block(ch, ch)],
            [Attention(ch, head_channels, norm_groups, norm_eps, norm=mid_attention_norm)],
            None,
        )

        self.up = nn.ModuleList()
        for j, i in enumerate(reversed(range(levels))):
            cout, res = widths[i], resolutions[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(res_block(ch + skips.pop(), cout))
                attns.append(attention(cout, res))
                ch = cout
            resample = None
            if i > 0:
                resample = res_block(ch, ch, "up") if up_updown[j] else Upsample(ch)
            self.up.append(Level(blocks, attns, resample))

        self.out = nn.Sequential(group_norm(ch, norm_groups, norm_eps), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DDPM's initialisation (Ho et al. 2020, their reference code): every conv and linear layer Glorot-uniform
        (variance scaling 1, fan_avg) with zero biases; with ``zero_init_last``, the last layer of every residual
        branch (each ResBlock's last conv, each attention's output projection) and the output conv start at zero.

        Why this one, measured (bench/learning.py, the DDPM recipe: Adam 2e-4; docs/benchmarks.md): Kaiming-normal
        weights with ReLU gain are sqrt(2) to 2x larger than these, and Adam moves each weight by about the same
        absolute step whatever its size, so the layers that a GroupNorm follows learn correspondingly slower
        relative to their scale; with them the samples' quality fell behind diffusers' UNet2DModel from 500 steps on.
        Zeroed branch ends make every block start as its skip path and the network predict 0 (Goyal et al. 2017;
        DDPM; ADM), which helps early on."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)  # U(+-sqrt(6 / (fan_in + fan_out)))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.config.zero_init_last:
            last = [getattr(m, m.branch_end) for m in self.modules() if isinstance(m, RES_BLOCKS)]
            last += [m.proj for m in self.modules() if isinstance(m, Attention)]
            for layer in (*last, self.out[-1]):
                nn.init.zeros_(layer.weight)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "UNet":
        """A named configuration (see PRESETS), with any constructor argument overridden."""
        if name == "auto":
            levels = len(overrides["channel_mult"]) if "channel_mult" in overrides else None
            return cls(**{**sized_preset(overrides.get("sample_size", 32), levels), **overrides})
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted([*PRESETS, 'auto'])}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "UNet":
        """Load a saved UNet; only safetensors weights are read, never pickles.

        A pickled ``diffusion_pytorch_model.bin`` can run arbitrary code when loaded, so it is never opened:
        ``use_safetensors=False`` is refused, and a local folder that has no .safetensors weights is an error
        naming the pickle files it holds instead."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("UNet.from_pretrained reads safetensors weights only; use_safetensors=False is not supported")
        kwargs["use_safetensors"] = True
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None and os.path.isdir(source):
            folder = Path(source) / (kwargs.get("subfolder") or "")
            problem = no_safetensors(folder) if folder.is_dir() else None
            if problem:
                raise FileNotFoundError(f"{problem}; re-save the model with safetensors")
        return super().from_pretrained(*args, **kwargs)

    def compile_blocks(self, **kwargs: Any) -> "UNet":
        """torch.compile each ResBlock and attention block in place (regional compilation).

        Compiling the repeated blocks rather than the whole U-Net cuts compile time, and state_dict
        keys stay unchanged, so checkpoints and save_pretrained are unaffected. ``kwargs`` go to
        torch.compile.

        All blocks of a kind share one forward, and each input shape, training flag and grad mode
        compiles a graph of its own: ddpm-cifar10 in training needs more than dynamo's default
        ``recompile_limit`` of 8, past which the remaining blocks silently run eager. The limit is
        raised (never lowered) to two graphs per block, one for training and one for sampling.
        """
        import torch._dynamo

        blocks = [m for m in self.modules() if isinstance(m, (*RES_BLOCKS, Attention))]
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
        for m in blocks:
            m.compile(**kwargs)
        return self

    @property
    def downsampling_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def _timesteps(self, timestep: torch.Tensor | float | int, n: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.numel() == 1:
            return t.reshape(1).expand(n)
        if t.shape != (n,):
            raise ValueError(f"timestep must be a scalar or hold one value per sample ({n}), got shape {tuple(t.shape)}")
        return t

    def _block(self, module: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, h, emb)
        return module(h, emb)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNetOutput | tuple[torch.Tensor]:
        """Predict the model target for ``sample`` (N, C, H, W) at ``timestep`` (scalar or (N,))."""
        n, _, hgt, wid = sample.shape
        f = self.downsampling_factor
        if hgt % f or wid % f:
            raise ValueError(f"input size {hgt}x{wid} is not divisible by {f} (2 ** (levels - 1)); resize or crop to a multiple of {f}")
        emb = self.time_embed(self._timesteps(timestep, n, sample.device))  # (N, E)
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((n,), self.config.num_classes, device=sample.device, dtype=torch.long)
            emb = emb + self.class_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels were given but this UNet has no num_classes")

        h = self.conv_in(sample)  # (N, C0, H, W)
        skips = [h]
        for level in self.down:  # level i: resolution H_i = H / 2**i, width C_i
            for block, attn in zip(level.blocks, level.attentions):
                h = attn(self._block(block, h, emb))  # (N, C_i, H_i, W_i)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h, emb)  # (N, C_i, H_i / 2, W_i / 2)
                skips.append(h)
        first, second = self.mid.blocks
        h = self._block(first, h, emb)  # (N, C_L, H_L, W_L), L the last level
        h = self._block(second, self.mid.attentions[0](h), emb)  # (N, C_L, H_L, W_L)
        for level in self.up:  # from the last level back to the first
            for block, attn in zip(level.blocks, level.attentions):
                h = torch.cat([h, skips.pop()], dim=1)  # (N, C + C_skip, H_i, W_i)
                h = attn(self._block(block, h, emb))  # (N, C_i, H_i, W_i)
            if level.resample is not None:
                h = level.resample(h, emb)  # (N, C_i, 2 H_i, 2 W_i)
        out = self.out(h)  # (N, out_channels, H, W)
        return UNetOutput(sample=out) if return_dict else (out,)


# Named configurations: sizes only. Parameter counts are checked by tests.
PRESETS: dict[str, dict[str, Any]] = {
    # DDPM's CIFAR-10 model (Ho et al. 2020): 35.7M parameters; the same layout as google/ddpm-cifar10-32.
    "ddpm-cifar10": dict(
        sample_size=32, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
        dropout=0.1, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    ),
    # DDPM's 256x256 model (CelebA-HQ, LSUN): 113.7M parameters; the layout of google/ddpm-celebahq-256.
    "ddpm-celebahq-256": dict(
        sample_size=256, channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions=(16,),
        dropout=0.0, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    ),
    # A small model for 32x32 data that trains in minutes on a laptop CPU (the demo).
    "tiny": dict(
        sample_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
        norm_groups=8, dropout=0.0, time_injection="scale_shift", flip_sin_to_cos=True, freq_shift=0,
    ),
    # A mid-sized model for quick experiments and benchmarks (about 9M parameters).
    "small": dict(
        sample_size=32, channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
        dropout=0.1, flip_sin_to_cos=True, freq_shift=0,
    ),
}


def sized_preset(sample_size: int | Sequence[int], levels: int | None = None) -> dict[str, Any]:
    """The "auto" preset, what train.py builds unless told otherwise: the tiny preset's blocks and widths with
    as many levels as the image needs to come down to about 8 pixels (32 -> 3 levels, as tiny; 64 -> 4;
    128 -> 5; 28 -> 2, as far as halving stays exact), attention at the lowest level and, from 64 pixels up,
    at 16 too (as ADM's 64x64 models). ``levels`` given (a channel_mult of the user's) only places the attention.
    The widths were chosen on real 32x32 images (bench/tuning.py)."""
    hgt, wid = sample_shape(sample_size)
    short = min(hgt, wid)
    if levels is None:
        levels = 1
        while short // 2**levels >= 8 and hgt % 2**levels == 0 and wid % 2**levels == 0:
            levels += 1
    resolutions = level_resolutions(sample_size, levels)
    attention = {resolutions[-1]} | ({16} if short >= 64 and 16 in resolutions else set())
    return {**PRESETS["tiny"], "sample_size": sample_size, "channel_mult": (1,) + (2,) * (levels - 1),
            "attention_resolutions": tuple(sorted(attention, reverse=True))}
