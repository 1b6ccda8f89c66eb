"""A trained model as a folder to share: a DDPMPipeline folder with its card and SHA256SUMS.

    resdiff's format    the U-Net is resdiff's ``UNet`` (model_index.json names ["resdiff.unet", "UNet"]): every
                        architecture resdiff trains; loading it takes ``import resdiff`` first (a latent model
                        keeps its latent.json: the autoencoder it decodes with, by SPEC and SHA-256)
    diffusers' format   the U-Net converted exactly to diffusers' ``UNet2DModel`` (``resdiff.convert``), the
                        scheduler ``DDPMScheduler``: loads with diffusers alone, where the architecture converts.
                        A latent model whose autoencoder is a diffusers one becomes an ``LDMPipeline`` folder
                        (vqvae: the autoencoder itself, unet, scheduler), which decodes as resdiff does

The model is read through ``model_folder.load_model`` (safetensors only, every file checked) and written under a
temporary name, renamed into place when whole; a model that does not convert, or a folder that is not a model,
is a UsageError before anything is written. The card (``resdiff.card``) describes the model from its run
directory when it comes from one (``rundir.model_origin``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from diffusers import DDPMPipeline, DDPMScheduler, LDMPipeline, UNet2DModel

from .layout import CARD_FILES, LATENT, UNET_CONFIG
from .convert import to_diffusers
from .errors import UsageError
from .files import WRITE_ERRORS, temporary, write_checksums, write_problem
from .model_folder import find_model_folder, latent_space, load_model
from .rundir import model_origin, write_model_card

if TYPE_CHECKING:
    from .autoencoder import LatentSpace

__all__ = ["export_folder"]


def export_folder(source: str | Path, out: str | Path, *, diffusers: bool = False,
                  warn: Callable[[str], None] = print) -> Path:
    """Write the model of ``source`` (a run directory, its model/ or a checkpoint's ema/, or a pipeline folder) to the
    new folder ``out``: in diffusers' own classes with ``diffusers``, else in resdiff's. Returns ``out``."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; choose a new output folder (an export never replaces one)")
    folder = find_model_folder(source)
    model, scheduler_config = load_model(folder, device="cpu")
    latent = latent_space(folder)
    if diffusers and not isinstance(model, UNet2DModel):
        try:
            model = to_diffusers(model)
        except ValueError as err:
            raise UsageError(f"{folder / UNET_CONFIG}: {err}; export it without --diffusers (resdiff's format, which "
                             f"loads in diffusers after `import resdiff`)") from None
    scheduler = DDPMScheduler.from_config(scheduler_config)
    if diffusers and latent is not None:
        pipeline = LDMPipeline(vqvae=_diffusers_autoencoder(latent, folder, model), unet=model, scheduler=scheduler)
    else:
        pipeline = DDPMPipeline(unet=model, scheduler=scheduler)
    run_dir, step = model_origin(folder)
    tmp = temporary(out)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if latent is not None and not diffusers:
            shutil.copy2(folder / LATENT, tmp / LATENT)
        write_model_card(tmp, run_dir, step, out.name, warn)
        write_checksums(tmp, skip=CARD_FILES)  # the model's files; its card may be edited before an upload
        os.replace(tmp, out)
    except WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot write {out} ({write_problem(err)}); free disk space there or choose another folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _diffusers_autoencoder(latent: "LatentSpace", folder: Path, unet: UNet2DModel) -> torch.nn.Module:
    """The diffusers autoencoder a latent model's LDMPipeline decodes with: its own, when the model learnt the
    latents exactly as diffusers' pipeline scales them (``latents / scaling_factor``, no shift, a square size);
    anything else would decode other images than resdiff does, and is one UsageError line."""
    from .autoencoder import LatentNorm

    ae, where = latent.autoencoder, folder / LATENT
    if ae.kind not in ("AutoencoderKL", "AutoencoderTiny"):
        raise UsageError(f"{where}: the model decodes with {ae.spec}, a {ae.kind} pair that diffusers cannot load; "
                         f"export it without --diffusers (resdiff's format)")
    factor = float(ae.vae.config.scaling_factor)
    if latent.norm != LatentNorm.uniform(ae.latent_channels, 0.0, 1 / factor, latent.norm.source):
        raise UsageError(f"{where}: the model learnt latents normalised by {latent.norm.source}, which diffusers' "
                         f"LDMPipeline does not apply (it divides by scaling_factor {factor:g}, no shift); export it "
                         f"without --diffusers (resdiff's format)")
    if not isinstance(unet.config.sample_size, int):
        raise UsageError(f"{where}: LDMPipeline samples square latents, the model's are {unet.config.sample_size}; "
                         f"export it without --diffusers (resdiff's format)")
    return ae.vae
