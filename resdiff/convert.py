"""Conversion between diffusers' ``UNet2DModel`` and resdiff's ``UNet``, weights included.

Both networks are walked side by side and each resdiff layer is paired with its diffusers
counterpart; weights are copied pair by pair (the fused qkv projection holds diffusers' separate
q, k and v). The same pairing serves both directions.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from diffusers import UNet2DModel
from torch import nn

from .nn import BLOCKS, ResBlock
from .unet import UNet, level_resolutions, resblock_resamplers

__all__ = ["from_diffusers", "to_diffusers"]

_DOWN = {"DownBlock2D": (False, "conv"), "AttnDownBlock2D": (True, None), "ResnetDownsampleBlock2D": (False, "resnet")}
_UP = {"UpBlock2D": (False, "conv"), "AttnUpBlock2D": (True, None), "ResnetUpsampleBlock2D": (False, "resnet")}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"cannot convert: {what}")


def _level_layout(types: list[str], table: dict, attn_resample: str) -> tuple[list[bool], list[str]]:
    """Which levels have attention, and the resampling kind ("conv" or "resnet") of each resampling level, in order.

    Each block type fixes its kind, except the attention blocks, which all take the model's ``attn_resample``."""
    attn, kinds = [], []
    for i, name in enumerate(types):
        if name not in table:
            raise _unsupported(f"block type {name!r}; supported: {sorted(table)}")
        has_attn, kind = table[name]
        attn.append(has_attn)
        if i < len(types) - 1:
            kinds.append(kind or attn_resample)
    return attn, kinds


def _block_types(attn: list[bool], resblock: list[bool], names: tuple[str, str, str], uniform: bool) -> tuple[list[str], str]:
    """The diffusers block type of each level (diffusers' order) and the one resampling kind its attention blocks share.

    ``attn``: which levels have attention; ``resblock``: whether each resampling level resamples with a ResBlock;
    ``names``: the (conv, resnet, attention) block types; ``uniform``: every resampler is a ResBlock (the last,
    non-resampling level then gets the resnet type, as before per-resampler settings). diffusers gives all attention
    blocks one ``downsample_type`` / ``upsample_type``, so attention levels that resample both ways are refused."""
    conv, resnet, attention = names
    attn_kinds = {r for a, r in zip(attn, resblock) if a}
    if len(attn_kinds) > 1:
        raise _unsupported(f"{attention} levels that resample with both kinds (diffusers sets one kind for all of them)")
    types = [attention if a else (resnet if r else conv) for a, r in zip(attn, resblock + [uniform])]
    kind = attn_kinds.pop() if attn_kinds else uniform
    return types, "resnet" if kind else "conv"


def _unet_config(cfg: Any) -> dict[str, Any]:
    """resdiff UNet keyword arguments equivalent to a diffusers UNet2DModel config."""
    checks = {
        "time_embedding_type": "positional", "act_fn": "silu", "center_input_sample": False,
        "mid_block_scale_factor": 1, "add_attention": True, "mid_block_type": "UNetMidBlock2D", "class_embed_type": None,
    }
    for key, want in checks.items():
        if cfg.get(key, want) != want:
            raise _unsupported(f"{key}={cfg[key]!r} (only {want!r} is supported)")
    ch = cfg["block_out_channels"][0]
    if cfg.get("time_embedding_dim") not in (None, 4 * ch):
        raise _unsupported(f"time_embedding_dim={cfg['time_embedding_dim']} (resdiff uses 4 x {ch})")
    mult = [c // ch for c in cfg["block_out_channels"]]
    if [m * ch for m in mult] != list(cfg["block_out_channels"]):
        raise _unsupported(f"block_out_channels {cfg['block_out_channels']} are not multiples of the first")
    shift = cfg["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise _unsupported(f"resnet_time_scale_shift={shift!r}")
    attn_groups = cfg.get("attn_norm_num_groups")
    if attn_groups not in (None, cfg["norm_num_groups"]):
        raise _unsupported(f"attn_norm_num_groups={attn_groups} differs from norm_num_groups={cfg['norm_num_groups']}")
    size = cfg["sample_size"]
    if size is None:
        raise _unsupported("sample_size is None; set it on the diffusers config first")
    if isinstance(size, (list, tuple)):
        size = tuple(size) if size[0] != size[1] else size[0]  # (height, width); a square stays one number

    down_attn, down_kinds = _level_layout(list(cfg["down_block_types"]), _DOWN, cfg.get("downsample_type") or "conv")
    up_attn, up_kinds = _level_layout(list(cfg["up_block_types"]), _UP, cfg.get("upsample_type") or "conv")
    if up_attn != down_attn[::-1]:
        raise _unsupported("up-block attention does not mirror the down blocks")
    resblock = [kind == "resnet" for kind in down_kinds + up_kinds]  # one per resampler, as UNet(resblock_updown=) takes them
    updown = tuple(resblock) if len(set(resblock)) > 1 else resblock[:1] == [True]  # a single bool when all agree
    return dict(
        sample_size=size, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], channels=ch,
        channel_mult=tuple(mult), num_res_blocks=cfg["layers_per_block"],
        attention_resolutions=tuple(r for r, a in zip(level_resolutions(size, len(down_attn)), down_attn) if a),
        head_channels=cfg.get("attention_head_dim"), dropout=cfg.get("dropout", 0.0),
        norm_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"], flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"], time_injection="additive" if shift == "default" else "scale_shift",
        resblock_updown=updown, downsample_padding=cfg["downsample_padding"],
        num_classes=(cfg["num_class_embeds"] - 1) if cfg.get("num_class_embeds") else None,
        mid_attention_norm=not (shift == "scale_shift" and attn_groups is None),
    )


def _diffusers_config(cfg: Any) -> dict[str, Any]:
    """diffusers UNet2DModel keyword arguments equivalent to a resdiff UNet config."""
    if BLOCKS[cfg.block] is not ResBlock or cfg.cardinality != 1 or cfg.squeeze_excite:
        raise _unsupported("diffusers has no bottleneck, grouped or squeeze-excite ResBlocks")
    scale_shift = cfg.time_injection == "scale_shift"
    if not cfg.mid_attention_norm and not scale_shift:
        raise _unsupported("mid_attention_norm=False is expressible in diffusers only with scale_shift")
    levels = len(cfg.channel_mult)
    attn = [r in cfg.attention_resolutions for r in level_resolutions(cfg.sample_size, levels)]
    down, up = resblock_resamplers(cfg.resblock_updown, levels)
    uniform = all(down + up) if levels > 1 else bool(cfg.resblock_updown)  # for the levels that do not resample
    down_types, down_kind = _block_types(attn, down, ("DownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D"), uniform)
    up_types, up_kind = _block_types(attn[::-1], up, ("UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D"), uniform)
    return dict(
        sample_size=cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size), in_channels=cfg.in_channels, out_channels=cfg.out_channels or cfg.in_channels,
        freq_shift=cfg.freq_shift, flip_sin_to_cos=cfg.flip_sin_to_cos,
        down_block_types=tuple(down_types), up_block_types=tuple(up_types),
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
        downsample_padding=cfg.downsample_padding, downsample_type=down_kind, upsample_type=up_kind, dropout=cfg.dropout,
        attention_head_dim=cfg.head_channels, norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
        attn_norm_num_groups=cfg.norm_groups if (scale_shift and cfg.mid_attention_norm) else None,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
    )


def _resblock_pairs(ours: nn.Module, theirs: nn.Module) -> Iterator[tuple[nn.Module, Any]]:
    yield ours.norm1, theirs.norm1
    yield ours.conv1, theirs.conv1
    yield ours.time_proj, theirs.time_emb_proj
    yield ours.norm2, theirs.norm2
    yield ours.conv2, theirs.conv2
    if isinstance(ours.skip, nn.Conv2d):
        yield ours.skip, theirs.conv_shortcut


def _attention_pairs(ours: nn.Module, theirs: nn.Module) -> Iterator[tuple[nn.Module, Any]]:
    if isinstance(ours.norm, nn.GroupNorm):
        yield ours.norm, theirs.group_norm
    yield ours.qkv, (theirs.to_q, theirs.to_k, theirs.to_v)
    yield ours.proj, theirs.to_out[0]


def _level_pairs(ours: nn.Module, theirs: nn.Module) -> Iterator[tuple[nn.Module, Any]]:
    for i, block in enumerate(ours.blocks):
        yield from _resblock_pairs(block, theirs.resnets[i])
        if not isinstance(ours.attentions[i], nn.Identity):
            yield from _attention_pairs(ours.attentions[i], theirs.attentions[i])
    if ours.resample is not None:
        other = (getattr(theirs, "downsamplers", None) or theirs.upsamplers)[0]
        if isinstance(ours.resample, ResBlock):
            yield from _resblock_pairs(ours.resample, other)
        else:
            yield ours.resample.conv, other.conv


def _pairs(ours: UNet, theirs: UNet2DModel) -> Iterator[tuple[nn.Module, Any]]:
    """Every resdiff layer with its diffusers counterpart (a tuple of three for the fused qkv)."""
    yield ours.time_embed.mlp[0], theirs.time_embedding.linear_1
    yield ours.time_embed.mlp[2], theirs.time_embedding.linear_2
    if ours.class_embed is not None:
        yield ours.class_embed, theirs.class_embedding
    yield ours.conv_in, theirs.conv_in
    for a, b in zip(ours.down, theirs.down_blocks):
        yield from _level_pairs(a, b)
    mid = theirs.mid_block
    yield from _resblock_pairs(ours.mid.blocks[0], mid.resnets[0])
    yield from _attention_pairs(ours.mid.attentions[0], mid.attentions[0])
    yield from _resblock_pairs(ours.mid.blocks[1], mid.resnets[1])
    for a, b in zip(ours.up, theirs.up_blocks):
        yield from _level_pairs(a, b)
    yield ours.out[0], theirs.conv_norm_out
    yield ours.out[2], theirs.conv_out


@torch.no_grad()
def _copy(ours: UNet, theirs: UNet2DModel, into_ours: bool) -> None:
    copied = 0
    for a, b in _pairs(ours, theirs):
        for name, p in a.named_parameters(recurse=False):
            if isinstance(b, tuple):  # fused qkv <-> to_q, to_k, to_v
                parts = [getattr(m, name) for m in b]
                if into_ours:
                    p.copy_(torch.cat(parts, 0))
                else:
                    for q, chunk in zip(parts, p.chunk(3, 0)):
                        q.copy_(chunk)
            else:
                q = getattr(b, name)
                (p.copy_(q) if into_ours else q.copy_(p))
            copied += p.numel()
    total = sum(p.numel() for p in ours.parameters())
    if copied != total or total != sum(p.numel() for p in theirs.parameters()):
        raise RuntimeError(f"conversion paired {copied} of {total} parameters; the architectures do not match")


def _match(model: nn.Module, like: nn.Module) -> nn.Module:
    """Give the converted model the dtype and train/eval mode of the original."""
    if like.dtype != torch.float32:
        model = model.to(dtype=like.dtype)
    return model.train(like.training)


def from_diffusers(model: UNet2DModel) -> UNet:
    """A resdiff UNet equal to ``model`` (same outputs up to float rounding)."""
    ours = UNet(**_unet_config(dict(model.config)))
    _copy(ours, model, into_ours=True)
    return _match(ours, model)


def to_diffusers(unet: UNet) -> UNet2DModel:
    """A diffusers UNet2DModel equal to ``unet``."""
    theirs = UNet2DModel(**_diffusers_config(unet.config))
    _copy(unet, theirs, into_ours=False)
    return _match(theirs, unet)
