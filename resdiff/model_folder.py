"""Loading a trained model from a folder, safely: a run directory, a pipeline folder, a diffusers UNet2DModel.

    run directory   RUN/model/ (the exported EMA pipeline), else the newest whole checkpoints/step-*/ema/
    pipeline folder DDPMPipeline.save_pretrained: model_index.json, unet/ (config.json + weights), scheduler/
    U-Net folder    UNet2DModel.save_pretrained (or resdiff UNet's): config.json + weights; ``load_unet`` only

The U-Net class is chosen from model_index.json among the two known ones (resdiff ``UNet``, diffusers
``UNet2DModel``); no module named there is imported, and weights are read from safetensors only (a pickled
``diffusion_pytorch_model.bin`` can run code when loaded and is never opened). Before any weights are read,
unet/config.json is checked field by field against the class's constructor (unknown names, wrong types),
the model it describes is built on the meta device, and the safetensors header is compared with it, so a
broken folder is one error line naming the file. A folder with ``SHA256SUMS`` (resdiff writes them with every
export and checkpoint) is checked against it first: a file changed since it was written, even at the same
length, is refused by name. sample.py and evaluate.py load models through here; train.py --init-from loads its
starting weights through ``load_unet``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import typing
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch import nn

from .hints import describe, fits
from .errors import UsageError, one_line
from .hardware import default_device
from .files import checksum_problem
from .checkpoint import file_problem, latest_checkpoint
from .layout import EMA, LATENT, MODEL, MODEL_INDEX, PIPELINE_CONFIGS, PIPELINE_WEIGHTS, SCHEDULER_CONFIG, UNET_CONFIG
from .convert import from_diffusers
from .unet import PICKLES, UNet, no_safetensors

__all__ = ["latent_space", "find_model_folder", "load_model", "load_unet"]

_UNET_CLASSES = {("resdiff.unet", "UNet"): UNet, ("resdiff", "UNet"): UNet, ("diffusers", "UNet2DModel"): UNet2DModel}
_SAVED_CLASSES = {"UNet": UNet, "UNet2DModel": UNet2DModel}  # a U-Net folder's config.json "_class_name"
_UNET_FILE_CONFIG = "config.json"  # a U-Net folder's config (a pipeline's unet/config.json)
_PIPELINE_OR_RUN = "pass a run directory or a pipeline folder (with model_index.json)"
_ANY_MODEL = ("pass a run directory, a pipeline folder (with model_index.json) or a saved UNet2DModel folder "
              "(config.json and diffusion_pytorch_model.safetensors)")


def find_model_folder(path: str | Path, accepted: str = _PIPELINE_OR_RUN) -> Path:
    """The pipeline folder behind ``path``: itself, a run's ``model/``, or its newest checkpoint's ``ema/``.
    ``accepted`` ends the error lines: what the caller takes."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; {accepted}")
    if not path.is_dir():
        pickle = " (a pickle file: it can run code when loaded, so it is never opened)" if path.suffix in PICKLES else ""
        raise UsageError(f"{path} is not a folder{pickle}; {accepted}")
    if (path / MODEL_INDEX).is_file():
        folder = path
    elif (path / MODEL).is_dir():
        folder = path / MODEL
    elif (ckpt := latest_checkpoint(path, ema_only=True)) is not None:  # damaged checkpoints are passed over
        folder = ckpt / EMA
    else:
        raise UsageError(f"{path} is not a model: it has no model_index.json, no model/ and no checkpoints/step-*/ema/; "
                         f"{accepted}")
    for needed in PIPELINE_CONFIGS:  # the weights are checked when they are read
        if not (folder / needed).is_file():
            raise UsageError(f"{folder} is not a complete pipeline folder: {needed} is missing; pass a saved DDPMPipeline folder")
    return folder


def load_model(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, dict]:
    """The U-Net (in eval mode, on ``device``; None: the GPU if any, else the CPU) and the training scheduler's
    config, from a run or pipeline folder.

    A diffusers ``UNet2DModel`` is converted to a resdiff ``UNet`` when its architecture allows (same
    outputs, and class-conditional models then get the null label guidance needs); otherwise it is used as is.
    """
    folder = find_model_folder(path)
    cls = _unet_class(folder / MODEL_INDEX)
    model = _load_checked(folder, (folder / UNET_CONFIG).parent, cls, dtype)
    if cls is UNet2DModel:
        try:
            model = from_diffusers(model)
        except ValueError:  # an architecture the converter does not cover is used directly
            pass
    scheduler_config = _read_json(folder / SCHEDULER_CONFIG)
    return model.to(default_device() if device is None else device).eval(), scheduler_config


def load_unet(path: str | Path) -> tuple[UNet, Path]:
    """A resdiff UNet (float32, on the CPU) with the weights of a run directory, a pipeline folder or a saved U-Net
    folder, checked as ``load_model`` checks them; a diffusers UNet2DModel is converted exactly, and one whose
    architecture does not convert is an error. Also returns the weights file, whose digest identifies the model."""
    path = Path(path)
    if path.is_dir() and (path / _UNET_FILE_CONFIG).is_file() and not (path / MODEL_INDEX).is_file():
        checked, unet_dir = path, path
        cls = _saved_class(path / _UNET_FILE_CONFIG)
    else:
        checked = find_model_folder(path, _ANY_MODEL)
        unet_dir, cls = (checked / UNET_CONFIG).parent, _unet_class(checked / MODEL_INDEX)
    model = _load_checked(checked, unet_dir, cls, torch.float32)
    if cls is UNet2DModel:
        try:
            model = from_diffusers(model)
        except ValueError as err:
            raise UsageError(f"{unet_dir / _UNET_FILE_CONFIG}: {err}; resdiff's UNet cannot hold this model, so it "
                             f"cannot be trained here") from None
    weights = unet_dir / Path(PIPELINE_WEIGHTS).name
    if not weights.is_file():
        raise UsageError(f"{weights} is missing (sharded or variant weights are not read here); save the model "
                         f"again with save_pretrained(folder, safe_serialization=True)")
    return model.to("cpu"), weights


def _load_checked(checked: Path, unet_dir: Path, cls: type[nn.Module], dtype: torch.dtype | None) -> nn.Module:
    """The U-Net of ``unet_dir`` as ``cls``, after every check: ``checked``'s SHA256SUMS, safetensors weights only,
    the config field by field, the weights' names and shapes against it."""
    damaged = checksum_problem(checked)
    if damaged:
        raise UsageError(f"{checked}/{damaged}; re-export the model or copy it again")
    problem = no_safetensors(unet_dir)
    if problem:
        raise UsageError(f"{problem}; resdiff loads safetensors only, so re-save the model with them")
    _check_weights(unet_dir, cls, _check_config(unet_dir / _UNET_FILE_CONFIG, cls))
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return cls.from_pretrained(unet_dir, use_safetensors=True, **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:
        raise UsageError(f"cannot load the model in {unet_dir}: {one_line(err)}") from None


def _saved_class(config: Path) -> type[nn.Module]:
    """The U-Net class a U-Net folder's config.json names (``_class_name``), if it is one of the known ones."""
    saved = _read_json(config)
    name = saved.get("_class_name") if isinstance(saved, dict) else None
    if name not in _SAVED_CLASSES:
        raise UsageError(f"{config} names _class_name {name!r}; only resdiff UNet and diffusers UNet2DModel folders "
                         f"can be loaded")
    return _SAVED_CLASSES[name]


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {file}: {' '.join(str(err).split())}; re-export the model") from None


def _unet_class(model_index: Path) -> type[nn.Module]:
    """The U-Net class model_index.json names, if it is one of the known ones (nothing is imported by name)."""
    entry = _read_json(model_index).get("unet")
    kind = tuple(entry) if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if kind not in _UNET_CLASSES:
        raise UsageError(
            f"{model_index} names unet {entry!r}; only resdiff UNet and diffusers UNet2DModel models can be sampled"
        )
    return _UNET_CLASSES[kind]


def _check_config(file: Path, cls) -> dict:
    """unet/config.json: every field is an argument of ``cls`` of the right type, and describes a model that can
    be built (tried on the meta device, which allocates nothing). Returns the config."""
    config = _read_json(file)
    if not isinstance(config, dict):
        raise UsageError(f"{file} is not a JSON object; re-export the model")
    params = {k for k in inspect.signature(cls.__init__).parameters if k != "self"}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # an annotation this Python cannot evaluate: check names only
        hints = {}
    ignored = set(getattr(cls, "ignore_for_config", [])) | set(getattr(cls, "_deprecated_kwargs", []))
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        if key not in params:
            close = difflib.get_close_matches(key, list(params), 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{file}: unknown field {key!r}{hint}; a {cls.__name__} has no such setting, re-export the model")
        if key in hints and not fits(value, hints[key]):
            raise UsageError(f"{file}: field {key!r} is {value!r}, which is not {describe(hints[key])}; re-export the model")
    try:
        with torch.device("meta"):
            cls.from_config(config)
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as err:
        raise UsageError(f"{file} describes no buildable {cls.__name__}: {one_line(err)}") from None
    return config


def _check_weights(unet_dir: Path, cls, config: dict) -> None:
    """The weights file is whole and holds exactly the tensors (names and shapes) the config's model has."""
    from safetensors import safe_open

    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        return  # sharded or variant weights: diffusers' own checks apply
    problem = file_problem(weights)
    if problem:
        raise UsageError(f"{weights} {problem}; re-export the model")
    with torch.device("meta"):
        model = cls.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(weights, "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types)
        raise UsageError(f"{weights} is unreadable: {one_line(err)}; re-export the model") from None
    model._fix_state_dict_keys_on_load(found)  # keys saved under older names, renamed as from_pretrained will
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or extra:
        raise UsageError(
            f"{weights} does not match {unet_dir / 'config.json'}: "
            + (f"{len(missing)} tensor(s) missing (e.g. {missing[0]})" if missing else "")
            + ("; " if missing and extra else "")
            + (f"{len(extra)} unexpected tensor(s) (e.g. {extra[0]})" if extra else "")
        )
    wrong = [k for k in expected if expected[k] != found[k]]
    if wrong:
        k = wrong[0]
        raise UsageError(
            f"{weights} does not match {unet_dir / 'config.json'}: {len(wrong)} tensor(s) have other shapes "
            f"(e.g. {k} is {list(found[k])} in the file, {list(expected[k])} by the config)"
        )


def latent_space(path: str | Path, autoencoder: str | Path | None = None,
                 device: torch.device | str | None = None) -> "LatentSpace | None":
    """The latent space of the model behind ``path`` (its folder's latent.json: the autoencoder it was trained in,
    loaded from ``autoencoder`` where given, else from the recorded SPEC, and checked against the recorded files),
    or None for a model that works on pixels (``autoencoder`` is then a mistake)."""
    from .autoencoder import LatentSpace

    folder = find_model_folder(path)
    record_file = folder / LATENT
    if not record_file.is_file():
        if autoencoder is not None:
            raise UsageError(f"{folder} is a model of pixels, not latents; drop --autoencoder")
        return None
    return LatentSpace.from_record(_read_json(record_file), record_file, autoencoder, device)
