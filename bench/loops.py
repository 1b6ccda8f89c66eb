"""The training loops the benchmarks compare: resdiff's Trainer step, and diffusers' example as one reference loop.

ExampleLoop is the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py: noise, a random
timestep per image, epsilon MSE against DDPMScheduler (linear betas, 1000 steps), backward, clip 1, AdamW (1e-4,
betas 0.95/0.999, weight decay 1e-6), its LR schedule, EMAModel (warm-up: inv_gamma 1, power 3/4, up to 0.9999). A
benchmark that needs another optimizer setting, EMA, schedule, loss or precision passes it and keeps the rest.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

OPTIMIZER = dict(lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
EMA = dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
CLIP = 1.0


class ExampleLoop:
    """diffusers' example step on ``model`` (a UNet2DModel, or any model whose output has ``.sample``).

    ``accelerator``: whose device and precision (autocast, gradient scaling) the step uses (default: fp32 on CUDA
    where there is one); ``lr_schedule``: optimizer -> LR scheduler (default: none); ``loss``: (model, clean images
    in [-1, 1]) -> loss (default: the example's epsilon MSE)."""

    def __init__(self, model: torch.nn.Module, accelerator=None, *, optimizer: dict = OPTIMIZER, ema: dict = EMA,
                 lr_schedule: Callable | None = None, loss: Callable | None = None):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.acc = accelerator or Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
        self.model = model.to(self.acc.device).train()
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
        self.loss = loss or self.epsilon_loss
        adamw = torch.optim.AdamW(self.model.parameters(), **optimizer)
        self.lr_scheduler = lr_schedule(adamw) if lr_schedule else None
        self.optimizer = self.acc.prepare_optimizer(adamw)  # as the example: with fp16 the grad scaler unscales it
        self.ema = EMAModel(self.model.parameters(), **ema)
        self._averaged: torch.nn.Module | None = None

    def epsilon_loss(self, model: torch.nn.Module, clean: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(clean.shape, device=clean.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(clean),), device=clean.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, t)
        return F.mse_loss(model(noisy, t).sample.float(), noise.float())

    def step(self, clean: torch.Tensor) -> torch.Tensor:
        """One step on a batch of clean images in [-1, 1]: loss, backward, clip, optimizer, LR, EMA."""
        with self.acc.autocast():
            loss = self.loss(self.model, clean)
        self.acc.backward(loss)
        self.acc.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema.step(self.model.parameters())
        return loss

    def ema_model(self) -> torch.nn.Module:
        """A copy of the model holding the EMA weights now (the one sampled)."""
        if self._averaged is None:
            self._averaged = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ema.copy_to(self._averaged.parameters())
        return self._averaged

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                **({"lr_scheduler": self.lr_scheduler.state_dict()} if self.lr_scheduler else {})}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])


# ------------------------------------------------------------- the speed benchmarks' two steps, one architecture


def make_trainer(preset: str, precision: str, batch: int, workdir: str, dropout: float | None = None,
                 extra: tuple[str, ...] = (), demo_images: int = 256):
    """resdiff's Trainer at ``preset`` (its own sample size: 256 for ddpm-celebahq-256, else 32), nothing logged."""
    from resdiff.build import build_trainer
    from resdiff.config import load_config

    overrides = [f"model.preset={preset}", f"train.batch_size={batch}", f"train.mixed_precision={precision}",
                 f"data.demo_images={demo_images}", "data.num_workers=0", f"out={workdir}/run{len(extra)}",
                 f"data.image_size={256 if preset == 'ddpm-celebahq-256' else 32}", *extra]
    if dropout is not None:
        overrides.append(f"model.dropout={dropout}")
    return build_trainer(load_config(None, overrides), resume="never", echo=lambda _m: None)


def resdiff_step(trainer, batch: int) -> Callable[[], object]:
    """The Trainer's own step (Trainer.train_step) on one random uint8 batch."""
    config = trainer.ema.model.config
    images = torch.randint(0, 256, (batch, config.in_channels, config.sample_size, config.sample_size), dtype=torch.uint8)
    labels = torch.zeros(batch, dtype=torch.long)
    return lambda: trainer.train_step(images, labels)


def diffusers_step(trainer, batch: int) -> tuple[torch.nn.Module, Callable[[], object]]:
    """(diffusers' UNet2DModel of the trainer's architecture, its ExampleLoop step on one random batch), with the
    trainer's accelerator: its device and precision."""
    from resdiff.convert import to_diffusers

    acc = trainer.accelerator
    loop = ExampleLoop(to_diffusers(acc.unwrap_model(trainer.model)), acc)
    config = trainer.ema.model.config
    clean = torch.rand(batch, config.in_channels, config.sample_size, config.sample_size, device=acc.device) * 2 - 1
    return loop.model, lambda: loop.step(clean)
