"""Helpers shared by the tests that sample: a small U-Net whose output depends on its weights, saved as a pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from resdiff import UNet

SMALL = dict(sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), norm_groups=8)
FEW = {"ddpm": 10, "ddim": 4, "dpm++": 4, "euler": 4, "heun": 3}  # steps per sampler in these tests


def save_pipeline(unet, folder: Path) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def small_unet(seed: int, **overrides) -> UNet:
    """A fresh U-Net whose output depends on its weights: with zero_init_last (the default) every fresh model
    would predict exactly 0, and models of different seeds would sample the same images."""
    torch.manual_seed(seed)
    return UNet(**{**SMALL, "zero_init_last": False, **overrides})
