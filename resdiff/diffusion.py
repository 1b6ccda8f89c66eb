"""DDPM: the training objective and the sampling loop around diffusers' schedulers.

The noise schedule math is diffusers' (``DDPMScheduler.add_noise``, ``get_velocity``, each
scheduler's ``step``); this module chooses the target, weights the loss and runs the loop.
Like improved-diffusion, the network is passed in, so a DDP-wrapped model works unchanged.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["DDPM", "SAMPLERS", "make_sampler", "sampler_step_kwargs", "image_generators", "image_noise"]

# Samplers by name: the diffusers scheduler, its default step count and fixed settings.
SAMPLERS: dict[str, tuple[type[SchedulerMixin], int, dict]] = {
    "ddpm": (DDPMScheduler, 1000, {}),  # ancestral sampling of Ho et al.
    "ddim": (DDIMScheduler, 50, {}),  # Song et al.; eta=0 is deterministic
    "dpm++": (DPMSolverMultistepScheduler, 20, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # Probability-flow ODE solvers: a ResNet block's residual update is a forward-Euler step of an ODE,
    # and these integrate the diffusion's ODE the same way (Euler) or with a second-order correction (Heun).
    "euler": (EulerDiscreteScheduler, 50, {}),
    "heun": (HeunDiscreteScheduler, 50, {}),
}


def make_sampler(name: str, train_config: dict) -> tuple[SchedulerMixin, int]:
    """A fresh diffusers scheduler for sampler ``name`` sharing the training noise schedule, and its default steps."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, steps, extra = SAMPLERS[name]
    return cls.from_config(dict(train_config), **extra), steps


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, image index): an image's randomness is its own,
    whatever the batch size, the batch it lands in, or the number of processes."""
    states = [np.random.SeedSequence([seed, int(i)]).generate_state(2, dtype=np.uint32) for i in indices]
    return [torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1])) for s in states]


def image_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of ``shape`` for each generator, stacked: (len(generators), *shape), on the CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


class DDPM:
    """Denoising diffusion (Ho et al. 2020) over a diffusers ``DDPMScheduler``.

    ``loss`` is the training objective: noise the data at uniform random timesteps and regress the
    model's prediction onto the target (epsilon, v or x0), optionally min-SNR-gamma weighted
    (Hang et al. 2023). ``sample`` runs any diffusers scheduler from noise to images.
    """

    def __init__(self, scheduler: DDPMScheduler, *, min_snr_gamma: float | None = None, label_dropout: float = 0.0):
        self.scheduler = scheduler
        self.min_snr_gamma = min_snr_gamma
        self.label_dropout = label_dropout
        alphas = scheduler.alphas_cumprod.float()
        self.snr = alphas / (1 - alphas)  # (T,) signal-to-noise ratio of each timestep

    @classmethod
    def from_config(
        cls, num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
        beta_end: float = 0.02, prediction_type: str = "epsilon", min_snr_gamma: float | None = None,
        label_dropout: float = 0.0,
    ) -> "DDPM":
        """Build the scheduler from plain settings (the ``diffusion`` section of a resdiff config)."""
        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
            beta_end=beta_end, prediction_type=prediction_type, clip_sample=True,
        )
        return cls(scheduler, min_snr_gamma=min_snr_gamma, label_dropout=label_dropout)

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

    def loss(self, model: Callable, x0: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean training loss for clean images ``x0`` in [-1, 1]; computed in float32 even under autocast."""
        n = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.scheduler.add_noise(x0, noise, t)
        pred = model(xt, t, class_labels).sample  # (N, C or 2C, H, W)
        pred = pred[:, : x0.shape[1]]  # a learned-variance model's extra channels are not part of this loss
        err = F.mse_loss(pred.float(), self.target(x0, noise, t).float(), reduction="none").mean((1, 2, 3))  # (N,)
        weight = self.loss_weight(t)
        return (err * weight).mean() if weight is not None else err.mean()

    def denoise_step(
        self, model: Callable, scheduler: SchedulerMixin, x: torch.Tensor, t: torch.Tensor, step_kwargs: dict,
        class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0, null_label: int | None = None,
    ) -> torch.Tensor:
        """One step of ``scheduler`` from ``x`` at timestep ``t`` to the next (less noisy) level: the model's
        prediction, guided when ``class_labels`` are given and ``guidance_scale`` != 1, then ``scheduler.step``.
        The loop of ``sample``; editing (resdiff.editing) runs it from its own starting points."""
        inp = scheduler.scale_model_input(x, t)
        if class_labels is not None and guidance_scale != 1.0:
            labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
            cond, uncond = model(torch.cat([inp, inp]), t, labels).sample.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        else:
            out = model(inp, t, class_labels).sample
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
        class_labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        null_label: int | None = None,
        eta: float = 0.0,
        progress: Callable | None = None,
    ) -> torch.Tensor:
        """Denoise ``noise`` (N, C, H, W) into images in [-1, 1] with sampler ``sampler`` (see SAMPLERS) in ``steps``
        steps (None: the sampler's own count), over this DDPM's noise schedule.

        ``generators`` (one per image) draw any per-step noise, so an image does not depend on its batch.
        ``eta`` is DDIM's (0: deterministic). With ``class_labels`` and ``guidance_scale`` != 1, classifier-free guidance mixes the conditional
        and the null-class predictions: uncond + scale * (cond - uncond).
        """
        scheduler, default_steps = make_sampler(sampler, self.scheduler.config)  # fresh: schedulers keep per-run state
        scheduler.set_timesteps(steps or default_steps, device=noise.device)
        x = noise * scheduler.init_noise_sigma
        guided = class_labels is not None and guidance_scale != 1.0
        if guided and null_label is None:
            raise ValueError("classifier-free guidance needs the model's null label")
        step_kwargs = sampler_step_kwargs(scheduler, generators, eta)
        timesteps = scheduler.timesteps
        for t in progress(timesteps) if progress else timesteps:
            x = self.denoise_step(model, scheduler, x, t, step_kwargs, class_labels, guidance_scale, null_label)
        return x.clamp(-1, 1)


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
