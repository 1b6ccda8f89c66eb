"""Helpers shared by the tests that sample: a small U-Net whose output depends on its weights, saved as a pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from resdiff import UNet

SMALL = dict(sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), norm_groups=8)
FEW = {"ddpm": 10, "ddim": 4, "dpm++": 4, "euler": 4, "heun": 3, "unipc": 4, "dpm++3m": 4,
       "dpm++sde": 4}  # steps per sampler in these tests


def save_pipeline(unet, folder: Path) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def small_unet(seed: int, **overrides) -> UNet:
    """A fresh U-Net whose output depends on its weights: with zero_init_last (the default) every fresh model
    would predict exactly 0, and models of different seeds would sample the same images."""
    torch.manual_seed(seed)
    return UNet(**{**SMALL, "zero_init_last": False, **overrides})


def tiny_autoencoder(kind: str, folder: Path, seed: int = 0) -> Path:
    """A randomly initialised diffusers AutoencoderTiny ("tiny": 8 channels, 8x, 4 latent channels) or AutoencoderKL
    ("kl": 8/16 channels, 2x, 4 latent channels) saved with save_pretrained: an autoencoder SPEC without
    downloaded weights."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(seed)
    if kind == "tiny":
        vae = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                              latent_channels=4)
    else:
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                            latent_channels=4, sample_size=32, scaling_factor=0.5, shift_factor=0.25)
    vae.save_pretrained(folder)
    return folder


# A diffusers UNet2DModel that converts to resdiff's UNet with tiny_runs.TINY's model keys (channels 16, 8 groups) at 16x16.
DIFFUSERS_SMALL = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)


def diffusers_unet(seed: int, **overrides) -> UNet2DModel:
    """A diffusers UNet2DModel with every weight drawn from N(0, 0.2) by ``seed``: its outputs are its own (a fresh
    resdiff UNet predicts 0), so a loss or sample shows which weights made it."""
    model = UNet2DModel(**{**DIFFUSERS_SMALL, **overrides})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def pickle_only_pipeline(folder: Path) -> Path:
    """A diffusers pipeline saved the old way: its U-Net's weights a pickled diffusion_pytorch_model.bin only."""
    save_pipeline(diffusers_unet(0), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    diffusers_unet(0).save_pretrained(folder / "unet", safe_serialization=False)
    return folder


def pickle_file(path: Path) -> Path:
    """A lone pickle (of the number 1) with a checkpoint's name."""
    path.write_bytes(b"\x80\x04K\x01.")
    return path
