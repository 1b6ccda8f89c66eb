"""Editing with a trained model: inpainting (RePaint), image-to-image (SDEdit) and interpolation between seeds.

Each use is a small class with one interface, an *edit* (``resdiff.sampling.Edit``): ``check`` the sampling
settings before anything loads, ``prepare`` its input images for the model's image shape, ``run`` a batch from
its noise (what ``ImageGenerator`` calls where plain sampling would call ``GaussianDiffusion.sample``), and ``save_files``
beside the images of an output folder. So editing inherits sampling's guarantees unchanged: image ``i`` draws
every random number from ``image_generators(seed, [i])``, whatever the batch or the number of processes, and
``sample_to_folder(..., edit=...)`` writes its folder across processes exactly as for plain sampling.

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
import torch.nn.functional as F
from PIL import Image

from .choices import IMAGE_CHANNELS
from .data import fit_image, has_alpha, open_image, to_model_range
from .diffusion import image_generators, image_noise
from .errors import UsageError, one_line
from .hints import check_count
from .files import write_atomic
from .images import make_grid, save_png, to_pil
from .sampling import Batch, ImageGenerator, generate
from .settings import (DEFAULT_FRAMES, DEFAULT_IMAGES, DEFAULT_RESAMPLE, DEFAULT_STRENGTH, DETERMINISTIC_SAMPLERS,
                       INPAINT_SAMPLERS, INTERPOLATE_SAMPLER, SamplingSettings)

__all__ = [
    "Inpaint", "Img2Img", "Interpolate", "inpaint", "img2img", "interpolate", "prepare_image", "prepare_mask", "slerp",
    "INPAINT_SAMPLERS", "DETERMINISTIC_SAMPLERS", "INTERPOLATE_SAMPLER", "DEFAULT_RESAMPLE", "DEFAULT_STRENGTH",
    "DEFAULT_FRAMES", "DEFAULT_IMAGES",
]

STRIP_OUTPUTS = 7  # strip.png shows the input and this many outputs
INPUT_NAME, MASK_NAME, STRIP_NAME, GIF_NAME = "input.png", "mask.png", "strip.png", "frames.gif"


# ----------------------------------------------------------------------------- inputs, prepared like training images


def _open(source, what: str) -> Image.Image:
    """A pillow image from a path, a pillow image, or a uint8 tensor (C, H, W) / (H, W); a bad file is a UsageError."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, torch.Tensor):
        t = source if source.ndim == 3 else source[None]
        if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] not in IMAGE_CHANNELS:
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


class _Edit:
    """What the three edits share: the seed in a folder's name, and the files beside an output folder's images."""

    kind = ""
    gif = False
    default_sampler: str | None = None  # without a sampler given: SamplingSettings' default

    def seed_name(self, seed: int) -> str | int:
        return seed

    def inputs(self) -> dict[str, torch.Tensor]:
        """The prepared inputs, as the model saw them: file name -> uint8 (C, H, W)."""
        return {}

    def strip(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def save_files(self, out_dir: Path, shown: torch.Tensor) -> list[str]:
        """strip.png (the input and the first outputs, or every frame), the prepared inputs and, with ``gif``,
        frames.gif, from ``shown`` (the first outputs, uint8 (N, C, H, W)). Returns the names written."""
        strip = self.strip(shown)
        save_png(make_grid(strip, cols=len(strip)), out_dir / STRIP_NAME)
        for name, image in self.inputs().items():
            save_png(to_pil(image[None])[0], out_dir / name)
        if self.gif:
            _save_gif(shown, out_dir / GIF_NAME)
        return [STRIP_NAME, *self.inputs(), *([GIF_NAME] if self.gif else [])]


class Inpaint(_Edit):
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

    def check(self, settings: SamplingSettings) -> None:
        if settings.sampler not in INPAINT_SAMPLERS:
            raise UsageError(f"inpainting works with the samplers {' and '.join(INPAINT_SAMPLERS)}, not {settings.sampler}: "
                             "RePaint jumps back between steps, which the multistep and ODE solvers' state does not allow")
        check_count("resample count (--resample)", self.resample)

    def prepare(self, gen: ImageGenerator) -> None:
        self.image = prepare_image(self.source, gen.shape)  # uint8 (C, H, W)
        if self.mask_source is not None:
            self.keep = prepare_mask(self.mask_source, gen.shape)  # bool (1, H, W)
        else:
            self.keep = _alpha_mask(self.source, gen.shape)
        if not self.keep.any():
            raise UsageError("the mask keeps no pixel (white = keep, black = generate); "
                             "to generate whole images, run sample.py without --inpaint")
        # What the model sees: a latent model works on the latent grid, where a cell is kept when most of the
        # pixels it stands for are (the mask averaged over each cell; a cell's edge pixels are the decoder's).
        self.x0 = gen.to_model(to_model_range(self.image)[None])  # (1, C, h, w)
        size = gen.noise_shape[1:]
        self.keep_model = (F.adaptive_avg_pool2d(self.keep[None].float(), size) >= 0.5)[0] if size != gen.shape[1:] else self.keep

    def run(self, gen: ImageGenerator, batch: Batch) -> torch.Tensor:
        device = batch.noise.device
        scheduler = gen.scheduler(device)
        step_kwargs = gen.step_kwargs(scheduler, batch)
        x0 = self.x0.to(device)  # (1, C, H, W), in the model's space
        keep = self.keep_model[None].to(device, torch.float32)  # (1, 1, H, W): 1 keeps, 0 is generated
        timesteps = scheduler.timesteps
        # alpha-bar of each listed timestep, and 1 (x0 itself) after the last: ddpm and ddim step from one listed
        # timestep to the next (t - T / steps with the schedule's default "leading" spacing)
        levels = [float(scheduler.alphas_cumprod[int(t)]) for t in timesteps] + [1.0]

        def fresh() -> torch.Tensor:  # per-image noise, drawn only from the image's own generator
            return image_noise(batch.generators, gen.noise_shape).to(device)  # (B, C, H, W)

        x = batch.noise * scheduler.init_noise_sigma
        for k in batch.progress(range(len(timesteps))):
            a_t, a_prev = levels[k], levels[k + 1]  # the level of x and the one the sampler steps to
            repeats = self.resample if k + 1 < len(timesteps) else 1  # no jump back from the final, clean image
            for r in range(repeats):
                x = gen.denoise(scheduler, x, timesteps[k], batch, step_kwargs)  # x_{t-1}, generated everywhere
                known = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * fresh()  # q(x_{t-1} | x_0)
                x = keep * known + (1 - keep) * x
                if r + 1 < repeats:  # jump back: x_t ~ q(x_t | x_{t-1})
                    x = math.sqrt(a_t / a_prev) * x + math.sqrt(1 - a_t / a_prev) * fresh()
        return gen.diffusion.finished(x)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {INPUT_NAME: self.image, MASK_NAME: self.keep.to(torch.uint8) * 255}

    def strip(self, images: torch.Tensor) -> torch.Tensor:
        """The input with its generated region gray, then the first outputs."""
        shown = torch.where(self.keep, self.image, torch.full_like(self.image, 128))
        return torch.cat([shown[None], images[:STRIP_OUTPUTS]])


class Img2Img(_Edit):
    """SDEdit: noise the image to the level ``strength`` selects (0 none, 1 pure noise) and denoise from there."""

    kind = "img2img"

    def __init__(self, image, strength: float = DEFAULT_STRENGTH):
        self.source = _open(image, "image")
        self.strength = strength

    def check(self, settings: SamplingSettings) -> None:
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= s <= 1.0:
            raise UsageError(f"strength (--strength) must be between 0 and 1, got {s!r}")

    def prepare(self, gen: ImageGenerator) -> None:
        self.image = prepare_image(self.source, gen.shape)  # uint8 (C, H, W)
        self.x0 = gen.to_model(to_model_range(self.image)[None])  # (1, C, h, w): what the model sees of it

    def steps_run(self, steps: int) -> int:
        """How many of the schedule's last steps run: round(strength * steps), at least one for any strength > 0."""
        return 0 if self.strength == 0 else min(steps, max(1, round(self.strength * steps)))

    def run(self, gen: ImageGenerator, batch: Batch) -> torch.Tensor:
        if self.strength == 1:  # from pure noise: plain sampling, so strength 1 reproduces sample.py exactly
            return gen.sample(batch)
        noise = batch.noise
        x0 = self.x0.to(noise.device).expand_as(noise)  # (B, C, H, W), in the model's space
        n = self.steps_run(gen.steps)
        if n == 0:
            return x0.clone()
        scheduler = gen.scheduler(noise.device)
        start = (gen.steps - n) * scheduler.order  # second-order solvers list each step's timesteps twice
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):  # solvers that track a step index start it here
            scheduler.set_begin_index(start)
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(noise)))  # q(x_t | x_0), the scheduler's own scaling
        step_kwargs = gen.step_kwargs(scheduler, batch)
        for t in batch.progress(timesteps):
            x = gen.denoise(scheduler, x, t, batch, step_kwargs)
        return gen.diffusion.finished(x)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {INPUT_NAME: self.image}

    def strip(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.image[None], images[:STRIP_OUTPUTS]])


class Interpolate(_Edit):
    """Frames along the slerp between the initial noise of image 0 of ``seed_a`` and of ``seed_b``; with ``gif``,
    an output folder gets frames.gif too."""

    kind = "interpolate"
    default_sampler = INTERPOLATE_SAMPLER

    def __init__(self, seed_a: int, seed_b: int, frames: int = DEFAULT_FRAMES, gif: bool = False):
        self.seeds, self.frames, self.gif = (seed_a, seed_b), frames, gif

    def check(self, settings: SamplingSettings) -> None:
        sampler, eta = settings.sampler, settings.eta
        if sampler not in DETERMINISTIC_SAMPLERS or eta:
            raise UsageError(f"interpolation needs a deterministic sampler ({', '.join(DETERMINISTIC_SAMPLERS)}; ddim "
                             f"with eta 0), not {sampler}{f' with eta {eta}' if eta else ''}: "
                             "other samplers draw fresh noise at every step")
        for s in self.seeds:
            check_count("a seed to interpolate (--interpolate)", s, least=0)
        check_count("frames (--frames)", self.frames, least=2)

    def prepare(self, gen: ImageGenerator) -> None:
        a, b = (image_noise(image_generators(s, [0]), gen.noise_shape)[0] for s in self.seeds)  # (C, H, W) each
        self.ends = a, b

    def seed_name(self, seed: int) -> str:
        return "-".join(map(str, self.seeds))

    def run(self, gen: ImageGenerator, batch: Batch) -> torch.Tensor:
        a, b = self.ends
        frames = torch.stack([slerp(a, b, i / (self.frames - 1)) for i in batch.indices]).to(batch.noise)  # (B, C, H, W)
        return gen.sample(batch, frames.contiguous(memory_format=torch.channels_last))


def _save_gif(frames: torch.Tensor, path: Path) -> None:
    """The frames there and back again, looping."""
    pictures = to_pil(frames)
    pictures += pictures[-2:0:-1]
    write_atomic(path, lambda tmp: pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                                                    duration=120, loop=0), per_process=True)


# ----------------------------------------------------------------------------- from Python
# Each returns uint8 (N, C, H, W); ``settings`` and keyword changes of it are ``resdiff.sampling.generate``'s.


def inpaint(model_or_path, image, mask=None, num_images: int = DEFAULT_IMAGES,
            settings: SamplingSettings | None = None, *, resample: int = DEFAULT_RESAMPLE, **kwargs) -> torch.Tensor:
    """``num_images`` inpaintings of ``image`` (path, pillow image or uint8 tensor): the pixels ``mask`` marks white
    (None: the image's opaque pixels) are kept, the rest generated (sampler ddpm or ddim)."""
    return generate(model_or_path, num_images, settings, edit=Inpaint(image, mask, resample), **kwargs)


def img2img(model_or_path, image, num_images: int = DEFAULT_IMAGES, settings: SamplingSettings | None = None, *,
            strength: float = DEFAULT_STRENGTH, **kwargs) -> torch.Tensor:
    """``num_images`` SDEdit variations of ``image``: ``strength`` 0 returns it, 1 samples from scratch."""
    return generate(model_or_path, num_images, settings, edit=Img2Img(image, strength), **kwargs)


def interpolate(model_or_path, seed_a: int, seed_b: int, frames: int = DEFAULT_FRAMES,
                settings: SamplingSettings | None = None, **kwargs) -> torch.Tensor:
    """``frames`` images from image 0 of ``seed_a`` to image 0 of ``seed_b`` (deterministic samplers)."""
    return generate(model_or_path, frames, settings, edit=Interpolate(seed_a, seed_b, frames), **kwargs)
