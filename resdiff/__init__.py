"""resdiff: diffusion models built around a ResNet U-Net.

The U-Net and its blocks import without the trainer, accelerate or data code:
``from resdiff import UNet``.

Architecture: one concept per module, dependencies pointing one way (blocks -> model -> diffusion ->
loop -> CLIs). Who owns what:

    nn.py          the blocks: time embedding, ResBlock (GroupNorm, time scale/shift, skip), attention, resampling
    unet.py        UNet: the blocks assembled, its initialisation and presets      convert.py  <-> diffusers UNet2DModel
    diffusion.py   DDPM: noise schedule, training target and loss, sampling loop; the sampler names
    data.py        file -> pixels, ImageFolder, demo shapes, flips               config.py   Config, YAML, overrides
    batches.py     ShardedBatches: each process's batches   prepare.py  the prepared dataset: writer and reader
    build.py       build_trainer(cfg): checks, run directory, the parts          trainer.py  Trainer: loop and step
    ema.py         EMA weights                rundir.py  RunDir: layout, checkpoints, lock, log, export
    files.py       whole-file writes, temporary names, the cache folder          images.py   PNG, grids, npz
    model_folder.py  loading run/pipeline/diffusers folders safely
    sampling.py    SamplingSettings (every sampling choice, one check), ImageGenerator (a model readied once, then
                   batches), generate, sample_to_folder (the folder writer of sampling and edits)
    processes.py   who am I, my share range(n)[rank::world], gather, the main process acts for all, leave
    inception.py, metrics.py, evaluation.py   FID Inception features, FID/KID/PR/memorisation, evaluate.py's job
    hardware.py    devices, precisions, malloc errors.py  UsageError/TrainingError, the CLI parser

From folder to loss (training):
    image folder --data.ImageFolder (decode, channels, resize, crop; uint8 cache)--> batches.ShardedBatches (this
    process's micro-batches, flipped) --> trainer.Trainer.train_step: uint8 -> [-1, 1] (data.to_model_range)
    --> diffusion.DDPM.loss(unet.UNet, x0): timesteps, noise, add_noise, target, MSE --> backward, clip, AdamW,
    LR schedule, ema.EMA.update --> every N steps rundir.RunDir: log, preview grid, checkpoint, model/ export

From noise to PNG (sampling):
    run dir / pipeline folder --model_folder.load_model (safetensors only, checked)--> UNet + scheduler config
    --> sampling.ImageGenerator(model, SamplingSettings): per-image noise from (seed, i) --> diffusion.DDPM.sample
    (a diffusers scheduler by name; an edit runs its own loop instead) --> data.to_uint8 --> images.save_images:
    00000.png ... (sample_to_folder: each process its share, processes.share)
"""

from .errors import UsageError
from .nn import (
    Attention,
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
    "SqueezeExcite",
    "Attention",
    "Downsample",
    "Upsample",
    "TimestepEmbedding",
    "UsageError",
]
