"""The start-up summary of a training run: what is about to happen, in a few lines, printed before the first step."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Config
from .data import ImageFolder
from .hardware import precision_warning, reuse_freed_memory
from .prepare import PreparedImages
from .pretrained import InitSource
from .trainer import Trainer

__all__ = ["summary"]


def summary(
    cfg: Config, trainer: Trainer, dataset: ImageFolder | PreparedImages, workers: int, why: str, resumed: Path | None,
    evaluation: str, source: InitSource | None = None,
) -> str:
    """What is about to happen, in a few lines: the model, the data and how it is read, the batch, the processes,
    the steps, the evaluations and what they cost, the run directory (new, or resumed from where)."""
    t, acc = cfg.train, trainer.accelerator
    params = sum(p.numel() for p in trainer.model.parameters())
    skipped = len(dataset.skipped)
    data = cfg.data.path or f"built-in demo shapes ({dataset.root})"
    classes = f", {len(dataset.classes)} classes" if cfg.data.class_cond else ""
    world, micro = acc.num_processes, t.batch_size // (acc.num_processes * t.grad_accum)
    warning = precision_warning(acc.device, t.mixed_precision)
    hgt, wid = dataset.shape
    mode = "cached in memory" if dataset.cached and isinstance(dataset, ImageFolder) else dataset.mode
    latent = trainer.latent
    return "\n".join([
        f"resdiff: training a DDPM, {params / 1e6:.2f}M parameters ({_layout(cfg, acc.unwrap_model(trainer.model))})",
        f"  data:      {data}: {len(dataset)} images{f', {skipped} skipped' if skipped else ''}{classes}",
        f"  images:    {hgt}x{wid}, {cfg.data.image_channels} channel(s), {mode}",
        *([f"  latents:   {'x'.join(map(str, dataset.item_shape))} of {latent.autoencoder.spec} "
           f"({latent.autoencoder.kind}), normalised by {latent.norm.source}"] if latent is not None else []),
        f"  loader:    {workers} worker process(es) ({why})",
        f"  batch:     {t.batch_size} global = {micro} per process x {world} process(es) x {t.grad_accum} accumulation",
        f"  world:     {world} process(es), device {acc.device}, precision {t.mixed_precision}",
        *([f"  memory:    {_malloc_mode()}"] if acc.device.type == "cpu" else []),
        f"  steps:     {trainer.step} -> {t.steps}, lr {t.lr:g}, EMA {_ema(t)}",
        f"  eval:      {evaluation}",
        f"  run dir:   {cfg.out} ({f'resumed from {resumed} (step {trainer.step})' if resumed else 'new run'})",
        *([f"  init:      {source.path} (weights sha256 {source.sha256[:16]})" + ("" if resumed else
           ": its weights, a fresh optimizer and EMA, step 0")] if source else []),
        *([warning] if warning else []),
    ])


def _layout(cfg: Config, model: torch.nn.Module) -> str:
    """The preset's name; for "auto" also what it chose for this image size (``model`` unwrapped from DDP)."""
    preset = cfg.model.get("preset", "custom")
    c = getattr(model, "config", None)
    if preset != "auto" or c is None:
        return preset
    widths = ", ".join(str(c.channels * m) for m in c.channel_mult)
    attention = ", ".join(map(str, c.attention_resolutions)) or "none"
    return f"auto: widths {widths}, attention at {attention}"


def _ema(t) -> str:
    """The EMA as the summary names it: a fixed decay, or EDM2's power function by its relative width."""
    return f"{t.ema_decay}" if t.ema_sigma_rel is None else f"power function, sigma_rel {t.ema_sigma_rel:g}"


def _malloc_mode() -> str:
    """How this CPU process's malloc treats freed memory (the Trainer has already asked to keep it)."""
    if reuse_freed_memory():
        return "freed blocks kept for the next step (RESDIFF_KEEP_FREED_MEMORY=0 returns them to the OS)"
    why = "RESDIFF_KEEP_FREED_MEMORY=0" if os.environ.get("RESDIFF_KEEP_FREED_MEMORY") == "0" else "not glibc"
    return f"the C library's default ({why}): freed blocks may go back to the OS and fault in again each step"
