"""resdiff: diffusion models built around a ResNet U-Net.

The U-Net and its blocks import without the trainer, accelerate or data code:
``from resdiff import UNet``. The package imports its public names on first use, so ``import resdiff.config``
loads neither torch nor diffusers.

Architecture: one concept per module, dependencies pointing one way (blocks -> model -> diffusion ->
loop -> CLIs). Who owns what (docs/design.md has the long form):

    nn.py          the blocks: time embedding, ResBlock (GroupNorm, time scale/shift, skip), attention, resampling
    unet.py        UNet: the blocks assembled, its initialisation and presets      convert.py  <-> diffusers UNet2DModel
    diffusion.py   GaussianDiffusion: noise schedule, training target and loss, sampling loop; Guidance (labels, CFG)
    choices.py     the names users choose from: samplers, precisions, limits (no imports: config.py reads them)
    config.py      Config (its defaults are the tuned recipe), YAML, overrides, the shipped configs by name
    configs/       the shipped configs (package data): cifar10, celebahq256, folder64, landscape64x128
    data.py        file -> pixels, ImageFolder, demo shapes, flips
    hints.py       values against type hints (describe, coerce, fits): config.py's and model_folder.py's checks
    batches.py     ShardedBatches: each process's batches   prepare.py  the prepared dataset: writer and reader
                   (pixels, or an autoencoder's latents: prepare_latents, latent_cache)
    autoencoder.py the autoencoder of latent diffusion: load_autoencoder(SPEC) (a TAESD-family pair, diffusers
                   AutoencoderKL/AutoencoderTiny, a Hub id), encode/decode in [-1, 1], LatentNorm (shift, scale)
    build.py       build_trainer(cfg): checks, run directory, the parts          trainer.py  Trainer: loop and step
    ema.py         EMA weights                rundir.py  RunDir: layout, log, previews, writing checkpoints, export
    checkpoint.py  a checkpoint folder: names, TrainState, checks, listing, rotation, its files written and read
    runlock.py     RunLock: one process writes a run directory at a time
    files.py       whole-file writes, temporary names, the cache folder, SHA256SUMS   images.py   PNG, grids, npz
    model_folder.py  loading run/pipeline/diffusers folders safely
    settings.py    what the generating CLIs let users choose: SamplingSettings (one check), Scoring, editing
                   defaults, the shared flags (no torch: --help answers at once)
    sampling.py    ImageGenerator (a model readied once, then batches), generate, sample_to_folder (the folder
                   writer of sampling and edits)
    processes.py   who am I, my share range(n)[rank::world], gather, the main process acts for all, leave
    inception.py, inception_weights.py  the FID Inception network; where its weights come from, checked
    features.py    a network's features of images (a model's samples: each process its share), float64 statistics
    metrics.py, reference.py   FID/KID/PR/memorisation; images to score and cached reference features
    evaluation.py  the evaluate command's job         quality.py  in-training FID/KID within a share of the time
    charts.py      every chart (matplotlib, headless): named series against x, a run's log against step
    previews.py    preview grids during training (and to the experiment trackers)
    hardware.py    devices, precisions, malloc errors.py  UsageError/TrainingError, the CLI parser
    cli/           the commands resdiff-train, -sample, -evaluate, -prepare (train.py, sample.py, evaluate.py in a
                   clone): each parses its flags and makes one call into the library

From folder to loss (training):
    image folder --data.ImageFolder (decode, channels, resize, crop; uint8 cache)--> batches.ShardedBatches (this
    process's micro-batches, flipped) --> trainer.Trainer.train_step: uint8 -> [-1, 1] (data.to_model_range)
    --> diffusion.GaussianDiffusion.loss(unet.UNet, x0): timesteps, noise, add_noise, target, MSE --> backward,
    clip, AdamW, LR schedule, ema.EMA.update --> every N steps rundir.RunDir: log, preview grid, checkpoint,
    model/ export; at checkpoints quality.TrainingEvaluator: FID/KID of EMA samples, RUN/quality.png

From noise to PNG (sampling):
    run dir / pipeline folder --model_folder.load_model (safetensors only, checked)--> UNet + scheduler config
    --> sampling.ImageGenerator(model, SamplingSettings): per-image noise from (seed, i) -->
    diffusion.GaussianDiffusion.sample (a diffusers scheduler by name; an edit runs its own loop instead)
    --> data.to_uint8 --> images.save_images: 00000.png ... (sample_to_folder: each process its share, processes.share)
"""

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"


class _RunOnFirstUse(types.ModuleType):
    """A module whose code runs when one of its own names is first asked for. Its dunders (``__file__``,
    ``__spec__``, ...) are there from the start, so tools that walk sys.modules do not set it off, as they
    would importlib.util.LazyLoader's modules (which run on any attribute, inside torch's own import)."""

    def __getattr__(self, name: str):  # only for names the module does not have: its code has not run yet
        if name.startswith("__"):
            raise AttributeError(name)
        self.__class__ = types.ModuleType  # a plain module from here on
        try:
            self.__spec__.loader.exec_module(self)
        except BaseException:  # as a failed import does: no half-run module left behind
            sys.modules.pop(self.__name__, None)
            raise
        return getattr(self, name)


def _registered_lazily(name: str) -> types.ModuleType:
    """``resdiff.<name>`` in sys.modules now; its code (and what it imports) runs on first use."""
    full = f"{__name__}.{name}"
    if full not in sys.modules:
        module = importlib.util.module_from_spec(importlib.util.find_spec(full))
        module.__class__ = _RunOnFirstUse
        sys.modules[full] = module
    return sys.modules[full]


# A saved pipeline's model_index.json names the U-Net ["resdiff.unet", "UNet"], and diffusers takes that module
# only from sys.modules: ``import resdiff`` puts it there, and it (with torch and diffusers) loads when the class is
# first asked for. So ``import resdiff.config`` stays light and ``import resdiff`` is enough for from_pretrained.
unet = _registered_lazily("unet")

# Public name -> the module that holds it, imported on first use (PEP 562).
_HOMES = {
    "UNet": "unet", "UNetOutput": "unet", "PRESETS": "unet",
    "ResBlock": "nn", "BottleneckResBlock": "nn", "SqueezeExcite": "nn", "Attention": "nn", "Downsample": "nn",
    "Upsample": "nn", "TimestepEmbedding": "nn",
    "UsageError": "errors",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'resdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
