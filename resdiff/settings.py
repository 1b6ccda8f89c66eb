"""What the generating CLIs let users choose, with the defaults, written once: ``SamplingSettings`` (sample.py,
evaluate.py, editing), ``Scoring`` (evaluate.py) and the editing flags' defaults.

No torch or diffusers here, so that ``sample.py --help`` and ``evaluate.py --help`` answer at once; the things
the settings stand for are built where they are used (``resdiff.sampling``, ``resdiff.editing``,
``resdiff.evaluation``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .choices import PRECISIONS, SAMPLERS, STOCHASTIC_SAMPLERS
from .errors import UsageError
from .hints import check_count

if TYPE_CHECKING:
    import torch

__all__ = [
    "SamplingSettings", "Scoring", "add_arguments", "check_sampler", "check_steps", "default_settings", "default_sampler",
    "FEW_STEPS", "FEW_STEP_SAMPLER", "INPAINT_SAMPLERS",
    "DETERMINISTIC_SAMPLERS", "INTERPOLATE_SAMPLER", "DEFAULT_RESAMPLE", "DEFAULT_STRENGTH", "DEFAULT_FRAMES",
    "DEFAULT_IMAGES",
]

# Editing (resdiff.editing, sample.py's --inpaint / --init / --interpolate).
INPAINT_SAMPLERS = ("ddpm", "ddim")  # RePaint jumps back between steps; these two samplers keep no state across steps
DETERMINISTIC_SAMPLERS = tuple(s for s in SAMPLERS if s not in STOCHASTIC_SAMPLERS)  # ddim with eta 0
INTERPOLATE_SAMPLER = "ddim"  # interpolation's default: the default sampler (ddpm) draws fresh noise at every step
DEFAULT_RESAMPLE = 5  # RePaint repeats per step; on the demo model 1 fills a hole with shapes of other colours, 5 continues the kept one
DEFAULT_STRENGTH = 0.6  # SDEdit's noise level: enough to turn a drawing into the model's own shapes, keeping its layout
DEFAULT_FRAMES = 8  # interpolation frames, both ends included
DEFAULT_IMAGES = 8  # inpaintings or variations of one input

# The sampler of a user who names none, by step count (docs/benchmarks.md, "Samplers built for few steps"): at 10
# model evaluations dpm++sde was the best or within 0.6% of the best on both image sets; at 20 it was below ddpm
# on both (OpenMoji's 40-minute model 5.2%, Noto's 10-minute 2.3%, three sampling seeds each); above 20 steps
# ancestral ddpm (SamplingSettings' default).
FEW_STEPS, FEW_STEP_SAMPLER = 20, "dpm++sde"


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def check_steps(name: str, steps: int, timesteps: int) -> None:
    """Sampling ``steps`` (set by ``name``: --steps, train.preview_steps) take at most the model's training
    ``timesteps``: each step lands on one of them."""
    if steps > timesteps:
        raise UsageError(f"{name} {steps} is more than the {timesteps} timesteps the model is trained with; "
                         f"use {name} {timesteps} or fewer")


def default_sampler(steps: int | None = None, edit: object | None = None) -> str:
    """The sampler of a user who names none: an edit's own where it has one (interpolation's deterministic one),
    ``FEW_STEP_SAMPLER`` for plain sampling in ``FEW_STEPS`` steps or fewer, else ``SamplingSettings``' ddpm.
    Other edits keep ddpm: inpainting takes only ``INPAINT_SAMPLERS``."""
    own = getattr(edit, "default_sampler", None)
    if own:
        return own
    if edit is None and steps is not None and steps <= FEW_STEPS:
        return FEW_STEP_SAMPLER
    return SamplingSettings.sampler


def default_settings(edit: object | None = None, steps: int | None = None) -> "SamplingSettings":
    """``SamplingSettings()`` with ``default_sampler(steps, edit)``: the one place the default sampler is applied,
    for the Python API and the CLIs alike."""
    return SamplingSettings(sampler=default_sampler(steps, edit))




@dataclass
class SamplingSettings:
    """How to sample: the one place these choices and their defaults are written.

    ``sampler`` defaults to ancestral DDPM at 50 steps: the lowest FID at 50 model evaluations on both real image
    sets measured. Where the user names no sampler (``default_settings``, the CLIs) 20 steps or fewer get
    ``FEW_STEP_SAMPLER`` and interpolation, which needs a deterministic one, ``INTERPOLATE_SAMPLER``. ``steps`` None is the sampler's own count (``choices.SAMPLERS``), at
    most the training timesteps.
    ``class_labels``: one label for every image or a list cycled over image indices (image i gets
    labels[i % len]); None on a class-conditional model cycles over all classes. ``guidance_scale`` != 1 is
    classifier-free guidance with the null class. ``mixed_precision`` "fp16"/"bf16" runs the model under
    torch.autocast. ``device`` None: a model folder goes to this process's GPU, else the CPU; an in-memory
    model stays where it is. ``batch_size`` is per process. ``compile`` torch.compiles a resdiff U-Net's
    blocks first: minutes of start-up that pay off over many images. ``timeout_s``: with several processes,
    how long one waits for the others at a barrier before it gives up (a peer that died).
    """

    sampler: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 64
    class_labels: int | Sequence[int] | None = None
    guidance_scale: float = 1.0
    mixed_precision: str = "no"
    device: str | torch.device | None = None
    compile: bool = False
    timeout_s: float = 1800.0
    autoencoder: str | None = None  # a latent model's autoencoder, where it is not at the SPEC its folder records

    def check(self) -> None:
        """Every check that needs no model; a mistake is one UsageError line naming the flag."""
        if self.steps is not None:
            check_count("steps (--steps)", self.steps)
        check_count("batch size (--batch-size)", self.batch_size)
        check_sampler(self.sampler)
        check_count("seed (--seed)", self.seed, least=0)
        if self.mixed_precision not in PRECISIONS:
            raise UsageError(f"unknown mixed precision {self.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.eta and self.sampler != "ddim":
            raise UsageError(f"eta applies to the ddim sampler only; drop --eta or use --sampler ddim (not {self.sampler})")
        if not math.isfinite(self.eta) or self.eta < 0 or not math.isfinite(self.guidance_scale):
            raise UsageError(f"eta must be >= 0 and guidance scale finite, got eta={self.eta}, "
                             f"guidance scale={self.guidance_scale}")
        from .hardware import check_device  # torch: only once a run is about to start

        check_device(self.device)

    @classmethod
    def from_args(cls, args, edit: object | None = None) -> "SamplingSettings":
        """The settings of parsed command-line flags (``add_arguments``'s, and sample.py's --compile); without
        --sampler, ``default_sampler(--steps, edit)``."""
        return cls(sampler=args.sampler or default_sampler(args.steps, edit), steps=args.steps, eta=args.eta,
                   seed=args.seed, batch_size=args.batch_size,
                   class_labels=args.class_label, guidance_scale=args.guidance_scale,
                   mixed_precision=args.mixed_precision, device=args.device, compile=getattr(args, "compile", False),
                   timeout_s=args.timeout_s, autoencoder=args.autoencoder)

    def changed(self, changes: dict) -> "SamplingSettings":
        """These settings with some fields replaced (``generate(model, 8, steps=20)``); an unknown name is a TypeError."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown sampling setting(s) {', '.join(sorted(unknown))}; see SamplingSettings")
        return replace(self, **changes) if changes else self


def add_arguments(parser) -> None:
    """The sampling flags that sample.py and evaluate.py share, with SamplingSettings' defaults."""
    d = SamplingSettings()
    p = parser.add_argument
    p("--sampler", default=None, metavar="{" + ",".join(SAMPLERS) + "}",
      help=f"default {d.sampler}; {FEW_STEP_SAMPLER} with --steps {FEW_STEPS} or fewer; {INTERPOLATE_SAMPLER} for "
           "interpolation, which needs a deterministic sampler")
    p("--steps", type=int, default=d.steps, help="sampling steps (default: the sampler's own: "
      + ", ".join(f"{k} {v[1]}" for k, v in SAMPLERS.items()) + ")")
    p("--eta", type=float, default=d.eta, help="DDIM eta: 0 deterministic, 1 like DDPM (ddim only)")
    p("--seed", type=int, default=d.seed, help=f"image i depends only on (seed, i) (default {d.seed})")
    p("--batch-size", type=int, default=d.batch_size, help=f"images per batch on each process (default {d.batch_size})")
    p("--class-label", type=int, nargs="+", default=d.class_labels, metavar="LABEL",
      help="class-conditional models: one label for all images, or several cycled over the images")
    p("--guidance-scale", type=float, default=d.guidance_scale,
      help=f"classifier-free guidance scale (default {d.guidance_scale:g}: none)")
    p("--mixed-precision", default=d.mixed_precision, metavar="{" + ",".join(PRECISIONS) + "}",
      help=f"run the model under autocast (default {d.mixed_precision})")
    p("--device", default=d.device, help="e.g. cpu, cuda, cuda:1 (default: this process's GPU, else cpu)")
    p("--autoencoder", default=d.autoencoder, metavar="SPEC",
      help="a latent model's autoencoder, where it is not at the SPEC its model folder records (checked: the same files)")
    p("--timeout-s", type=float, default=d.timeout_s,
      help=f"with several processes: how long one waits for the others before giving up (default {d.timeout_s:g})")


@dataclass
class Scoring:
    """How to score: the FID Inception weights (``inception``: a path; None: the cached copy, downloaded on first
    use; ``verify_inception=False`` accepts weights with another checksum, whose figures are then not comparable
    with published ones), KID's subsets and the k of precision/recall."""

    inception: str | Path | None = None
    verify_inception: bool = True
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    k: int = 3

    def check(self) -> None:
        """The limits of KID and precision/recall that need no features; a mistake is one UsageError line naming
        the setting and its flag (a subset needs 2 features for the unbiased MMD, a k-th neighbour needs k >= 1)."""
        for name, flag, value, least in (("KID subsets", "--kid-subsets", self.kid_subsets, 1),
                                         ("KID subset size", "--kid-subset-size", self.kid_subset_size, 2),
                                         ("precision/recall k", None, self.k, 1)):
            check_count(f"{name} ({flag})" if flag else name, value, least)
