"""Sampling: images from a trained model, reproducible from (seed, image index), split across processes.

``generate`` turns a model (in memory, or a model folder) into uint8 images. Image ``i`` draws its
initial noise and any per-step noise only from ``image_generators(seed, [i])``, so the same seed
gives the same images whatever the batch size, the batch an image lands in, or the number of processes.

``sample_to_folder`` is what sample.py runs: each process makes the images ``indices[rank::world]``
and writes them as PNGs named by global index (00000.png, ...), with no collective operation while
sampling; after one final barrier the main process adds grid.png (and samples.npz) from those files.

Models come from memory or from a folder (``resdiff.model_folder`` loads and checks it); images go to
disk through ``resdiff.images``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from .data import to_uint8
from .diffusion import DDPM, SAMPLERS, image_generators, image_noise
from .errors import UsageError
from .hardware import MIXED_PRECISIONS, check_device, precision_warning, reuse_freed_memory
from .images import make_grid, read_images, save_images, save_npz, save_png
from .model_folder import find_model_folder, load_model

if TYPE_CHECKING:
    from accelerate import PartialState

__all__ = [
    "default_steps", "generate", "sample_to_folder", "default_out_dir", "processes",
    # the job API editing builds on: resolve a job, run it batch by batch, write each process's share
    "gather_shares", "Job", "prepare_job", "start_job", "job_batches", "plain_run", "write_shares", "save_summary",
    "check_sampler", "check_indices", "check_positive",
]

GRID_LIMIT = 256  # grid.png shows at most this many images (the first ones)
NPZ_NAME, GRID_NAME = "samples.npz", "grid.png"


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
    check_sampler(sampler)
    return min(SAMPLERS[sampler][1], int(scheduler_config.get("num_train_timesteps", 1000)))


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------- generation


@dataclass
class Job:
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


def prepare_job(
    model_or_path, num_images: int, *, sampler: str, steps: int | None, seed: int, batch_size: int,
    class_labels, guidance_scale: float, eta: float, device, mixed_precision: str, scheduler_config: dict | None,
) -> Job:
    """Check every argument (cheap ones before loading anything) and resolve the defaults."""
    check_positive("number of images (--num-images)", num_images)
    check_positive("steps (--steps)", steps)
    check_positive("batch size (--batch-size)", batch_size)
    check_sampler(sampler)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise UsageError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
    if mixed_precision not in MIXED_PRECISIONS:
        raise UsageError(f"unknown mixed precision {mixed_precision!r}; choose one of {', '.join(MIXED_PRECISIONS)}")
    if eta and sampler != "ddim":
        raise UsageError(f"eta applies to the ddim sampler only; drop --eta or use --sampler ddim (not {sampler})")
    if not math.isfinite(eta) or eta < 0 or not math.isfinite(guidance_scale):
        raise UsageError(f"eta must be >= 0 and guidance scale finite, got eta={eta}, guidance scale={guidance_scale}")
    device = check_device(device)

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
    return Job(
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


# run(job, ddpm, net, batch indices, generators, noise, labels, step progress) -> images in [-1, 1]: how a batch is
# made from its noise. Plain sampling is ``plain_run``; resdiff.editing passes its own (inpainting, img2img, ...).
Run = Callable[["Job", DDPM, Callable, list, list, torch.Tensor, "torch.Tensor | None", Callable], torch.Tensor]


def plain_run(job: Job, ddpm: DDPM, net: Callable, batch, generators, noise, labels, progress) -> torch.Tensor:
    """The batch runner of plain sampling: ``noise`` denoised by the job's sampler (editing brings others)."""
    return ddpm.sample(
        net, noise, sampler=job.sampler, steps=job.steps, generators=generators, class_labels=labels,
        guidance_scale=job.guidance_scale, null_label=job.null_label, eta=job.eta, progress=progress,
    )


def job_batches(
    job: Job, indices: Sequence[int], progress: bool, run: Run = plain_run
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Generate ``indices`` batch by batch: yields (the batch's indices, uint8 (B, C, H, W) on the CPU).
    ``run`` turns a batch's noise into images (default: plain sampling)."""
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
            with autocast:
                x = run(job, ddpm, net, batch, generators, noise, labels,
                        lambda ts: tqdm(ts, leave=False, unit="step", disable=not progress))
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
    job = prepare_job(
        model_or_path, num_images, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
        class_labels=class_labels, guidance_scale=guidance_scale, eta=eta, device=device,
        mixed_precision=mixed_precision, scheduler_config=scheduler_config,
    )
    indices = check_indices(indices, num_images)
    parts = [images for _, images in job_batches(job, indices, progress)]
    c, h, w = job.shape
    return torch.cat(parts) if parts else torch.empty(0, c, h, w, dtype=torch.uint8)


def check_indices(indices: Sequence[int] | None, num_images: int) -> list[int]:
    if indices is None:
        return list(range(num_images))
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise ValueError(f"image index {bad[0]} is outside 0..{num_images - 1}")
    return indices


def save_summary(images: torch.Tensor, out_dir: Path, *, npz: bool, grid: bool) -> None:
    """grid.png of the first GRID_LIMIT images and, with ``npz``, all of them as samples.npz."""
    if grid:
        save_png(make_grid(images[:GRID_LIMIT]), out_dir / GRID_NAME)
    if npz:
        save_npz(images, out_dir / NPZ_NAME)


# ----------------------------------------------------------------------------- the sample.py job


def processes(device: torch.device | None = None, timeout_s: float = 1800.0) -> tuple["PartialState", bool]:
    """The launched processes (torchrun / accelerate launch, or just this one) as accelerate's PartialState, and
    whether this call made their process group (then the caller destroys it when done).

    Without CUDA (or with a CPU ``device``), cpu=True is what makes accelerate join the processes over gloo;
    otherwise each would silently be a world of one and all of them would make the same images. A CPU process
    keeps freed memory for reuse (``hardware.reuse_freed_memory``)."""
    from datetime import timedelta

    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))
    if state.device.type == "cpu":
        reuse_freed_memory()
    return state, not had_group


def default_out_dir(model: str | Path, folder: Path, sampler: str, steps: int, seed: int | str, kind: str = "samples") -> Path:
    """A new folder ``<kind>-<sampler>-<steps>-seed<seed>[-N]`` in the run directory, or next to a pipeline folder."""
    model, folder = Path(os.path.abspath(model)), Path(os.path.abspath(folder))
    base = model.parent if folder == model else model
    name = f"{kind}-{sampler}-{steps}-seed{seed}"
    out, k = base / name, 1
    while out.exists():
        out, k = base / f"{name}-{k}", k + 1
    return out


def write_shares(state, job: Job, out_dir: Path, num_images: int, progress: bool, run: Run = plain_run) -> None:
    """Every process writes the PNGs of its share ``range(num_images)[rank::world]`` into ``out_dir``; returns once
    all of them have (a barrier before, so the folder is created after every process picked its name, and one after)."""
    state.wait_for_everyone()
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = list(range(num_images))[state.process_index::state.num_processes]
    for batch, images in job_batches(job, mine, progress and state.is_main_process, run):  # no collective op in here
        save_images(images, out_dir, batch)
    state.wait_for_everyone()


def gather_shares(local: torch.Tensor, n: int) -> torch.Tensor:
    """Items 0..n-1 in order, on every process, from each process's share ``range(n)[rank::world]`` (``local``,
    (len(share), ...), in that order): one all-gather of the shares padded to one length. On the CPU."""
    from accelerate import PartialState
    from accelerate.utils import gather

    state = PartialState()
    world = state.num_processes
    if world == 1:
        return local.cpu()
    per_rank = -(-n // world)
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype)
    padded[: len(local)] = local
    shares = gather(padded.to(state.device)).cpu().view(world, per_rank, *local.shape[1:])
    return shares.transpose(0, 1).reshape(world * per_rank, *local.shape[1:])[:n]  # item i: share i % world, row i // world


def start_job(
    model: str | Path, num_images: int, *, device, timeout_s: float, log: Callable[[str], None] | None, **settings
) -> tuple["PartialState", bool, Callable[[str], None], Path, Job]:
    """The start of a job that writes images from every launched process (sample.py's, and editing's): join the
    processes, find the model folder, load and check everything (``settings`` are ``generate``'s sampling
    arguments). Returns (the processes' state, whether this call made their group, ``say`` (``log`` on the main
    process only), the model folder, the job)."""
    device = check_device(device)
    state, owns_group = processes(device, timeout_s)
    say = log if (log is not None and state.is_main_process) else (lambda _msg: None)
    folder = find_model_folder(model)
    job = prepare_job(folder, num_images, device=device if device is not None else state.device, scheduler_config=None,
                   **settings)
    return state, owns_group, say, folder, job


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
    timeout_s: float = 1800.0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Sample ``num_images`` images from a run or pipeline folder into PNGs, across every launched process.

    Each process (torchrun / accelerate launch, or just one) generates ``range(num_images)[rank::world]``
    and writes its own PNGs; the main process then writes grid.png (and samples.npz) from the files.
    ``out`` None picks a new folder (see ``default_out_dir``); an existing ``out`` is written into.
    ``batch_size`` is per process. ``compile`` torch.compiles the U-Net's blocks first: minutes of
    start-up that pay off over many images. ``timeout_s``: how long a process waits for the others at a
    barrier before it gives up (a peer that died). Returns the output folder.
    """
    state, owns_group, say, folder, job = start_job(
        model, num_images, device=device, timeout_s=timeout_s, log=log, sampler=sampler, steps=steps, seed=seed,
        batch_size=batch_size, class_labels=class_labels, guidance_scale=guidance_scale, eta=eta,
        mixed_precision=mixed_precision,
    )
    world, main = state.num_processes, state.is_main_process
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
    write_shares(state, job, out_dir, num_images, progress)

    if main and (grid or npz):
        every = read_images(out_dir, range(num_images if npz else min(num_images, GRID_LIMIT)))
        save_summary(every, out_dir, npz=npz, grid=grid)
    extras = [name for name, wanted in ((GRID_NAME, grid), (NPZ_NAME, npz)) if wanted]
    say(f"wrote {num_images} images to {out_dir}" + (f" (and {', '.join(extras)})" if extras else ""))
    if world > 1 and owns_group:
        state.destroy_process_group()
    return out_dir
