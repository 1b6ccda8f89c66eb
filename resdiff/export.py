"""A trained model as a folder to share: a DDPMPipeline folder with its card and SHA256SUMS.

    resdiff's format    the U-Net is resdiff's ``UNet`` (model_index.json names ["resdiff.unet", "UNet"]): every
                        architecture resdiff trains; loading it takes ``import resdiff`` first
    diffusers' format   the U-Net converted exactly to diffusers' ``UNet2DModel`` (``resdiff.convert``), the
                        scheduler ``DDPMScheduler``: loads with diffusers alone, where the architecture converts

The model is read through ``model_folder.load_model`` (safetensors only, every file checked) and written under a
temporary name, renamed into place when whole; a model that does not convert, or a folder that is not a model,
is a UsageError before anything is written. The card (``resdiff.card``) describes the model from its run
directory when it comes from one (``rundir.model_origin``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from .layout import CARD_FILES, UNET_CONFIG
from .layout import CARD_FILES, UNET_CONFIG
from .convert import to_diffusers
from .errors import UsageError
from .files import WRITE_ERRORS, temporary, write_checksums, write_problem
from .model_folder import find_model_folder, load_model
from .rundir import model_origin, write_model_card

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
    if diffusers and not isinstance(model, UNet2DModel):
        try:
            model = to_diffusers(model)
        except ValueError as err:
            raise UsageError(f"{folder / UNET_CONFIG}: {err}; export it without --diffusers (resdiff's format, which "
                             f"loads in diffusers after `import resdiff`)") from None
    pipeline = DDPMPipeline(unet=model, scheduler=DDPMScheduler.from_config(scheduler_config))
    run_dir, step = model_origin(folder)
    tmp = temporary(out)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        pipeline.save_pretrained(tmp, safe_serialization=True)
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
