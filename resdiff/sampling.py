"""Sampling: images from a trained model, reproducible from (seed, image index), split across processes.

- ``SamplingSettings`` (``resdiff.settings``): every sampling choice with its default, in one dataclass with
  one ``check``. The CLIs build it from their flags (``add_arguments``, ``SamplingSettings.from_args``);
  editing and evaluation receive it whole.
- ``ImageGenerator``: a model made ready once (loaded and checked, steps and labels resolved, eval mode and
  channels_last), then ``batches(indices)`` as often as needed. Image ``i`` draws its initial noise and any
  per-step noise only from ``image_generators(seed, [i])``, so the same seed gives the same images whatever
  the batch size, the batch an image lands in, or the number of processes. An edit (``resdiff.editing``)
  replaces the plain denoising of a batch by its own.
- ``sample_to_folder``: what sample.py runs, plain or edited: each process writes the PNGs of its share
  (``resdiff.processes.share``) named by global index (00000.png, ...), with no collective operation while
  sampling; after one barrier the main process adds grid.png (and samples.npz, and an edit's own files).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from tqdm.auto import tqdm

from .data import to_uint8
from .shapes import image_shape
from .choices import SAMPLERS
from .diffusion import GaussianDiffusion, Guidance, image_generators, image_noise, make_sampler, sampler_step_kwargs
from .errors import UsageError
from .hardware import MIXED_PRECISIONS, check_device, precision_warning
from .images import GRID_NAME, NPZ_NAME, make_grid, read_images, save_images, save_npz, save_png
from .model_folder import find_model_folder, latent_space, load_model
from .processes import join
from .hints import check_count
from .settings import SamplingSettings, add_arguments, check_sampler, check_steps, default_settings

if TYPE_CHECKING:
    from .autoencoder import LatentSpace

__all__ = [
    "SamplingSettings", "add_arguments", "ImageGenerator", "Batch", "Edit", "generate", "default_settings", "check",
    "sample_to_folder", "default_out_dir", "check_sampler", "steps_for", "GRID_LIMIT",
]

GRID_LIMIT = 256  # grid.png shows at most this many images (the first ones)


# ----------------------------------------------------------------------------- what a model needs


def _unwrap(model: nn.Module) -> nn.Module:
    """The model that owns ``config`` (through DDP's ``.module`` and torch.compile's ``._orig_mod``)."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} has no config; pass a resdiff UNet or a diffusers UNet2DModel")
        model = inner
    return model


def _classes(config) -> tuple[int | None, int | None]:
    """(number of classes, null label) of a model; (None, None) when it is unconditional."""
    if "num_classes" in config:  # resdiff UNet: label num_classes is the null class
        n = config.num_classes or None
        return n, n
    return config.get("num_class_embeds") or None, None  # diffusers UNet2DModel: no null class


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


def steps_for(settings: SamplingSettings, scheduler_config: dict) -> int:
    """The settings' steps, or the sampler's own count; never more than the training timesteps."""
    limit = int(scheduler_config.get("num_train_timesteps", 1000))
    if settings.steps is None:
        return min(SAMPLERS[settings.sampler][1], limit)
    check_steps("--steps", settings.steps, limit)
    return settings.steps


def _load(model_or_path, device: torch.device | None, scheduler_config: dict | None) -> tuple[nn.Module, dict, str]:
    """(the model, its training scheduler config, how to name it in a message) from a folder or from memory."""
    if isinstance(model_or_path, (str, Path)):
        model, loaded_config = load_model(model_or_path, device)
        return model, dict(scheduler_config or loaded_config), str(model_or_path)
    if scheduler_config is None:
        raise ValueError("generate() with an in-memory model needs scheduler_config (the training DDPMScheduler's config)")
    if device is not None:
        model_or_path.to(device)
    return model_or_path, dict(scheduler_config), "the model"


# ----------------------------------------------------------------------------- generation


@dataclass
class Batch:
    """One batch on its way: image indices, their generators and initial noise (B, C, H, W), labels (B,) or None,
    and ``progress`` (wraps the timesteps in a step bar)."""

    indices: list[int]
    generators: list[torch.Generator]
    noise: torch.Tensor
    labels: torch.Tensor | None
    progress: Callable


class Edit(Protocol):
    """What an edit (resdiff.editing) gives the generator: checks before loading, inputs for the model's shape,
    a batch's images in [-1, 1] in place of plain sampling, and the files it adds to an output folder."""

    kind: str
    default_sampler: str | None  # its sampler when none is given; None: SamplingSettings' default

    def check(self, settings: SamplingSettings) -> None: ...
    def prepare(self, gen: "ImageGenerator") -> None: ...
    def run(self, gen: "ImageGenerator", batch: Batch) -> torch.Tensor: ...
    def seed_name(self, seed: int) -> str | int: ...
    def save_files(self, out_dir: Path, shown: torch.Tensor) -> list[str]: ...


def check(settings: SamplingSettings, edit: Edit | None = None) -> None:
    """Every check of ``settings`` (and of ``edit``) that needs no model: the one call each entry point makes
    (``generate``, ``sample_to_folder``, ``resdiff.evaluation.evaluate``) before it loads anything."""
    settings.check()
    if edit is not None:
        edit.check(settings)


class ImageGenerator:
    """A model made ready to sample under ``settings``, once; then ``batches(indices)`` or ``images(indices)``.

    ``model_or_path``: a run / pipeline folder (loaded here, onto ``settings.device`` or this process's GPU) or an
    in-memory U-Net (give ``scheduler_config``, the training DDPMScheduler's config). ``edit`` (resdiff.editing)
    replaces plain sampling. A model given in memory gets its train/eval mode and weight layout back after
    each ``ready()`` block; one loaded here stays ready.

    A latent model samples in ``latent`` (a ``resdiff.autoencoder.LatentSpace``: given with an in-memory model,
    read from a folder's record otherwise, its autoencoder from ``settings.autoencoder`` where given): its samples
    are decoded, so ``shape`` is the images' (C, H, W) and ``noise_shape`` the model's.
    """

    def __init__(self, model_or_path, settings: SamplingSettings, scheduler_config: dict | None = None,
                 edit: Edit | None = None, latent: "LatentSpace | None" = None):
        self.settings, self.edit = settings, edit
        self.owns_model = isinstance(model_or_path, (str, Path))
        self.model, scheduler_config, where = _load(model_or_path, check_device(settings.device), scheduler_config)
        if self.owns_model:
            latent = latent_space(model_or_path, settings.autoencoder, next(self.model.parameters()).device)
        self.latent = latent
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.config = _unwrap(self.model).config
        self.steps = steps_for(settings, scheduler_config)
        num_classes, self.null_label = _classes(self.config)
        self.labels = _labels(settings.class_labels, num_classes, where)
        if settings.guidance_scale != 1.0:
            if num_classes is None:
                raise UsageError(f"{where} is unconditional; classifier-free guidance needs a class-conditional model "
                                 "(drop --guidance-scale)")
            if self.null_label is None:
                raise UsageError(f"{where} has no null class, so it cannot use classifier-free guidance; drop --guidance-scale")
        self.noise_shape = (self.config.in_channels, *image_shape(self.config.sample_size))  # (C, H, W) of the model
        self.shape = latent.image_shape(self.noise_shape) if latent is not None else self.noise_shape  # the images'
        self.diffusion = GaussianDiffusion(DDPMScheduler.from_config(scheduler_config))
        if settings.compile:
            net = _unwrap(self.model)
            if not hasattr(net, "compile_blocks"):
                raise UsageError(f"--compile needs a resdiff UNet; {where} holds a {type(net).__name__}")
            net.compile_blocks()
        if edit is not None:
            edit.prepare(self)
        self._depth, self._was_training, self._ready = 0, self.model.training, False

    @contextlib.contextmanager
    def ready(self) -> Iterator[None]:
        """The model in eval mode and channels_last (NHWC: the layout oneDNN's and cuDNN's convolutions run fastest
        in) for the block, however many batches run in it. An in-memory model gets its
        mode and standard layout (which safetensors needs) back at the end of the outermost block."""
        if not self._ready:
            self._was_training = self.model.training
            self.model.eval()
            self.model.to(memory_format=torch.channels_last)
            self._ready = True
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and not self.owns_model:
                self.model.to(memory_format=torch.contiguous_format)
                self.model.train(self._was_training)
                self._ready = False

    def batches(self, indices: Sequence[int], progress: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Images ``indices``, batch by batch: (the batch's indices, uint8 (B, C, H, W) on the CPU)."""
        s = self.settings
        autocast = MIXED_PRECISIONS[s.mixed_precision]
        bar = tqdm(total=len(indices), unit="img", disable=not progress, desc=f"{s.sampler} {self.steps} steps")
        steps_bar = lambda ts: tqdm(ts, leave=False, unit="step", disable=not progress)  # noqa: E731
        with self.ready(), contextlib.closing(bar):
            for start in range(0, len(indices), s.batch_size):
                batch = self._batch([int(i) for i in indices[start:start + s.batch_size]], steps_bar)
                with torch.autocast(self.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                    x = self.edit.run(self, batch) if self.edit is not None else self.sample(batch)
                yield batch.indices, to_uint8(self.to_images(x)).cpu()
                bar.update(len(batch.indices))

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Finished samples as images in [-1, 1]: a latent model's decoded, a pixel model's as they are."""
        return self.latent.to_images(x) if self.latent is not None else x

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] as the model sees them: a latent model's encoded and normalised, a pixel model's as
        they are (what an edit starts from)."""
        return self.latent.to_model(images.to(self.device)) if self.latent is not None else images.to(self.device)

    def images(self, indices: Sequence[int], progress: bool = False) -> torch.Tensor:
        """Images ``indices`` as uint8 (len(indices), C, H, W) on the CPU."""
        parts = [images for _, images in self.batches(indices, progress)]
        return torch.cat(parts) if parts else torch.empty(0, *self.shape, dtype=torch.uint8)

    def _batch(self, indices: list[int], progress: Callable) -> Batch:
        generators = image_generators(self.settings.seed, indices)
        noise = image_noise(generators, self.noise_shape).to(self.device).contiguous(memory_format=torch.channels_last)
        labels = None
        if self.labels is not None:
            labels = torch.tensor([self.labels[i % len(self.labels)] for i in indices], device=self.device)
        return Batch(indices, generators, noise, labels, progress)

    def _net(self, x, t, labels=None):  # the model at its own dtype; under autocast it picks the precision itself
        return self.model(x.to(self.dtype), t, labels)

    def sample(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Plain sampling: the batch's noise (or ``noise``) denoised by the settings' sampler; in [-1, 1]."""
        s = self.settings
        return self.diffusion.sample(
            self._net, batch.noise if noise is None else noise, sampler=s.sampler, steps=self.steps,
            generators=batch.generators, guidance=self.guidance(batch), eta=float(s.eta), progress=batch.progress,
        )

    def guidance(self, batch: Batch) -> Guidance:
        """The batch's labels and the settings' classifier-free guidance."""
        return Guidance(batch.labels, float(self.settings.guidance_scale), self.null_label)

    # what an edit's own loop needs: a fresh scheduler, its step arguments, and one guided step
    def scheduler(self, device: torch.device) -> SchedulerMixin:
        """A fresh scheduler of the settings' sampler over the training schedule, its ``steps`` timesteps set."""
        scheduler, _ = make_sampler(self.settings.sampler, self.diffusion.scheduler.config)
        scheduler.set_timesteps(self.steps, device=device)
        return scheduler

    def step_kwargs(self, scheduler: SchedulerMixin, batch: Batch) -> dict:
        return sampler_step_kwargs(scheduler, batch.generators, float(self.settings.eta))

    def denoise(self, scheduler: SchedulerMixin, x: torch.Tensor, t, batch: Batch, step_kwargs: dict) -> torch.Tensor:
        """One step of ``scheduler`` from ``x`` at ``t``, guided as the settings say."""
        return self.diffusion.denoise_step(self._net, scheduler, x, t, step_kwargs, self.guidance(batch))


def generate(
    model_or_path: nn.Module | str | Path, num_images: int, settings: SamplingSettings | None = None, *,
    indices: Sequence[int] | None = None, progress: bool = True, scheduler_config: dict | None = None,
    edit: Edit | None = None, latent: "LatentSpace | None" = None, **changes,
) -> torch.Tensor:
    """Images ``indices`` (default: all ``num_images``) as uint8 (len(indices), C, H, W) on the CPU.

    ``settings`` (default ``default_settings(edit, steps)``: the sampler for the step count) with ``changes``,
    keyword arguments naming its fields
    (``generate(model, 16, sampler="dpm++")``). ``model_or_path`` and ``scheduler_config``: see ``ImageGenerator``.
    ``edit``: one of resdiff.editing's (inpainting, image-to-image, interpolation) instead of plain sampling.
    ``latent``: an in-memory latent model's LatentSpace (its samples are decoded). The model's train/eval mode is
    restored afterwards.
    """
    settings = (settings or default_settings(edit, changes.get("steps"))).changed(changes)
    check_count("number of images (--num-images)", num_images)
    check(settings, edit)
    gen = ImageGenerator(model_or_path, settings, scheduler_config, edit, latent)
    return gen.images(_check_indices(indices, num_images), progress)


def _check_indices(indices: Sequence[int] | None, num_images: int) -> list[int]:
    if indices is None:
        return list(range(num_images))
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise ValueError(f"image index {bad[0]} is outside 0..{num_images - 1}")
    return indices


# ----------------------------------------------------------------------------- the sample.py job


def default_out_dir(model: str | Path, folder: Path, sampler: str, steps: int, seed: int | str, kind: str = "samples") -> Path:
    """A new folder ``<kind>-<sampler>-<steps>-seed<seed>[-N]`` in the run directory, or next to a pipeline folder."""
    model, folder = Path(os.path.abspath(model)), Path(os.path.abspath(folder))
    base = model.parent if folder == model else model
    name = f"{kind}-{sampler}-{steps}-seed{seed}"
    out, k = base / name, 1
    while out.exists():
        out, k = base / f"{name}-{k}", k + 1
    return out


def sample_to_folder(
    model: str | Path, num_images: int, settings: SamplingSettings | None = None, *, edit: Edit | None = None,
    out: str | Path | None = None, npz: bool = False, grid: bool = True, log: Callable[[str], None] | None = print,
) -> Path:
    """Sample (or, with ``edit``, edit) ``num_images`` images from a run or pipeline folder into PNGs, across every
    launched process, and return the folder.

    Each process (torchrun / accelerate launch, or just one) generates ``range(num_images)[rank::world]`` and
    writes its own PNGs; the main process then writes grid.png (and samples.npz, and the edit's files) from the
    files. ``out`` None picks a new folder (see ``default_out_dir``); an existing ``out`` is written into.
    ``log`` None is quiet: no messages and no progress bars."""
    settings = settings or default_settings(edit)
    check_count("number of images (--num-images)", num_images)
    check(settings, edit)  # before the processes join: a mistake costs nothing
    procs = join(check_device(settings.device), settings.timeout_s)
    say = procs.say(log)
    folder = find_model_folder(model)
    gen = ImageGenerator(folder, replace(settings, device=settings.device or procs.device), edit=edit)
    warning = precision_warning(gen.device, settings.mixed_precision)
    if warning:
        say(warning)
    seed = edit.seed_name(settings.seed) if edit is not None else settings.seed
    kind = edit.kind if edit is not None else "samples"
    # Every process picks the folder name before any of them creates it, so they all pick the same one.
    out_dir = Path(out) if out is not None else default_out_dir(model, folder, settings.sampler, gen.steps, seed, kind)
    say(f"model: {folder}")
    say(f"{kind + ': ' if edit is not None else ''}sampler: {settings.sampler}, steps: {gen.steps}, seed: {seed}, "
        f"images: {num_images}, processes: {procs.world}, device: {gen.device}")
    procs.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    for batch, images in gen.batches(procs.share(num_images), progress=log is not None and procs.is_main):
        save_images(images, out_dir, batch)  # no collective operation in this loop
    procs.barrier()
    if procs.is_main:
        extras = _save_summary(out_dir, num_images, edit, npz=npz, grid=grid)
        say(f"wrote {num_images} images to {out_dir}" + (f" (and {', '.join(extras)})" if extras else ""))
    procs.leave()
    return out_dir


def _save_summary(out_dir: Path, num_images: int, edit: Edit | None, *, npz: bool, grid: bool) -> list[str]:
    """grid.png of the first GRID_LIMIT images, with ``npz`` all of them as samples.npz, and the edit's own files,
    read back from the PNGs every process wrote. Returns the names written."""
    if not (grid or npz or edit is not None):
        return []
    images = read_images(out_dir, range(num_images if npz else min(num_images, GRID_LIMIT)))
    if grid:
        save_png(make_grid(images[:GRID_LIMIT]), out_dir / GRID_NAME)
    if npz:
        save_npz(images, out_dir / NPZ_NAME)
    names = [name for name, wanted in ((GRID_NAME, grid), (NPZ_NAME, npz)) if wanted]
    return names + (edit.save_files(out_dir, images[:GRID_LIMIT]) if edit is not None else [])
