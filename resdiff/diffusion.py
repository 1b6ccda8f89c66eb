"""GaussianDiffusion: the training objective and the sampling loop around diffusers' schedulers.

The noise schedule math is diffusers' (``DDPMScheduler.add_noise``, ``get_velocity``, each
scheduler's ``step``); this module chooses the target, weights the loss and runs the loop.
Like improved-diffusion, the network is passed in, so a DDP-wrapped model works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .choices import SAMPLERS, TIMESTEP_SAMPLING
from .config import DiffusionConfig

__all__ = ["GaussianDiffusion", "Guidance", "make_sampler", "sampler_step_kwargs", "image_generators", "image_noise",
           "immiscible_order", "laplace_timestep_probs", "shifted_betas"]


def make_sampler(name: str, train_config: dict) -> tuple[SchedulerMixin, int]:
    """A fresh diffusers scheduler for sampler ``name`` sharing the training noise schedule, and its default steps."""
    class_name, steps, extra = SAMPLERS[name]  # a name was checked where the user gave it (settings, config)  # resdiff.choices: the one list of samplers
    return getattr(diffusers, class_name).from_config(dict(train_config), **extra), steps


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, image index): an image's randomness is its own,
    whatever the batch size, the batch it lands in, or the number of processes."""
    states = [np.random.SeedSequence([seed, int(i)]).generate_state(2, dtype=np.uint32) for i in indices]
    return [torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1])) for s in states]


def image_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of ``shape`` for each generator, stacked: (len(generators), *shape), on the CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def immiscible_order(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The order of ``noise`` (N, ...) that pairs it with the images ``x0`` (N, ...) by the least total L2 distance:
    immiscible diffusion's assignment (Li et al. 2024, "Immiscible Diffusion", Algorithm 1), solved exactly by
    scipy's ``linear_sum_assignment`` (Jonker-Volgenant) on the batch's distance matrix. Returns (N,) indices."""
    from scipy.optimize import linear_sum_assignment

    distance = torch.cdist(x0.detach().flatten(1).float(), noise.flatten(1).float())  # (N images, N noises)
    _, order = linear_sum_assignment(distance.cpu().numpy())
    return torch.as_tensor(order, device=noise.device)


# The Laplace density of log-SNR that Hang et al. 2024 ("Improved Noise Schedule for Diffusion Training", section 3,
# the schedule as importance sampling of log-SNR) found best: location 0 (SNR 1), scale 0.5.
LAPLACE_MU, LAPLACE_B = 0.0, 0.5


def laplace_timestep_probs(alphas_cumprod: torch.Tensor, mu: float = LAPLACE_MU, b: float = LAPLACE_B) -> torch.Tensor:
    """(T,) probability of drawing each training timestep such that the drawn log-SNR follows Laplace(mu, b): each
    timestep takes the Laplace mass of the log-SNRs nearer to its own than to its neighbours' (the Laplace noise
    schedule of Hang et al. 2024 on a discrete schedule; the model still sees only the scheduler's timesteps)."""
    a = alphas_cumprod.double()
    log_snr = torch.log(a) - torch.log1p(-a)  # (T,), falling with t; -inf at a zero-SNR last step
    edges = (log_snr[1:] + log_snr[:-1]) / 2  # (T - 1,) where one timestep's share ends and the next one's begins
    z = (edges - mu) / b
    cdf = torch.where(z < 0, 0.5 * torch.exp(z.clamp(max=0)), 1 - 0.5 * torch.exp(-z.clamp(min=0)))  # Laplace CDF
    above = torch.cat([cdf.new_ones(1), cdf])  # P(log-SNR < upper edge of t); t = 0 owns everything above
    below = torch.cat([cdf, cdf.new_zeros(1)])
    return (above - below).float()


def shifted_betas(betas: torch.Tensor, shift: float) -> torch.Tensor:
    """(T,) betas of the schedule ``betas`` shifted towards noise: SNR(t) / shift^2 at every timestep, so that an input
    whose layout survives more noise (more pixels, or latent channels) is noised as a small image is at SNR(t)
    (Hoogeboom et al. 2023, section 3.1: log-SNR + 2 log(1/shift); Esser et al. 2024's shift, section 5.3.2)."""
    alphas_cumprod = torch.cumprod(1 - betas.double(), 0)
    snr = alphas_cumprod / (1 - alphas_cumprod) / shift**2
    shifted = snr / (1 + snr)  # alpha_bar(t) of the shifted SNR
    previous = torch.cat([shifted.new_ones(1), shifted[:-1]])
    return (1 - shifted / previous).float()


# What diffusion.schedule_shift "auto" is for a latent model: an autoencoder's latent keeps its layout readable at
# noise levels that hide a small image's (TAEF2: 32 channels per position where a 32x32 image has 3), so latent
# models train on the schedule shifted towards noise; pixel models keep it as named (shift 1). On 256 px OpenMoji
# through TAEF2, after 10 CPU minutes: FID -6.6% with 5 against none over three seeds; 2 and 3 scored between
# (docs/benchmarks.md, "Latent diffusion at 256x256").
LATENT_SCHEDULE_SHIFT = 5.0


def resolve_schedule_shift(setting: float | str, latent: bool) -> float:
    """``diffusion.schedule_shift`` as a number: a number as it is; "auto" ``LATENT_SCHEDULE_SHIFT`` for a
    ``latent`` model, 1 (the schedule as named) for a pixel model."""
    if setting == "auto":
        return LATENT_SCHEDULE_SHIFT if latent else 1.0
    return float(setting)


@dataclass
class Guidance:
    """The class labels (B,) of a batch (None: unconditional) and classifier-free guidance: with ``scale`` != 1
    the model also predicts for the ``null_label`` class and the two mix as uncond + scale * (cond - uncond)."""

    labels: torch.Tensor | None = None
    scale: float = 1.0
    null_label: int | None = None

    @property
    def guided(self) -> bool:
        return self.labels is not None and self.scale != 1.0

    def predict(self, model: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's output for ``x`` at ``t``, guided when ``guided``: (B, C', H, W)."""
        if not self.guided:
            return model(x, t, self.labels).sample
        if self.null_label is None:
            raise ValueError("classifier-free guidance needs the model's null label")
        labels = torch.cat([self.labels, torch.full_like(self.labels, self.null_label)])
        cond, uncond = model(torch.cat([x, x]), t, labels).sample.chunk(2)  # (B, C', H, W) each
        return uncond + self.scale * (cond - uncond)


class GaussianDiffusion:
    """Gaussian denoising diffusion (Ho et al. 2020) over a diffusers ``DDPMScheduler``: it trains with any
    target and runs every sampler of ``SAMPLERS``.

    ``loss`` is the training objective: noise the data at random timesteps (uniform, or with Laplace-distributed
    log-SNRs: ``laplace_timestep_probs``) and regress the model's prediction onto the target (epsilon, v or x0),
    optionally min-SNR-gamma weighted (Hang et al. 2023), the noise optionally assigned to the images by
    ``immiscible_order``.
    ``sample`` runs any diffusers scheduler from noise to images.
    """

    def __init__(
        self, scheduler: DDPMScheduler, *, min_snr_gamma: float | None = DiffusionConfig.min_snr_gamma,
        label_dropout: float = DiffusionConfig.label_dropout, immiscible: bool = DiffusionConfig.immiscible,
        timestep_sampling: str = DiffusionConfig.timestep_sampling,
    ):
        self.scheduler = scheduler
        self.min_snr_gamma = min_snr_gamma
        self.label_dropout = label_dropout
        self.immiscible = immiscible
        alphas = scheduler.alphas_cumprod.float()
        self.snr = alphas / (1 - alphas)  # (T,) signal-to-noise ratio of each timestep
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                             f"got {timestep_sampling!r}")
        # (T,) how often training draws each timestep; None: uniformly
        self.timestep_probs = laplace_timestep_probs(alphas) if timestep_sampling == "laplace" else None

    @classmethod
    def from_config(cls, settings: DiffusionConfig | None = None, *, latent: bool = False,
                    **changes) -> "GaussianDiffusion":
        """The diffusion a config's ``diffusion`` section describes (default: ``DiffusionConfig()``, the one
        place its defaults are written), with ``changes`` naming its fields (``from_config(prediction_type="sample")``).
        Images live in [-1, 1], so samplers clip predicted images there; ``latent`` models' normalised latents do
        not, and are not clipped (the scheduler config a model folder saves carries the choice).

        Samplers place their steps "trailing" (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
        are Flawed", section 3.3): the first step is the last training timestep, where the sampler's pure noise
        belongs, whatever the step count. diffusers' default, "leading", starts 10 steps at t = 900 of 1000, from
        noise the model never saw there (FID at 10 steps 11 to 18% lower on OpenMoji; docs/benchmarks.md). It is a
        sampling choice only (training draws every timestep) and lives in the scheduler config that sample.py and
        diffusers' pipelines both read, so the two place a model's steps alike; a model saved before keeps its own."""
        d = replace(settings or DiffusionConfig(), **changes)
        shift = resolve_schedule_shift(d.schedule_shift, latent)
        schedule = dict(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                        beta_start=d.beta_start, beta_end=d.beta_end)
        if shift != 1:  # the shifted betas go into the scheduler config: every sampler reads them there
            schedule["trained_betas"] = shifted_betas(DDPMScheduler(**schedule).betas, shift).tolist()
        scheduler = DDPMScheduler(**schedule, prediction_type=d.prediction_type, clip_sample=not latent,
                                  timestep_spacing="trailing")
        return cls(scheduler, min_snr_gamma=d.min_snr_gamma, label_dropout=d.label_dropout, immiscible=d.immiscible,
                   timestep_sampling=d.timestep_sampling)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        if self.prediction_type == "sample":
            return x0
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weight per sample, expressed for the chosen target; None for the plain MSE."""
        if self.min_snr_gamma is None:
            return None
        if self.snr.device != t.device:  # move the table once, not on every step
            self.snr = self.snr.to(t.device)
        snr = self.snr[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[self.prediction_type]

    def drop_labels(self, labels: torch.Tensor, null_label: int) -> torch.Tensor:
        """Replace labels by the null class with probability ``label_dropout`` (classifier-free guidance)."""
        if self.label_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, null_label), labels)

    def draw_timesteps(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) training timesteps: uniform, or by ``timestep_probs``."""
        if self.timestep_probs is None:
            return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), device=device)
        if self.timestep_probs.device != device:  # move the table once, not on every step
            self.timestep_probs = self.timestep_probs.to(device)
        return torch.multinomial(self.timestep_probs, n, replacement=True)

    def loss(self, model: Callable, x0: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean training loss for clean images ``x0`` in [-1, 1]; computed in float32 even under autocast."""
        n = x0.shape[0]
        t = self.draw_timesteps(n, x0.device)
        noise = torch.randn_like(x0)
        if self.immiscible:
            noise = noise[immiscible_order(x0, noise)]
        xt = self.scheduler.add_noise(x0, noise, t)
        pred = model(xt, t, class_labels).sample  # (N, C or 2C, H, W)
        pred = pred[:, : x0.shape[1]]  # a learned-variance model's extra channels are not part of this loss
        err = F.mse_loss(pred.float(), self.target(x0, noise, t).float(), reduction="none").mean((1, 2, 3))  # (N,)
        weight = self.loss_weight(t)
        return (err * weight).mean() if weight is not None else err.mean()

    def denoise_step(
        self, model: Callable, scheduler: SchedulerMixin, x: torch.Tensor, t: torch.Tensor, step_kwargs: dict,
        guidance: Guidance | None = None,
    ) -> torch.Tensor:
        """One step of ``scheduler`` from ``x`` at timestep ``t`` to the next (less noisy) level: the model's
        prediction (for ``guidance``'s labels, guided as it says), then ``scheduler.step``.
        The loop of ``sample``; editing (resdiff.editing) runs it from its own starting points."""
        out = (guidance or Guidance()).predict(model, scheduler.scale_model_input(x, t), t)
        return scheduler.step(out[:, : x.shape[1]].float(), t, x, **step_kwargs).prev_sample

    @torch.inference_mode()  # cheaper than no_grad: no version counters or view tracking
    def sample(
        self,
        model: Callable,
        noise: torch.Tensor,
        *,
        sampler: str = "ddim",
        steps: int | None = None,
        generators: Sequence[torch.Generator] | None = None,
        guidance: Guidance | None = None,
        eta: float = 0.0,
        progress: Callable | None = None,
    ) -> torch.Tensor:
        """Denoise ``noise`` (N, C, H, W) into images in [-1, 1] with sampler ``sampler`` (see SAMPLERS) in ``steps``
        steps (None: the sampler's own count), over this diffusion's noise schedule.

        ``generators`` (one per image) draw any per-step noise, so an image does not depend on its batch.
        ``eta`` is DDIM's (0: deterministic). ``guidance``: the class labels, and classifier-free guidance.
        """
        scheduler, default_steps = make_sampler(sampler, self.scheduler.config)  # fresh: schedulers keep per-run state
        scheduler.set_timesteps(steps or default_steps, device=noise.device)
        x = noise * scheduler.init_noise_sigma
        guidance = guidance or Guidance()
        if guidance.guided and guidance.null_label is None:
            raise ValueError("classifier-free guidance needs the model's null label")
        step_kwargs = sampler_step_kwargs(scheduler, generators, eta)
        timesteps = scheduler.timesteps
        for t in progress(timesteps) if progress else timesteps:
            x = self.denoise_step(model, scheduler, x, t, step_kwargs, guidance)
        return self.finished(x)

    def finished(self, x: torch.Tensor) -> torch.Tensor:
        """A finished sample: images clamped to [-1, 1]; a latent model's latents as they are (``clip_sample`` off)."""
        return x.clamp(-1, 1) if self.scheduler.config.get("clip_sample", True) else x


def sampler_step_kwargs(
    scheduler: SchedulerMixin, generators: Sequence[torch.Generator] | None = None, eta: float = 0.0
) -> dict:
    """The keyword arguments of ``scheduler.step``: DDIM's ``eta``, and the per-image generators of any
    scheduler that draws noise in its step."""
    kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if generators is not None and "generator" in _step_params(scheduler):
        kwargs["generator"] = list(generators)
    return kwargs


def _step_params(scheduler: SchedulerMixin) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)
