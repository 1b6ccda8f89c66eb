"""The run's quality during training: FID and KID of the EMA model's samples against the training data at
checkpoints, logged and drawn in RUN/quality.png, within a share of the training time.

    evaluator = TrainingEvaluator(net, data, image_size=32, channels=3, every=400, num_images=64, settings=...,
                                  budget_share=0.1)
    evaluator.calibrate(unet, scheduler_config)   # seconds a sample costs here (generation + Inception), timed once
    evaluator(ema_model, scheduler_config, step=400, train_seconds=..., eval_seconds=..., should_stop=...)

With a ``budget_share`` (``train.eval_every: auto``) the evaluations together never take more than that share of
the training time so far: before each one the main process compares its estimated cost with what the share
leaves, and takes fewer samples, or skips it, saying which. The estimate is timed at the start and corrected by
every evaluation. FID falls as n grows, so each figure carries its n (``fid@64``): only figures of the same n
compare. ``should_stop`` is polled between batches, so a signal ends an evaluation within one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .layout import QUALITY_PICTURE
from .diffusion import make_sampler
from .features import FeatureStats, extract_features, sample_features
from .metrics import fid_from_stats, kid
from .processes import on_main, rank_world
from .reference import reference_features
from .rundir import read_log
from .sampling import ImageGenerator, steps_for
from .settings import SamplingSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .autoencoder import LatentSpace

__all__ = ["TrainingEvaluator", "Evaluation", "kid_figures", "quality_chart", "quality_picture", "EVAL_SHARE",
           "MIN_IMAGES"]

EVAL_SHARE = 0.1  # train.eval_every auto: evaluations take at most this share of the training time so far
MIN_IMAGES = 16  # fewer samples than this make a figure too noisy for its cost: the evaluation is skipped instead


def kid_figures(gen: torch.Tensor, ref: torch.Tensor, subsets: int, device: torch.device) -> dict[str, float]:
    """``kid@n`` and ``kid_std@n`` of n generated features against the reference, subsets of up to 1000.

    When a subset holds both sets whole (training's default: 64 samples against 64 reference images), every
    subset is the same pair of sets: one is computed and no spread is reported, since it would be 0 by
    construction rather than a measured uncertainty."""
    n, size = len(gen), min(1000, len(gen), len(ref))
    whole = size == len(gen) == len(ref)
    mean, std = kid(gen, ref, subsets=1 if whole else subsets, subset_size=size, device=device, split=True)
    return {f"kid@{n}": mean} if whole else {f"kid@{n}": mean, f"kid_std@{n}": std}


@dataclass
class Evaluation:
    """What one call gave: the figures (empty when skipped), how many samples, the seconds it took on this process,
    and a note saying why it took fewer samples than asked or was skipped (None when it ran as asked)."""

    figures: dict[str, float] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    note: str | None = None


def _evaluations(sampler: str, steps: int, scheduler_config: dict) -> int:
    """Model evaluations of ``steps`` steps of ``sampler`` (a second-order sampler calls the model about twice a step)."""
    scheduler, _ = make_sampler(sampler, scheduler_config)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


class TrainingEvaluator:
    """FID and KID of ``num_images`` EMA samples against ``num_images`` training images from ``data`` (a folder,
    prepared as training prepares it: ``image_size``, ``channels``), every ``every`` steps and at the end.

    Every process generates and extracts its share of the samples (as previews do) and holds the reference
    features, which are extracted (each process its share) at the first evaluation and cached on disk; FID is
    computed by each from the summed statistics and KID's subsets are shared out, so all get the same figures.
    ``settings`` say how the samples are drawn (its ``batch_size`` is also the feature batch). ``budget_share``
    (None: evaluate as asked) bounds the evaluations' time, see the module docstring. With ``run_dir`` the main
    process redraws ``run_dir/quality.png`` (FID and loss against step, from the log) at each evaluation.
    """

    def __init__(
        self, net: torch.nn.Module, data: str | Path, *, image_size: int | Sequence[int], channels: int, every: int,
        num_images: int, settings: SamplingSettings, kid_subsets: int = 10, run_dir: str | Path | None = None,
        budget_share: float | None = None, log: Callable[[str], None] | None = None, latent: "LatentSpace | None" = None,
    ):
        self.net, self.data, self.image_size, self.channels = net, Path(data), image_size, channels
        self.every, self.num_images, self.settings, self.kid_subsets = every, num_images, settings, kid_subsets
        self.budget_share, self.log, self.latent = budget_share, log, latent  # latent: samples are decoded
        # where the features are computed: the settings' device, else where the network is
        self.device = torch.device(settings.device or next(net.parameters(), torch.empty(0)).device)
        self.picture = Path(run_dir) / QUALITY_PICTURE if run_dir is not None else None
        self.reference: tuple[torch.Tensor | None, FeatureStats] | None = None  # extracted at the first evaluation
        self.sample_seconds = 0.0  # one sample's generation and features on one process (0: not timed yet)
        self.feature_seconds = 0.0  # one image's features alone (what each reference image costs)

    # ----------------------------------------------------------------------------- cost
    def calibrate(self, model: torch.nn.Module, scheduler_config: dict, probe: int = 4) -> float:
        """Time ``probe`` samples of ``model`` (two sampler steps, scaled to the evaluation's model evaluations)
        and their features, after one warm-up; returns and keeps the seconds one sample costs on this process.
        The weights do not matter, so a fresh model calibrates the run before it trains."""
        probe = max(1, min(probe, self.settings.batch_size))
        short = replace(self.settings, steps=2, batch_size=probe)
        full = _evaluations(self.settings.sampler, steps_for(self.settings, scheduler_config),
                            scheduler_config)
        generator = ImageGenerator(model, short, scheduler_config, latent=self.latent)
        with generator.ready():
            generator.images([0])  # warm-up: the first call creates the convolutions' kernels
            start = time.perf_counter()
            images = generator.images(list(range(probe)))
            generation = time.perf_counter() - start
        extract_features(images[:1], self.net, device=self.device, channels_last=True)  # warm-up
        start = time.perf_counter()
        extract_features(images, self.net, batch_size=probe, device=self.device, channels_last=True)
        self.feature_seconds = (time.perf_counter() - start) / probe
        per_step = generation / probe / _evaluations(self.settings.sampler, 2, scheduler_config)
        self.sample_seconds = per_step * full + self.feature_seconds
        return self.sample_seconds

    def estimate(self, n: int | None = None, world: int | None = None) -> float:
        """Seconds an evaluation of ``n`` samples (default ``num_images``) takes on ``world`` processes, the
        reference's extraction included until it is done (counted as not cached)."""
        n = self.num_images if n is None else n
        world = world or rank_world()[1]
        reference = 0.0 if self.reference is not None else self.num_images * self.feature_seconds / world
        return reference + n * self.sample_seconds / world

    def plan(self, train_seconds: float, eval_seconds: float) -> tuple[int, str | None]:
        """(samples to take, a note when that is fewer than asked or none): within ``budget_share`` of
        ``train_seconds`` less the ``eval_seconds`` earlier evaluations took; as asked without a budget."""
        n = self.num_images
        if self.budget_share is None or not self.sample_seconds:
            return n, None
        left = self.budget_share * train_seconds - eval_seconds
        if self.estimate(n) <= left:
            return n, None
        world = rank_world()[1]
        fixed = self.estimate(0)
        take = min(n, int((left - fixed) * world / self.sample_seconds)) if left > fixed else 0
        why = (f"{n} samples would take about {self.estimate(n):.0f} s, more than the {max(left, 0):.0f} s left of "
               f"{self.budget_share:.0%} of the {train_seconds:.0f} s trained so far")
        if take < min(n, MIN_IMAGES):
            return 0, f"skipped: {why} (train.eval_every=N evaluates every N steps regardless)"
        return take, f"{take} of {n} samples: {why}"

    # ----------------------------------------------------------------------------- one evaluation
    def __call__(
        self, model: torch.nn.Module, scheduler_config: dict, *, step: int, train_seconds: float = 0.0,
        eval_seconds: float = 0.0, should_stop: Callable[[], bool] | None = None,
    ) -> Evaluation:
        """The figures of ``model`` at ``step`` on every process (the plan is the main process's, shared). Raises
        ``resdiff.features.Stopped`` when ``should_stop()`` (a collective) turns true between batches."""
        start = time.perf_counter()
        n, note = on_main(lambda: self.plan(train_seconds, eval_seconds))
        if n == 0:
            return Evaluation(note=note)
        if self.reference is None:  # every process its share, then all hold them (cached on disk for the next run)
            self.reference = reference_features(self.data, self.net, self.image_size, self.channels,
                                                log=self.log if rank_world()[0] == 0 else None,
                                                max_images=self.num_images)
        sampling = time.perf_counter()
        generator = ImageGenerator(model, self.settings, scheduler_config, latent=self.latent)
        with generator.ready():  # eval mode and channels_last once, not once per batch
            stats, gen = sample_features(generator.images, n, self.net, batch_size=self.settings.batch_size,
                                         device=self.device, should_stop=should_stop)
        self.sample_seconds = (time.perf_counter() - sampling) * rank_world()[1] / n  # corrected by this one
        ref_features, ref_stats = self.reference
        figures = {f"fid@{n}": fid_from_stats(stats, ref_stats)}
        if ref_features is not None:  # each process computes its share of KID's subsets
            figures.update(kid_figures(gen, ref_features, self.kid_subsets, self.device))
        if self.picture is not None and rank_world()[0] == 0:
            quality_picture([*read_log(self.picture.parent), {"step": step, **figures}], n, self.picture,
                            kid=ref_features is not None)
        return Evaluation(figures, n, time.perf_counter() - start, note)


# ----------------------------------------------------------------------------- the training curve picture


def quality_chart(records: list[dict], n: int, *, kid: bool = True) -> "Figure":
    """FID@n, KID@n (with ``kid``: the evaluation computes it) and the training loss of a run's log records against
    step. The panels are the same at every evaluation of a run, the first included."""
    from .charts import Panel, step_chart

    kid_panel = [Panel(f"kid@{n}", f"KID@{n}")] if kid else []
    panels = [Panel(f"fid@{n}", f"FID@{n} (lower is better)"), *kid_panel, Panel("loss", "training loss", log_y=True)]
    return step_chart(records, panels, title=f"EMA samples (n = {n}) and training loss; FID compares only at the same n")


def quality_picture(records: list[dict], n: int, path: str | Path, *, kid: bool = True) -> Path:
    """``quality_chart`` as a PNG at ``path``, written whole or not at all (a viewer never sees half of it)."""
    from .charts import save

    return save(quality_chart(records, n, kid=kid), path)
