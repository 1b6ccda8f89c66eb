"""Sampling: images from a trained model, reproducible from (seed, image index), split across processes.

``generate`` turns a model (in memory, or a model folder) into uint8 images. Image ``i`` draws its
initial noise and any per-step noise only from ``image_generators(seed, [i])``, so the same seed
gives the same images whatever the batch size, the batch an image lands in, or the number of processes.

``sample_to_folder`` is what sample.py runs: each process makes the images ``indices[rank::world]``
and writes them as PNGs named by global index (00000.png, ...), with no collective operation while
sampling; after one final barrier the main process adds grid.png (and samples.npz) from those files.

Model folders: a pipeline folder (``DDPMPipeline.save_pretrained``: model_index.json, unet/, scheduler/)
or a run directory (its ``model/``, else the newest ``checkpoints/step-*/ema/`` that is whole). The U-Net
class is chosen from model_index.json among the two known ones (resdiff ``UNet``, diffusers ``UNet2DModel``);
no module named there is imported, and weights are read from safetensors only (a pickled
``diffusion_pytorch_model.bin`` is never opened). Before any weights are read, unet/config.json is checked
field by field against the class (unknown names, wrong types), the model it describes is built on the meta
device, and the safetensors header is compared with it, so a broken folder is one error line naming the file.
"""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import inspect
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import file_problem, latest_checkpoint
from .data import to_uint8
from .diffusion import DDPM, SAMPLERS, image_generators, image_noise, make_sampler
from .errors import UsageError, one_line
from .hardware import precision_warning
from .unet import UNet

__all__ = [
    "find_model_folder", "load_model", "default_steps", "generate", "to_pil", "make_grid", "save_images",
    "read_images", "sample_to_folder", "MIXED_PRECISIONS",
]

MIXED_PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
GRID_LIMIT = 256  # grid.png shows at most this many images (the first ones)
NPZ_NAME, GRID_NAME = "samples.npz", "grid.png"


# ----------------------------------------------------------------------------- model folders


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def find_model_folder(path: str | Path) -> Path:
    """The pipeline folder behind ``path``: itself, a run's ``model/``, or its newest checkpoint's ``ema/``."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass a run directory or a pipeline folder (with model_index.json)")
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; pass a run directory or a pipeline folder (with model_index.json)")
    if _is_pipeline(path):
        folder = path
    elif (path / "model").is_dir():
        folder = path / "model"
    elif (ckpt := latest_checkpoint(path, ema_only=True)) is not None:  # damaged checkpoints are passed over
        folder = ckpt / "ema"
    else:
        raise UsageError(
            f"{path} is not a model: it has no model_index.json, no model/ and no checkpoints/step-*/ema/; "
            "pass a run directory or a pipeline folder"
        )
    for needed in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        if not (folder / needed).is_file():
            raise UsageError(f"{folder} is not a complete pipeline folder: {needed} is missing; pass a saved DDPMPipeline folder")
    return folder


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {file}: {' '.join(str(err).split())}; re-export the model") from None


def load_model(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, dict]:
    """The U-Net (in eval mode, on ``device``) and the training scheduler's config from a run or pipeline folder.

    A diffusers ``UNet2DModel`` is converted to a resdiff ``UNet`` when its architecture allows (same
    outputs, and class-conditional models then get the null label guidance needs); otherwise it is used as is.
    """
    folder = find_model_folder(path)
    unet_dir = folder / "unet"
    entry = _read_json(folder / "model_index.json").get("unet")
    kind = tuple(entry) if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if kind in (("resdiff.unet", "UNet"), ("resdiff", "UNet")):
        cls = UNet
    elif kind == ("diffusers", "UNet2DModel"):
        cls = UNet2DModel
    else:
        raise UsageError(
            f"{folder / 'model_index.json'} names unet {entry!r}; only resdiff UNet and diffusers UNet2DModel "
            "models can be sampled"
        )
    if not any(unet_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in unet_dir.glob("*.bin")) + sorted(p.name for p in unet_dir.glob("*.pt*"))
        found = f" (it has {', '.join(pickles)}: pickle files, which can run code and are never loaded)" if pickles else ""
        raise UsageError(
            f"{unet_dir} has no .safetensors weights{found}; resdiff loads safetensors only, so re-save the model with them"
        )
    _check_weights(unet_dir, cls, _check_config(unet_dir / "config.json", cls))
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        model = cls.from_pretrained(unet_dir, use_safetensors=True, **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:
        raise UsageError(f"cannot load the model in {unet_dir}: {one_line(err)}") from None
    if cls is UNet2DModel:
        with contextlib.suppress(ValueError):  # an architecture the converter does not cover is used directly
            model = UNet.from_diffusers(model)
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    return model.to(_default_device() if device is None else device).eval(), scheduler_config


def _matches(value, hint) -> bool:
    """Whether a JSON value fits a constructor annotation (unknown kinds of annotation are not judged)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, collections.abc.Sequence) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    return True


def _check_config(file: Path, cls) -> dict:
    """unet/config.json: every field is an argument of ``cls`` of the right type, and describes a model that can
    be built (tried on the meta device, which allocates nothing). Returns the config."""
    config = _read_json(file)
    if not isinstance(config, dict):
        raise UsageError(f"{file} is not a JSON object; re-export the model")
    params = {k: v for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}
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
        if key in hints and not _matches(value, hints[key]):
            want = hints[key].__name__ if isinstance(hints[key], type) else str(hints[key]).replace("typing.", "")
            raise UsageError(f"{file}: field {key!r} is {value!r}, which is not {want}; re-export the model")
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
        expected = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
    try:
        with safe_open(weights, "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types)
        raise UsageError(f"{weights} is unreadable: {one_line(err)}; re-export the model") from None
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


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device, or a UsageError when it is not one this machine has."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} was asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


# ----------------------------------------------------------------------------- what a model needs


def _unwrap(model: nn.Module) -> nn.Module:
    """The model that owns ``config`` (through DDP's ``.module`` and torch.compile's ``._orig_mod``)."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} has no config; pass a resdiff UNet or a diffusers UNet2DModel")
        model = inner
    return model


def _image_shape(config) -> tuple[int, int, int]:
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return config.in_channels, h, w


def _classes(config) -> tuple[int | None, int | None]:
    """(number of classes, null label) of a model; (None, None) when it is unconditional."""
    if "num_classes" in config:  # resdiff UNet: label num_classes is the null class
        n = config.num_classes or None
        return n, n
    return config.get("num_class_embeds") or None, None  # diffusers UNet2DModel: no null class


def default_steps(sampler: str, scheduler_config: dict) -> int:
    """The sampler's own step count (from SAMPLERS), at most the training timesteps."""
    _check_sampler(sampler)
    return min(SAMPLERS[sampler][1], int(scheduler_config.get("num_train_timesteps", 1000)))


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------- generation


@dataclass
class _Job:
    """Everything one generate call resolved: model, schedule, labels, device."""

    model: nn.Module
    scheduler_config: dict
    sampler: str
    steps: int
    seed: int
    shape: tuple[int, int, int]  # (C, H, W)
    labels: list[int] | None  # cycled over image indices
    null_label: int | None
    guidance_scale: float
    eta: float
    device: torch.device
    autocast: torch.dtype | None
    batch_size: int


def _prepare(
    model_or_path, num_images: int, *, sampler: str, steps: int | None, seed: int, batch_size: int,
    class_labels, guidance_scale: float, eta: float, device, mixed_precision: str, scheduler_config: dict | None,
) -> _Job:
    """Check every argument (cheap ones before loading anything) and resolve the defaults."""
    _positive("number of images (--num-images)", num_images)
    _positive("steps (--steps)", steps)
    _positive("batch size (--batch-size)", batch_size)
    _check_sampler(sampler)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise UsageError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
    if mixed_precision not in MIXED_PRECISIONS:
        raise UsageError(f"unknown mixed precision {mixed_precision!r}; choose one of {', '.join(MIXED_PRECISIONS)}")
    if eta and sampler != "ddim":
        raise UsageError(f"eta applies to the ddim sampler only; drop --eta or use --sampler ddim (not {sampler})")
    if not math.isfinite(eta) or eta < 0 or not math.isfinite(guidance_scale):
        raise UsageError(f"eta must be >= 0 and guidance scale finite, got eta={eta}, guidance scale={guidance_scale}")
    device = _check_device(device)

    if isinstance(model_or_path, (str, Path)):
        model, loaded_config = load_model(model_or_path, device)
        scheduler_config = scheduler_config or loaded_config
        where = str(model_or_path)
    else:
        model, where = model_or_path, "the model"
        if scheduler_config is None:
            raise ValueError("generate() with an in-memory model needs scheduler_config (the training DDPMScheduler's config)")
        if device is not None:
            model.to(device)
    device = next(model.parameters()).device
    config = _unwrap(model).config

    limit = int(scheduler_config.get("num_train_timesteps", 1000))
    if steps is None:
        steps = default_steps(sampler, scheduler_config)
    elif steps > limit:
        raise UsageError(
            f"{steps} steps is more than the {limit} timesteps the model was trained with; use --steps {limit} or fewer"
        )

    num_classes, null_label = _classes(config)
    labels = _labels(class_labels, num_classes, where)
    if guidance_scale != 1.0:
        if num_classes is None:
            raise UsageError(
                f"{where} is unconditional; classifier-free guidance needs a class-conditional model (drop --guidance-scale)"
            )
        if null_label is None:
            raise UsageError(f"{where} has no null class, so it cannot use classifier-free guidance; drop --guidance-scale")
    return _Job(
        model=model, scheduler_config=dict(scheduler_config), sampler=sampler, steps=steps, seed=int(seed),
        shape=_image_shape(config), labels=labels, null_label=null_label, guidance_scale=float(guidance_scale),
        eta=float(eta), device=device, autocast=MIXED_PRECISIONS[mixed_precision], batch_size=batch_size,
    )


def _labels(class_labels, num_classes: int | None, where: str) -> list[int] | None:
    """The class labels to cycle over image indices: as given, or every class in turn by default."""
    if class_labels is None:
        return list(range(num_classes)) if num_classes else None
    labels = [int(class_labels)] if np.ndim(class_labels) == 0 else [int(c) for c in class_labels]
    if not labels:
        raise UsageError("class labels were given as an empty list; pass at least one label")
    if num_classes is None:
        raise UsageError(f"{where} is unconditional; drop --class-label")
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise UsageError(
            f"class label {bad[0]} is out of range for {where}: it has {num_classes} classes, labels 0..{num_classes - 1}"
        )
    return labels


def _batches(job: _Job, indices: Sequence[int], progress: bool) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Generate ``indices`` batch by batch: yields (the batch's indices, uint8 (B, C, H, W) on the CPU)."""
    model, device = job.model, job.device
    dtype = next(model.parameters()).dtype
    ddpm = DDPM(DDPMScheduler.from_config(job.scheduler_config))

    def net(x, t, labels=None):  # the model at its own dtype; under autocast it picks the precision itself
        return model(x.to(dtype), t, labels)

    autocast = torch.autocast(device.type, dtype=job.autocast) if job.autocast else contextlib.nullcontext()
    bar = tqdm(total=len(indices), unit="img", disable=not progress, desc=f"{job.sampler} {job.steps} steps")
    was_training = model.training
    model.eval()
    # Sampling runs channels_last (NHWC): oneDNN's and cuDNN's faster convolution layout, measured 8%
    # faster per forward here. The weights go back to the standard layout afterwards (safetensors needs it).
    model.to(memory_format=torch.channels_last)
    try:
        for start in range(0, len(indices), job.batch_size):
            batch = [int(i) for i in indices[start:start + job.batch_size]]
            generators = image_generators(job.seed, batch)
            noise = image_noise(generators, job.shape).to(device).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
            labels = None
            if job.labels is not None:
                labels = torch.tensor([job.labels[i % len(job.labels)] for i in batch], device=device)
            scheduler, _ = make_sampler(job.sampler, job.scheduler_config)  # fresh: schedulers keep per-run state
            with autocast:
                x = ddpm.sample(
                    net, scheduler, noise, steps=job.steps, generators=generators, class_labels=labels,
                    guidance_scale=job.guidance_scale, null_label=job.null_label, eta=job.eta,
                    progress=lambda ts: tqdm(ts, leave=False, unit="step", disable=not progress),
                )
            yield batch, to_uint8(x).cpu()
            bar.update(len(batch))
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
        bar.close()


def generate(
    model_or_path: nn.Module | str | Path,
    num_images: int,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    class_labels: int | Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    device: str | torch.device | None = None,
    mixed_precision: str = "no",
    indices: Sequence[int] | None = None,
    progress: bool = True,
    scheduler_config: dict | None = None,
) -> torch.Tensor:
    """Images ``indices`` (default: all ``num_images``) as uint8 (len(indices), C, H, W) on the CPU.

    ``model_or_path``: an in-memory U-Net (give ``scheduler_config``, the training DDPMScheduler's
    config; ``device`` None keeps it where it is, a ``device`` moves it there) or a run / pipeline folder
    (``device`` None: CUDA when available, else CPU). ``steps`` None is the sampler's default.
    ``class_labels``: one label for every image or a list cycled over image indices (image i gets
    labels[i % len]); None on a class-conditional model cycles over all classes. ``guidance_scale`` != 1
    is classifier-free guidance with the null class. ``mixed_precision`` "fp16"/"bf16" runs the model
    under torch.autocast. The model's train/eval mode is restored afterwards.
    """
    job = _prepare(
        model_or_path, num_images, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
        class_labels=class_labels, guidance_scale=guidance_scale, eta=eta, device=device,
        mixed_precision=mixed_precision, scheduler_config=scheduler_config,
    )
    indices = _check_indices(indices, num_images)
    parts = [images for _, images in _batches(job, indices, progress)]
    c, h, w = job.shape
    return torch.cat(parts) if parts else torch.empty(0, c, h, w, dtype=torch.uint8)


def _check_indices(indices: Sequence[int] | None, num_images: int) -> list[int]:
    if indices is None:
        return list(range(num_images))
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise ValueError(f"image index {bad[0]} is outside 0..{num_images - 1}")
    return indices


# ----------------------------------------------------------------------------- images on disk


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (N, C, H, W) -> pillow images: mode L for one channel, RGB for three."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, 1 or 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    arrays = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arrays]


def make_grid(images: torch.Tensor, padding: int = 2) -> Image.Image:
    """uint8 (N, C, H, W) as one near-square grid image (ceil(sqrt(N)) columns) on a black background."""
    n, c, h, w = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for k in range(n):
        top, left = padding + (k // cols) * (h + padding), padding + (k % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k]
    return to_pil(grid[None])[0]


def image_name(index: int) -> str:
    """The file name of image ``index``: 00000.png, 00001.png, ..."""
    return f"{index:05d}.png"


def _save_atomic(image: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name and rename it, so a file with the final name is always whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _save_summary(images: torch.Tensor, out_dir: Path, *, npz: bool, grid: bool) -> None:
    if grid:
        _save_atomic(make_grid(images[:GRID_LIMIT]), out_dir / GRID_NAME)
    if npz:  # the layout FID tools read: uint8 (N, H, W, C) under arr_0
        np.savez(out_dir / NPZ_NAME, arr_0=images.permute(0, 2, 3, 1).numpy())


def save_images(
    images: torch.Tensor, out_dir: str | Path, *, start_index: int = 0, indices: Sequence[int] | None = None,
    npz: bool = False, grid: bool = True,
) -> list[Path]:
    """Write uint8 (N, C, H, W) images as PNGs named by index (start_index, start_index + 1, ... or ``indices``),
    plus grid.png of the first ones and, with ``npz``, samples.npz; returns the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if indices is None:
        indices = range(start_index, start_index + len(images))
    if len(indices) != len(images):
        raise ValueError(f"{len(images)} images but {len(indices)} indices")
    paths = [out_dir / image_name(int(i)) for i in indices]
    for image, path in zip(to_pil(images), paths):
        _save_atomic(image, path)
    _save_summary(images, out_dir, npz=npz, grid=grid)
    return paths


def read_images(out_dir: str | Path, indices: Sequence[int]) -> torch.Tensor:
    """Read back the PNGs of ``indices`` from ``out_dir``: uint8 (N, C, H, W)."""
    arrays = []
    for i in indices:
        path = Path(out_dir) / image_name(int(i))
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: a sampling process did not write its images")
        with Image.open(path) as im:
            a = np.array(im, dtype=np.uint8)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- the sample.py job


def default_out_dir(model: str | Path, folder: Path, sampler: str, steps: int, seed: int) -> Path:
    """A new folder ``samples-<sampler>-<steps>-seed<seed>[-N]`` in the run directory, or next to a pipeline folder."""
    model, folder = Path(os.path.abspath(model)), Path(os.path.abspath(folder))
    base = model.parent if folder == model else model
    name = f"samples-{sampler}-{steps}-seed{seed}"
    out, k = base / name, 1
    while out.exists():
        out, k = base / f"{name}-{k}", k + 1
    return out


def sample_to_folder(
    model: str | Path,
    num_images: int,
    *,
    out: str | Path | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    class_labels: int | Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    device: str | torch.device | None = None,
    mixed_precision: str = "no",
    npz: bool = False,
    grid: bool = True,
    compile: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Sample ``num_images`` images from a run or pipeline folder into PNGs, across every launched process.

    Each process (torchrun / accelerate launch, or just one) generates ``range(num_images)[rank::world]``
    and writes its own PNGs; the main process then writes grid.png (and samples.npz) from the files.
    ``out`` None picks a new folder (see ``default_out_dir``); an existing ``out`` is written into.
    ``batch_size`` is per process. ``compile`` torch.compiles the U-Net's blocks first: minutes of
    start-up that pay off over many images. Returns the output folder.
    """
    from accelerate import PartialState

    device = _check_device(device)
    cpu = not torch.cuda.is_available() or (device is not None and device.type == "cpu")
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    # Without CUDA, cpu=True is what makes accelerate join the launched processes (gloo); otherwise each
    # process would silently be a world of one and all of them would make the same images.
    state = PartialState(cpu=cpu)
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    say = log if (log is not None and main) else (lambda _msg: None)

    folder = find_model_folder(model)
    job = _prepare(
        folder, num_images, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
        class_labels=class_labels, guidance_scale=guidance_scale, eta=eta,
        device=device if device is not None else state.device, mixed_precision=mixed_precision, scheduler_config=None,
    )
    warning = precision_warning(job.device, mixed_precision)
    if warning:
        say(warning)
    if compile:
        net = _unwrap(job.model)
        if not hasattr(net, "compile_blocks"):
            raise UsageError(f"--compile needs a resdiff UNet; {folder} holds a {type(net).__name__}")
        net.compile_blocks()
    # Every process picks the folder name before any of them creates it, so they all pick the same one.
    out_dir = Path(out) if out is not None else default_out_dir(model, folder, job.sampler, job.steps, job.seed)
    say(f"model: {folder}")
    say(f"sampler: {job.sampler}, steps: {job.steps}, seed: {job.seed}, images: {num_images}, "
        f"processes: {world}, device: {job.device}")
    state.wait_for_everyone()
    out_dir.mkdir(parents=True, exist_ok=True)

    mine = list(range(num_images))[rank::world]
    for batch, images in _batches(job, mine, progress and main):  # no collective op in here
        save_images(images, out_dir, indices=batch, grid=False)
    state.wait_for_everyone()

    if main and (grid or npz):
        every = read_images(out_dir, range(num_images if npz else min(num_images, GRID_LIMIT)))
        _save_summary(every, out_dir, npz=npz, grid=grid)
    extras = [name for name, wanted in ((GRID_NAME, grid), (NPZ_NAME, npz)) if wanted]
    say(f"wrote {num_images} images to {out_dir}" + (f" (and {', '.join(extras)})" if extras else ""))
    if world > 1 and not had_group:
        state.destroy_process_group()
    return out_dir
