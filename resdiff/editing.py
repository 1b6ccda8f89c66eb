"""Editing with a trained model: inpainting (RePaint), image-to-image (SDEdit) and interpolation between seeds.

Each use is a small class with one interface, an *edit*: ``check`` its settings against the sampler before
anything loads, ``prepare`` its input images for the model's image shape, and ``run`` a batch from its noise
(the hook ``resdiff.sampling`` calls where plain sampling would call ``DDPM.sample``). So editing inherits
sampling's guarantees unchanged: image ``i`` draws every random number from ``image_generators(seed, [i])``,
whatever the batch or the number of processes, and ``edit_to_folder`` splits the images across processes
exactly as ``sample_to_folder`` does.

- ``Inpaint``: keep the known pixels and generate the rest. RePaint (Lugmayr et al. 2022, Algorithm 1): after
  every sampler step the known region is replaced by the original noised to that step's level, and each step
  is repeated ``resample`` times, re-noising x_{t-1} -> x_t with q(x_t | x_{t-1}) in between, so the generated
  part has several chances to agree with the kept part. ddpm and ddim only: the multistep and ODE solvers keep
  state across steps (a step index, past predictions) that a jump back would corrupt.
- ``Img2Img``: SDEdit (Meng et al. 2022). Noise the input to the timestep that ``strength`` selects (the last
  round(strength * steps) steps of the schedule) and denoise from there with any sampler. Strength 0 returns the
  input; strength 1 is plain sampling from the same seed, image for image.
- ``Interpolate``: frames between the initial noise of two seeds (image 0 of each), spherical interpolation
  (slerp keeps the noise's norm, a straight line would shrink it mid-way); deterministic samplers only, so the
  end frames are the two seeds' plain samples.

The mask convention: white keeps, black is generated (a grayscale mask, thresholded at 128), and so does the
alpha channel of the input: opaque keeps, transparent is generated.

Inputs of any size and mode are prepared like training images (``resdiff.data``: mode conversion, transparency
composited on white, resize to cover the model's size, centre crop).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .data import fit_image, has_alpha, open_image, to_model_range
from .diffusion import DDPM, SAMPLERS, image_generators, image_noise, make_sampler, sampler_step_kwargs
from .errors import UsageError, one_line
from .files import write_atomic
from .images import make_grid, read_images, save_png, to_pil
from .sampling import (
    GRID_LIMIT, Job, check_indices, check_positive, check_sampler, default_out_dir, job_batches, plain_run, prepare_job,
    save_summary, start_job, write_shares,
)

__all__ = [
    "Inpaint", "Img2Img", "Interpolate", "inpaint", "img2img", "interpolate", "edit", "edit_to_folder",
    "prepare_image", "prepare_mask", "slerp", "INPAINT_SAMPLERS", "DETERMINISTIC_SAMPLERS", "DEFAULT_RESAMPLE",
]

INPAINT_SAMPLERS = ("ddpm", "ddim")  # RePaint jumps back between steps; these two samplers keep no state across steps
DETERMINISTIC_SAMPLERS = tuple(s for s in SAMPLERS if s != "ddpm")  # ddim with eta 0
DEFAULT_RESAMPLE = 5  # RePaint repeats per step; on the demo model 1 fills a hole with shapes of other colours, 5 continues the kept one
STRIP_OUTPUTS = 7  # strip.png shows the input and this many outputs
INPUT_NAME, MASK_NAME, STRIP_NAME, GIF_NAME = "input.png", "mask.png", "strip.png", "frames.gif"


# ----------------------------------------------------------------------------- inputs, prepared like training images


def _open(source, what: str) -> Image.Image:
    """A pillow image from a path, a pillow image, or a uint8 tensor (C, H, W) / (H, W); a bad file is a UsageError."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, torch.Tensor):
        t = source if source.ndim == 3 else source[None]
        if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] not in (1, 3):
            raise UsageError(f"the {what} tensor must be uint8 (1 or 3, H, W) or (H, W), got {source.dtype} {tuple(source.shape)}")
        return to_pil(t[None])[0]
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"the {what} {path} does not exist")
    try:
        return open_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"cannot read the {what} {path}: {one_line(err, 120)}") from None


def prepare_image(source, shape: Sequence[int]) -> torch.Tensor:
    """An image (path, pillow image or uint8 tensor) as the model sees it: uint8 (C, H, W) for ``shape`` (C, H, W)."""
    c, h, w = shape
    return fit_image(_open(source, "image"), (h, w), c)


def prepare_mask(source, shape: Sequence[int]) -> torch.Tensor:
    """A mask (white keeps, black is generated) as bool (1, H, W) for ``shape``: resized like the image, then
    thresholded at 128. A transparent pixel of the mask file counts as black."""
    _, h, w = shape
    return fit_image(_open(source, "mask"), (h, w), 1, background=(0, 0, 0)) >= 128


def _alpha_mask(im: Image.Image, shape: Sequence[int]) -> torch.Tensor:
    """The input's alpha channel as a mask: opaque keeps, transparent is generated; bool (1, H, W)."""
    _, h, w = shape
    return fit_image(im.convert("RGBA").getchannel("A"), (h, w), 1) >= 128


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation from ``a`` (alpha 0, returned exactly) to ``b`` (alpha 1, exactly) along the great
    circle through them, the angle measured between the flattened tensors; linear where they are (anti)parallel."""
    cos = float((a.double().flatten() @ b.double().flatten()) / (a.double().norm() * b.double().norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if math.sin(theta) < 1e-6:
        wa, wb = 1.0 - alpha, alpha
    else:
        wa, wb = math.sin((1 - alpha) * theta) / math.sin(theta), math.sin(alpha * theta) / math.sin(theta)
    return a * wa + b * wb


# ----------------------------------------------------------------------------- the edits


class Inpaint:
    """Keep the pixels ``mask`` marks white (or the opaque pixels of the image's alpha channel), generate the rest."""

    kind = "inpaint"

    def __init__(self, image, mask=None, resample: int = DEFAULT_RESAMPLE):
        self.source = _open(image, "image")
        self.mask_source = _open(mask, "mask") if mask is not None else None
        self.resample = resample
        if self.mask_source is None and not has_alpha(self.source):
            raise UsageError("inpainting needs a mask: pass --mask (white = keep, black = generate) "
                             "or an image with an alpha channel (opaque = keep)")
        if self.mask_source is not None and self.mask_source.size != self.source.size:
            (mw, mh), (iw, ih) = self.mask_source.size, self.source.size
            raise UsageError(f"the mask is {mw}x{mh} pixels but the image is {iw}x{ih}; they must be the same size")

    def check(self, sampler: str, eta: float) -> None:
        if sampler not in INPAINT_SAMPLERS:
            raise UsageError(f"inpainting works with the samplers {' and '.join(INPAINT_SAMPLERS)}, not {sampler}: "
                             "RePaint jumps back between steps, which the multistep and ODE solvers' state does not allow")
        check_positive("resample count (--resample)", self.resample)

    def prepare(self, shape: Sequence[int]) -> None:
        self.image = prepare_image(self.source, shape)  # uint8 (C, H, W)
        if self.mask_source is not None:
            self.keep = prepare_mask(self.mask_source, shape)  # bool (1, H, W)
        else:
            self.keep = _alpha_mask(self.source, shape)
        if not self.keep.any():
            raise UsageError("the mask keeps no pixel (white = keep, black = generate); "
                             "to generate whole images, run sample.py without --inpaint")

    def run(self, job: Job, ddpm: DDPM, net, batch, generators, noise, labels, progress) -> torch.Tensor:
        scheduler, _ = make_sampler(job.sampler, ddpm.scheduler.config)
        scheduler.set_timesteps(job.steps, device=noise.device)
        step_kwargs = sampler_step_kwargs(scheduler, generators, job.eta)
        x0 = to_model_range(self.image)[None].to(noise.device)  # (1, C, H, W)
        keep = self.keep[None].to(noise.device, torch.float32)  # (1, 1, H, W): 1 keeps, 0 is generated
        timesteps = scheduler.timesteps
        # alpha-bar of each listed timestep, and 1 (x0 itself) after the last: ddpm and ddim step from one listed
        # timestep to the next (t - T / steps with the schedule's default "leading" spacing)
        levels = [float(scheduler.alphas_cumprod[int(t)]) for t in timesteps] + [1.0]

        def fresh() -> torch.Tensor:  # per-image noise, drawn only from the image's own generator
            return image_noise(generators, job.shape).to(noise.device)  # (B, C, H, W)

        x = noise * scheduler.init_noise_sigma
        for k in progress(range(len(timesteps))):
            a_t, a_prev = levels[k], levels[k + 1]  # the level of x and the one the sampler steps to
            repeats = self.resample if k + 1 < len(timesteps) else 1  # no jump back from the final, clean image
            for r in range(repeats):
                x = ddpm.denoise_step(net, scheduler, x, timesteps[k], step_kwargs, labels, job.guidance_scale,
                                      job.null_label)  # x_{t-1}, generated everywhere
                known = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * fresh()  # q(x_{t-1} | x_0)
                x = keep * known + (1 - keep) * x
                if r + 1 < repeats:  # jump back: x_t ~ q(x_t | x_{t-1})
                    x = math.sqrt(a_t / a_prev) * x + math.sqrt(1 - a_t / a_prev) * fresh()
        return x.clamp(-1, 1)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {INPUT_NAME: self.image, MASK_NAME: self.keep.to(torch.uint8) * 255}

    def strip(self, images: torch.Tensor) -> torch.Tensor:
        """The input with its generated region gray, then the first outputs."""
        shown = torch.where(self.keep, self.image, torch.full_like(self.image, 128))
        return torch.cat([shown[None], images[:STRIP_OUTPUTS]])


class Img2Img:
    """SDEdit: noise the image to the level ``strength`` selects (0 none, 1 pure noise) and denoise from there."""

    kind = "img2img"

    def __init__(self, image, strength: float = 0.6):
        self.source = _open(image, "image")
        self.strength = strength

    def check(self, sampler: str, eta: float) -> None:
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= s <= 1.0:
            raise UsageError(f"strength (--strength) must be between 0 and 1, got {s!r}")

    def prepare(self, shape: Sequence[int]) -> None:
        self.image = prepare_image(self.source, shape)

    def steps_run(self, steps: int) -> int:
        """How many of the schedule's last steps run: round(strength * steps), at least one for any strength > 0."""
        return 0 if self.strength == 0 else min(steps, max(1, round(self.strength * steps)))

    def run(self, job: Job, ddpm: DDPM, net, batch, generators, noise, labels, progress) -> torch.Tensor:
        if self.strength == 1:  # from pure noise: plain sampling, so strength 1 reproduces sample.py exactly
            return plain_run(job, ddpm, net, batch, generators, noise, labels, progress)
        x0 = to_model_range(self.image)[None].expand_as(noise).to(noise.device)  # (B, C, H, W)
        n = self.steps_run(job.steps)
        if n == 0:
            return x0.clone()
        scheduler, _ = make_sampler(job.sampler, ddpm.scheduler.config)
        scheduler.set_timesteps(job.steps, device=noise.device)
        start = (job.steps - n) * scheduler.order  # second-order solvers list each step's timesteps twice
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):  # solvers that track a step index start it here
            scheduler.set_begin_index(start)
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(noise)))  # q(x_t | x_0), the scheduler's own scaling
        step_kwargs = sampler_step_kwargs(scheduler, generators, job.eta)
        for t in progress(timesteps):
            x = ddpm.denoise_step(net, scheduler, x, t, step_kwargs, labels, job.guidance_scale, job.null_label)
        return x.clamp(-1, 1)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {INPUT_NAME: self.image}

    def strip(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.image[None], images[:STRIP_OUTPUTS]])


class Interpolate:
    """Frames along the slerp between the initial noise of image 0 of ``seed_a`` and of ``seed_b``."""

    kind = "interpolate"

    def __init__(self, seed_a: int, seed_b: int, frames: int = 8):
        self.seeds, self.frames = (seed_a, seed_b), frames

    def check(self, sampler: str, eta: float) -> None:
        if sampler not in DETERMINISTIC_SAMPLERS or eta:
            raise UsageError(f"interpolation needs a deterministic sampler ({', '.join(DETERMINISTIC_SAMPLERS)}; ddim "
                             f"with eta 0), not {sampler}{f' with eta {eta}' if eta else ''}: "
                             "other samplers draw fresh noise at every step")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
                raise UsageError(f"seeds to interpolate (--interpolate) must be non-negative integers, got {s!r}")
        if isinstance(self.frames, bool) or not isinstance(self.frames, numbers.Integral) or self.frames < 2:
            raise UsageError(f"frames (--frames) must be an integer of at least 2, got {self.frames!r}")

    def prepare(self, shape: Sequence[int]) -> None:
        a, b = (image_noise(image_generators(s, [0]), shape)[0] for s in self.seeds)  # (C, H, W) each
        self.ends = a, b

    def run(self, job: Job, ddpm: DDPM, net, batch, generators, noise, labels, progress) -> torch.Tensor:
        a, b = self.ends
        frames = torch.stack([slerp(a, b, i / (self.frames - 1)) for i in batch]).to(noise)  # (B, C, H, W)
        return plain_run(job, ddpm, net, batch, generators, frames.contiguous(memory_format=torch.channels_last),
                      labels, progress)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {}

    def strip(self, images: torch.Tensor) -> torch.Tensor:
        return images


Edit = Inpaint | Img2Img | Interpolate


# ----------------------------------------------------------------------------- from Python


def edit(
    model_or_path, what: Edit, num_images: int, *, sampler: str = "ddim", steps: int | None = None, seed: int = 0,
    batch_size: int = 64, class_labels=None, guidance_scale: float = 1.0, eta: float = 0.0, device=None,
    mixed_precision: str = "no", indices: Sequence[int] | None = None, progress: bool = True,
    scheduler_config: dict | None = None,
) -> torch.Tensor:
    """Images ``indices`` (default all ``num_images``) of the edit ``what`` as uint8 (len(indices), C, H, W) on the
    CPU; the other arguments are ``resdiff.sampling.generate``'s. Image i depends only on (seed, i)."""
    check_sampler(sampler)
    what.check(sampler, eta)
    job = prepare_job(
        model_or_path, num_images, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
        class_labels=class_labels, guidance_scale=guidance_scale, eta=eta, device=device,
        mixed_precision=mixed_precision, scheduler_config=scheduler_config,
    )
    what.prepare(job.shape)
    indices = check_indices(indices, num_images)
    parts = [images for _, images in job_batches(job, indices, progress, what.run)]
    c, h, w = job.shape
    return torch.cat(parts) if parts else torch.empty(0, c, h, w, dtype=torch.uint8)


def inpaint(model_or_path, image, mask=None, num_images: int = 8, *, resample: int = DEFAULT_RESAMPLE, **kwargs) -> torch.Tensor:
    """``num_images`` inpaintings of ``image`` (path, pillow image or uint8 tensor): the pixels ``mask`` marks white
    (None: the image's opaque pixels) are kept, the rest generated; ``kwargs`` are ``edit``'s (sampler ddpm or ddim)."""
    return edit(model_or_path, Inpaint(image, mask, resample), num_images, **kwargs)


def img2img(model_or_path, image, num_images: int = 8, *, strength: float = 0.6, **kwargs) -> torch.Tensor:
    """``num_images`` SDEdit variations of ``image``: ``strength`` 0 returns it, 1 samples from scratch."""
    return edit(model_or_path, Img2Img(image, strength), num_images, **kwargs)


def interpolate(model_or_path, seed_a: int, seed_b: int, frames: int = 8, **kwargs) -> torch.Tensor:
    """``frames`` images from image 0 of ``seed_a`` to image 0 of ``seed_b`` (deterministic samplers)."""
    return edit(model_or_path, Interpolate(seed_a, seed_b, frames), frames, **kwargs)


# ----------------------------------------------------------------------------- the sample.py job


def _save_gif(frames: torch.Tensor, path: Path) -> None:
    """The frames there and back again, looping."""
    pictures = to_pil(frames)
    pictures += pictures[-2:0:-1]
    write_atomic(path, lambda tmp: pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                                                    duration=120, loop=0), per_process=True)


def edit_to_folder(
    model: str | Path, what: Edit, num_images: int, *, out: str | Path | None = None, sampler: str = "ddim",
    steps: int | None = None, seed: int = 0, batch_size: int = 64, class_labels=None, guidance_scale: float = 1.0,
    eta: float = 0.0, device=None, mixed_precision: str = "no", gif: bool = False, timeout_s: float = 1800.0,
    progress: bool = True, log=print,
) -> Path:
    """sample.py's editing job: like ``sample_to_folder``, each process writes the PNGs of
    ``range(num_images)[rank::world]``; then the main process writes grid.png, strip.png (the input and the first
    outputs, or every frame), the prepared input.png and mask.png, and with ``gif`` frames.gif. Returns the folder."""
    check_sampler(sampler)
    what.check(sampler, eta)
    state, owns_group, say, folder, job = start_job(
        model, num_images, device=device, timeout_s=timeout_s, log=log, sampler=sampler, steps=steps, seed=seed,
        batch_size=batch_size, class_labels=class_labels, guidance_scale=guidance_scale, eta=eta,
        mixed_precision=mixed_precision,
    )
    world, main = state.num_processes, state.is_main_process
    what.prepare(job.shape)
    seed_name = "-".join(map(str, what.seeds)) if isinstance(what, Interpolate) else job.seed
    out_dir = Path(out) if out is not None else default_out_dir(model, folder, job.sampler, job.steps, seed_name, what.kind)
    say(f"model: {folder}")
    say(f"{what.kind}: sampler: {job.sampler}, steps: {job.steps}, seed: {seed_name}, images: {num_images}, "
        f"processes: {world}, device: {job.device}")
    write_shares(state, job, out_dir, num_images, progress, what.run)

    if main:
        for name, image in what.inputs().items():
            save_png(to_pil(image[None])[0], out_dir / name)
        shown = read_images(out_dir, range(min(num_images, GRID_LIMIT)))
        save_summary(shown, out_dir, npz=False, grid=True)
        strip = what.strip(shown)
        save_png(make_grid(strip, cols=len(strip)), out_dir / STRIP_NAME)
        if gif:
            _save_gif(shown, out_dir / GIF_NAME)
    say(f"wrote {num_images} images to {out_dir} (and grid.png, {STRIP_NAME}"
        + "".join(f", {name}" for name in what.inputs()) + (f", {GIF_NAME}" if gif else "") + ")")
    if world > 1 and owns_group:
        state.destroy_process_group()
    return out_dir
