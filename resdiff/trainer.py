"""The accelerate training loop: data, optimisation, EMA, logs, checkpoints, previews and export.

One Trainer serves one CPU, many GPUs and many machines: accelerate supplies the process group,
DDP, autocast and gradient accumulation; everything else is explicit here. What it writes where is
described in resdiff.rundir (the run directory) and resdiff.checkpoint (the resumable state).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
from diffusers import DDPMPipeline
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import (
    RunLock, checkpoint_dir, checkpoint_problem, complete_checkpoints, list_checkpoints, rotate_checkpoints, step_of,
)
from .config import Config
from .data import ImageFolder, ShardedBatches, loader_workers, to_model_range, write_demo_folder
from .diffusion import DDPM
from .errors import TrainingError, UsageError, one_line
from .hardware import precision_warning
from .rundir import (
    WRITE_ERRORS, check_disk, check_same_model, export_model, fsync_tree, remove_leftovers, trim_log, write_config,
    write_problem,
)
from .unet import UNet

__all__ = ["Trainer", "build_unet", "model_keys", "demo_data_dir"]


def model_keys() -> list[str]:
    """The keys a config's ``model`` section may set: UNet constructor arguments, plus ``preset``."""
    return [p for p in inspect.signature(UNet.__init__).parameters if p != "self"] + ["preset"]


def build_unet(cfg: Config, num_classes: int | None) -> UNet:
    """The UNet a config describes; image size, channels and classes follow the data section."""
    kwargs = dict(cfg.model)
    preset = kwargs.pop("preset", None)
    for key, want in (("sample_size", cfg.data.image_size), ("in_channels", cfg.data.channels)):
        if kwargs.get(key, want) != want:
            raise UsageError(f"model.{key}={kwargs[key]} contradicts data ({want}); remove model.{key}, the data decides it")
        kwargs[key] = want
    kwargs["num_classes"] = num_classes
    try:
        return UNet.from_preset(preset, **kwargs) if preset else UNet(**kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(f"model: {err}") from None


def demo_data_dir(image_size: int, n: int) -> Path:
    """Where the built-in demo dataset is written (RESDIFF_CACHE, default ~/.cache/resdiff)."""
    root = Path(os.environ.get("RESDIFF_CACHE", Path.home() / ".cache" / "resdiff"))
    return root / f"demo-shapes-{image_size}px-{n}"


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
    t, d = cfg.train, cfg.diffusion
    if t.preview_steps > d.num_train_timesteps:
        raise UsageError(
            f"train.preview_steps={t.preview_steps} is more than diffusion.num_train_timesteps={d.num_train_timesteps}; "
            f"use train.preview_steps={d.num_train_timesteps} or fewer"
        )
    return sum(p.numel() for p in unet.parameters())


class Trainer:
    """Trains a DDPM as a Config describes, writing everything to the run directory.

    Construction checks everything it can before it writes anything: the model the config describes
    (built on the meta device, so a huge one costs nothing), the settings that depend on each other, and
    the data. Then the main process takes ``RUN/.lock`` (one run per directory), removes what an
    interrupted run left half-written, picks the newest complete checkpoint, checks that the directory is
    writable and the disk has room for checkpoints, and only then writes ``config.yaml``.
    """

    def __init__(self, cfg: Config, *, resume: str = "auto", echo: Callable[[str], None] = print):
        self.cfg, self.echo = cfg, echo
        if not cfg.out:
            raise UsageError("no run directory: pass --out DIR (or set out: in the config)")
        self.run_dir = Path(cfg.out)
        t = cfg.train
        self.accelerator = _accelerator(cfg)
        acc = self.accelerator
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        if t.batch_size % (self.world * t.grad_accum):
            raise UsageError(
                f"train.batch_size {t.batch_size} does not divide into {self.world} processes x {t.grad_accum} "
                f"accumulation steps; use a multiple of {self.world * t.grad_accum}"
            )
        self.micro_batch = t.batch_size // (self.world * t.grad_accum)
        self._lock = RunLock(self.run_dir, warn=self.echo) if self.is_main else None
        self._stop_signal: int | None = None
        parameters = _check_model_and_settings(cfg)
        explicit = self._check_resume_argument(resume)
        self.dataset = self._load_data()

        candidates = self._prepare_run_dir(resume, explicit, parameters)  # the first write to the run directory
        try:
            num_classes = len(self.dataset.classes) if cfg.data.class_cond else None
            set_seed(t.seed)  # identical initial weights on every process
            unet = build_unet(cfg, num_classes)
            self.ddpm = DDPM.from_config(**vars(cfg.diffusion))
            self.ema_unet = UNet.from_config(unet.config).eval().requires_grad_(False)
            self.ema = EMAModel(
                unet.parameters(), decay=t.ema_decay, min_decay=0.0 if t.ema_warmup else t.ema_decay, foreach=True,
            )
            if t.channels_last:
                unet = unet.to(memory_format=torch.channels_last)
            if t.compile:
                unet.compile_blocks()
            opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, **_fast_adamw())
            self.lr_schedule = get_constant_schedule_with_warmup(opt, t.warmup_steps)
            self.model, self.optimizer = acc.prepare(unet, opt)
            self.ema.to(acc.device)
            self.ema_unet.to(acc.device)
            self.step = 0
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            self.workers, self.workers_why = loader_workers(cfg.data.num_workers, self.dataset.cached, acc.device, local)
            self.batches = ShardedBatches(
                self.dataset, self.micro_batch, self.rank, self.world, t.seed,
                dict(num_workers=self.workers, pin_memory=acc.device.type == "cuda",
                     persistent_workers=False, prefetch_factor=4 if self.workers else None),
            )
            set_seed(t.seed + 1, device_specific=True)  # from here on each process draws its own noise
            self.resume_from = self._resume(candidates, fallback=explicit is None)
            if self.is_main:
                write_config(self.run_dir, cfg)
                dropped = trim_log(self.run_dir, self.step)
                if dropped:
                    self.echo(f"note: {self.run_dir / 'log.jsonl'}: dropped {dropped} record(s) past step {self.step}, "
                              f"from training that an interruption lost (it is redone now)")
                if self.resume_from and not (self.run_dir / "model" / "model_index.json").is_file():
                    export_model(self.run_dir, self.resume_from / "ema")  # an interrupted export left no model/: redo it
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release ``RUN/.lock`` (fit() does this when it ends; also done at exit and when collected)."""
        if self._lock is not None:
            self._lock.release()

    # ----------------------------------------------------------------------------------- set-up
    def _check_resume_argument(self, resume: str) -> Path | None:
        """Check --resume before anything is written; returns the checkpoint it names, if it names one."""
        if resume in ("auto", ""):
            return None
        if resume in ("never", "no", "none"):
            if list_checkpoints(self.run_dir):
                raise UsageError(f"{self.run_dir} already has checkpoints; resume with --resume auto or choose a new --out")
            return None
        path = Path(resume)
        try:
            step_of(path)
        except ValueError:
            raise UsageError(f"--resume {resume}: not a checkpoint folder (expected .../checkpoints/step-NNNNNNN)") from None
        own = (self.run_dir / "checkpoints").resolve()
        if path.resolve().parent != own:
            # Optimizer and RNG state are torch files; they are read only from this run's own checkpoints.
            raise UsageError(
                f"--resume {resume}: not a checkpoint of this run ({own}); a run resumes only its own checkpoints"
            )
        if not path.exists():
            raise UsageError(f"--resume {resume}: no such checkpoint")
        problem = checkpoint_problem(path)
        if problem:
            raise UsageError(f"--resume {resume}: not a complete checkpoint: {problem}")
        return path

    def _prepare_run_dir(self, resume: str, explicit: Path | None, parameters: int) -> list[Path]:
        """Main process: lock the run directory, clean up after an interrupted run, choose the checkpoints to
        try (newest complete first), refuse a resume that changes the model, check the disk, record the
        config. Every process gets the outcome, so an error stops all of them alike."""
        outcome: tuple[str | None, list[str]] = (None, [])
        if self.is_main:
            try:
                outcome = (None, [str(p) for p in self._prepare_run_dir_main(resume, explicit, parameters)])
            except UsageError as err:
                outcome = (str(err), [])
        if self.world > 1:
            box = [outcome]
            broadcast_object_list(box, from_process=0)
            outcome = box[0]
        error, candidates = outcome
        if error is not None:
            raise UsageError(error)
        return [Path(p) for p in candidates]

    def _prepare_run_dir_main(self, resume: str, explicit: Path | None, parameters: int) -> list[Path]:
        run = self.run_dir
        if run.exists() and not run.is_dir():
            raise UsageError(f"run directory {run} is a file, not a folder; choose another --out")
        existed = run.exists()
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create run directory {run}: {err.strerror}") from None
        try:
            self._lock.acquire()
            removed = remove_leftovers(run)
            if removed:
                self.echo(f"warning: removed what an interrupted run left half-written in {run}: {', '.join(removed)}")
            if explicit is not None:
                candidates = [explicit]
            elif resume in ("never", "no", "none"):
                candidates = []
            else:
                candidates = complete_checkpoints(run, warn=self.echo)[::-1]
                damaged = list_checkpoints(run)
                if damaged and not candidates:
                    raise UsageError(
                        f"{run / 'checkpoints'} holds {len(damaged)} checkpoint folder(s) but none is complete "
                        f"({damaged[-1].name}: {checkpoint_problem(damaged[-1])}); move the damaged folders away "
                        f"to start over, or choose a new --out"
                    )
            if candidates:
                check_same_model(run, self.cfg)
            check_disk(run, parameters)
            if not candidates:  # a resumed run records its config once the checkpoint has loaded
                write_config(run, self.cfg)
            return candidates
        except OSError as err:
            self._undo_prepare(existed)
            raise UsageError(f"cannot write to run directory {run}: {err.strerror or err}") from None
        except BaseException:
            self._undo_prepare(existed)
            raise

    def _undo_prepare(self, existed: bool) -> None:
        """After an error in set-up: release the lock, and remove the run directory if this run made it."""
        self.close()
        if not existed:
            with contextlib.suppress(OSError):
                for leftover in self.run_dir.glob(".config.yaml.tmp"):
                    leftover.unlink()
                self.run_dir.rmdir()  # only if empty

    def _load_data(self) -> ImageFolder:
        d = self.cfg.data
        if d.path is None:
            root = demo_data_dir(d.image_size, d.demo_images)
            if self.is_main:
                write_demo_folder(root, d.demo_images, d.image_size, seed=0)
            self.accelerator.wait_for_everyone()
        else:
            root = Path(d.path)
        warn = self.echo if self.is_main else (lambda _msg: None)
        # Flipping is done per batch in the training loop, from the saved RNG, so a resumed run sees the same flips.
        return ImageFolder(root, d.image_size, d.channels, class_cond=d.class_cond, random_flip=False,
                           random_crop=d.random_crop, cache=d.cache, warn=warn)

    def summary(self) -> str:
        """What is about to happen, in a few lines."""
        c, t = self.cfg, self.cfg.train
        params = sum(p.numel() for p in self.model.parameters())
        skipped = len(self.dataset.skipped)
        data = c.data.path or f"built-in demo shapes ({self.dataset.root})"
        classes = f", {len(self.dataset.classes)} classes" if c.data.class_cond else ""
        resumed = f"resumed from {self.resume_from} (step {self.step})" if self.resume_from else "new run"
        warning = precision_warning(self.accelerator.device, t.mixed_precision)
        return "\n".join([
            f"resdiff: training a DDPM, {params / 1e6:.2f}M parameters ({c.model.get('preset', 'custom')})",
            f"  data:      {data}: {len(self.dataset)} images{f', {skipped} skipped' if skipped else ''}{classes}",
            f"  images:    {c.data.image_size}x{c.data.image_size}, {c.data.channels} channel(s), "
            f"{'cached in memory' if self.dataset.cached else 'decoded per batch'}",
            f"  loader:    {self.workers} worker process(es) ({self.workers_why})",
            f"  batch:     {t.batch_size} global = {self.micro_batch} per process x {self.world} process(es) x {t.grad_accum} accumulation",
            f"  world:     {self.world} process(es), device {self.accelerator.device}, precision {t.mixed_precision}",
            f"  steps:     {self.step} -> {t.steps}, lr {t.lr:g}, EMA {t.ema_decay}",
            f"  run dir:   {self.run_dir} ({resumed})",
            *([warning] if warning else []),
        ])

    # ------------------------------------------------------------------------------- training
    def fit(self) -> Path:
        """Train up to ``train.steps`` total steps; returns the exported pipeline folder.

        The run directory stays locked while it runs and is released when it ends, however it ends."""
        if self._lock is not None:
            self._lock.acquire()  # again, if an earlier fit() released it
        previous = self._install_signal_handlers()
        ok = False
        try:
            path = self._train()
            ok = True
            return path
        except RuntimeError as err:
            if self.world > 1 and _lost_contact(err):
                raise TrainingError(
                    f"process {self.rank} lost contact with the others at step {self.step + 1} ({_why_lost(err)}): "
                    f"another process died, or did not answer within train.timeout_s={self.cfg.train.timeout_s:g} s; "
                    f"see its output above. Resume from the last checkpoint with the same command"
                ) from None
            raise
        finally:
            self.close()
            if ok:
                self._end_distributed()
            else:  # the process is on its way out with an error: a teardown failure must not replace it
                with contextlib.suppress(RuntimeError):
                    self._end_distributed()
            # Handlers go back last: a launcher's SIGTERM to the survivors of a dead process must not kill
            # this one before its error is reported. And a library call must not leave its handlers behind
            # (a notebook's next Ctrl-C would be swallowed).
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _end_distributed(self) -> None:
        """Tear down DDP and the process group in the one order that cannot deadlock.

        accelerate's ``end_training`` destroys the process group while the DDP wrapper still holds it, which
        leaves DDP's C++ ``Reducer`` as the group's last owner. The Reducer is freed with the GIL held (its
        Python binding keeps it), so ``~ProcessGroupGloo`` then joins gloo's worker threads while holding the
        GIL. A worker that has just finished the last collective is still dropping that work object, whose
        tensors have Python wrappers: to free them it waits for the GIL, and the join waits for it. Both
        processes hung after "done" (1 in 10 to 2 in 4 two-process runs here; bench/multiprocess_exit.py). So the DDP wrapper is dropped
        first, while torch.distributed still owns the group, and only then is the group destroyed: its last
        reference then goes through torch's binding for process groups, which releases the GIL before
        ``~ProcessGroupGloo`` runs.
        """
        acc = self.accelerator
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model = acc.unwrap_model(self.model)  # the module itself; the DDP wrapper and its Reducer go
            acc.free_memory()  # accelerate's own references to the wrapper, then a garbage collection
        acc.end_training()  # trackers, then the process group (a no-op with one process)

    def _train(self) -> Path:
        acc, t = self.accelerator, self.cfg.train
        if self.is_main:
            self.echo(self.summary())
        if t.trackers:
            acc.init_trackers("resdiff", config=_flat(self.cfg.to_dict()))
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True, desc="train")
        loss_sum, loss_count = torch.zeros((), device=acc.device), 0
        last_time, last_step = time.perf_counter(), self.step
        data = iter(self.batches)
        self.model.train()
        try:  # the bar is closed before any error is reported, so the error line comes last
            while self.step < t.steps:
                for _ in range(t.grad_accum):
                    images, labels = next(data)
                    loss_sum += self.train_step(images, labels)
                    loss_count += 1
                self.step += 1
                bar.update(1)
                stop = self._poll_stop()
                final = self.step == t.steps or stop
                checkpoint = self.step % t.checkpoint_every == 0 or final
                if self.step % t.log_every == 0 or checkpoint:  # never checkpoint a diverged model unchecked
                    rate = (self.step - last_step) * t.batch_size / max(time.perf_counter() - last_time, 1e-9)
                    loss = acc.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
                    self._check_finite(loss)
                    self._log(loss, rate)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
                    loss_sum.zero_()
                    loss_count, last_step = 0, self.step
                if self.step % t.preview_every == 0 or final:
                    self.preview()
                if checkpoint:
                    self.save_checkpoint()
                if self.step % t.log_every == 0 or checkpoint:
                    last_time = time.perf_counter()  # previews and checkpoints do not count against images/s
                if stop:
                    break
        finally:
            bar.close()
        if self.step < t.steps:
            if self.is_main:
                self.echo(f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved, resume with the same command")
            return self.run_dir / "model"
        if self.is_main:
            self.echo(f"done: {self.step} steps; model in {self.run_dir / 'model'}, previews in {self.run_dir / 'samples'}")
        return self.run_dir / "model"

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: flip, noise, forward, backward; on accumulation boundaries also clip, step, EMA.

        ``images`` are uint8 (N, C, H, W) on the CPU. Returns the detached loss (no host sync).
        """
        acc, t = self.accelerator, self.cfg.train
        if self.cfg.data.random_flip:
            flip = torch.rand(images.shape[0]) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        x0 = to_model_range(images.to(acc.device, non_blocking=True))
        if t.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        class_labels = None
        if self.cfg.data.class_cond:
            class_labels = self.ddpm.drop_labels(labels.to(acc.device), null_label=len(self.dataset.classes))
        with acc.accumulate(self.model):
            with acc.autocast():
                loss = self.ddpm.loss(self.model, x0, class_labels)
            acc.backward(loss)
            if acc.sync_gradients:
                if t.grad_clip:
                    acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            self.lr_schedule.step()
            self.ema.step(self.model.parameters())
        return loss.detach()

    def _check_finite(self, loss: float) -> None:
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise TrainingError(
                f"loss is {loss} at step {self.step}: training diverged; no checkpoint was written for it. "
                f"Lower train.lr, enable train.grad_clip, or use bf16 instead of fp16, then resume from the last checkpoint"
            )

    def _log(self, loss: float, rate: float) -> None:
        record = {
            "step": self.step, "loss": round(loss, 6), "lr": self.lr_schedule.get_last_lr()[0],
            "images_per_s": round(rate, 2), "world_size": self.world, "time": round(time.time(), 3),
        }
        if self.cfg.train.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "time"}, step=self.step)

        def write() -> None:
            try:
                with open(self.run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise TrainingError(
                    f"cannot write {self.run_dir / 'log.jsonl'} at step {self.step} ({write_problem(err)}); "
                    f"free disk space in {self.run_dir} (or fix its permissions), then resume with the same command"
                ) from None

        self._on_main(write, "the training log")

    def _on_main(self, write: Callable[[], None], what: str) -> None:
        """Run a write only the main process does. If it fails, every process stops with a one-line error
        (one small all-reduce), instead of the others dying in their next collective with a traceback."""
        error = None
        if self.is_main:
            try:
                write()
            except TrainingError as err:
                error = err
        if not self._all_ok(error is None):
            raise error or TrainingError(f"stopped at step {self.step}: the main process could not write {what} (its error says why)")

    # -------------------------------------------------------------------------- EMA outputs
    def _ema_model(self) -> UNet:
        self.ema.copy_to(self.ema_unet.parameters())
        return self.ema_unet

    def pipeline(self) -> DDPMPipeline:
        """The EMA model with the training noise schedule, as a diffusers pipeline."""
        return DDPMPipeline(unet=self._ema_model(), scheduler=self.ddpm.scheduler)

    def preview(self) -> None:
        """A grid of EMA samples; every process draws its share of the images, the main process writes the grid."""
        from .sampling import generate, make_grid

        t, acc = self.cfg.train, self.accelerator
        n = t.preview_images
        mine = list(range(self.rank, n, self.world))
        images = generate(
            self._ema_model(), n, sampler=t.preview_sampler, steps=t.preview_steps, seed=t.seed, indices=mine,
            device=acc.device, mixed_precision=t.mixed_precision, progress=False,
            scheduler_config=dict(self.ddpm.scheduler.config), batch_size=max(len(mine), 1),
        )
        per_rank = -(-n // self.world)
        padded = torch.zeros((per_rank, *images.shape[1:]), dtype=torch.uint8)
        padded[: len(mine)] = images
        gathered = acc.gather(padded.to(acc.device)).cpu().view(self.world, per_rank, *images.shape[1:])
        path = self.run_dir / "samples" / f"step-{self.step:07d}.png"

        def write() -> None:
            ordered = torch.stack([gathered[i % self.world, i // self.world] for i in range(n)])
            tmp = path.with_name(f".{path.name}.tmp")
            try:  # under a temporary name first: a grid with its final name is always whole
                path.parent.mkdir(exist_ok=True)
                make_grid(ordered).save(tmp, format="PNG")
                os.replace(tmp, path)
            except OSError as err:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise TrainingError(
                    f"cannot write preview {path} ({write_problem(err)}); free disk space in {self.run_dir}, "
                    f"then resume with the same command"
                ) from None

        self._on_main(write, f"the preview {path.name}")

    # ---------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write the resumable state under a temporary name, fsync it, rename it into place; export the EMA
        model; then drop old checkpoints (see ``rotate_checkpoints``).

        A failed write (disk full, a read-only or vanished folder) removes the temporary folder, leaves every
        earlier checkpoint as it was, and stops training with a TrainingError that names the folder."""
        acc = self.accelerator
        final = checkpoint_dir(self.run_dir, self.step)
        tmp = final.with_name(f".{final.name}.tmp")
        error: BaseException | None = None
        if self.is_main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except WRITE_ERRORS as err:
                error = err
        acc.wait_for_everyone()
        if error is None:
            try:
                torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
                if self.is_main:
                    weights = acc.unwrap_model(self.model).state_dict()  # channels_last weights are strided
                    save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
                    self.pipeline().save_pretrained(tmp / "ema")
                    torch.save({"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()},
                               tmp / "optimizer.pt")
                    state = {"step": self.step, "epoch": self.batches.epoch, "batch": self.batches.index,
                             "ema_step": self.ema.optimization_step, "world_size": self.world}
                    (tmp / "state.json").write_text(json.dumps(state, indent=1))
                    fsync_tree(tmp)
            except WRITE_ERRORS as err:
                error = err
        self._stop_if_save_failed(error, tmp, final, "checkpoint")
        if self.is_main:
            try:
                if final.exists():  # a checkpoint of this step from before an interruption: replace it
                    old = final.with_name(f".{final.name}.old")
                    os.replace(final, old)
                    shutil.rmtree(old)
                os.replace(tmp, final)
                export_model(self.run_dir, final / "ema")
                rotate_checkpoints(final, self.cfg.train.keep_checkpoints)
            except WRITE_ERRORS as err:
                error = err
        self._stop_if_save_failed(error, tmp, final, "model export")
        return final

    def _stop_if_save_failed(self, error: BaseException | None, tmp: Path, final: Path, what: str) -> None:
        """If any process failed (one all-reduce), remove the temporary folder and stop every process."""
        if not self._all_ok(error is None):
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(self._save_failed(final, error, what))

    def _save_failed(self, final: Path, error: BaseException | None, what: str) -> str:
        """The message of a failed checkpoint: what failed, what is still there, what to do."""
        done = [p for p in complete_checkpoints(self.run_dir) if p != final] if self.is_main else []
        kept = f"the last complete checkpoint, {done[-1]}, is intact" if done else "no earlier checkpoint exists"
        if final.is_dir() and checkpoint_problem(final) is None:
            kept = f"the checkpoint {final} itself is complete"
        why = write_problem(error) if error is not None else "it failed on another process"
        where = final.parent if what == "checkpoint" else self.run_dir / "model"
        return (f"cannot write the {what} of step {self.step} in {where} ({why}); {kept}. "
                f"Free disk space there (or fix its permissions), then resume with the same command")

    def _all_ok(self, ok: bool) -> bool:
        """Whether every process succeeded (one all-reduce when there are several)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.accelerator.device)
        return not bool(self.accelerator.reduce(flag, reduction="sum").item())

    # ------------------------------------------------------------------------------- resuming
    def _resume(self, candidates: list[Path], *, fallback: bool) -> Path | None:
        """Load the first checkpoint of ``candidates`` (newest first) that reads; a damaged one is skipped
        with a warning when ``fallback`` (--resume auto), else it is an error."""
        failures = []
        for path in candidates:
            try:
                loaded, error = self._read_checkpoint(path), None
            except Exception as err:  # any damage in any file: truncated, corrupt, unpicklable, wrong keys
                loaded, error = None, err
            if self._all_ok(error is None):
                self._apply_checkpoint(path, loaded)
                return path
            reason = one_line(error) if error is not None else "unreadable on another process"
            failures.append(f"{path.name}: {reason}")
            if not fallback:
                break
            if self.is_main and path != candidates[-1]:
                self.echo(f"warning: cannot load checkpoint {path} ({reason}); falling back to the one before it")
        if failures:
            raise UsageError(
                f"cannot resume {self.run_dir}: no checkpoint loads ({'; '.join(failures)}); move the damaged "
                f"checkpoint folders away to start over, or choose a new --out"
            )
        return None

    def _read_checkpoint(self, path: Path) -> dict:
        """Everything a checkpoint holds, read into memory: weights through safetensors only, optimizer and RNG
        state through torch.load(weights_only=True), which refuses any pickle that is not plain tensors and
        containers. Nothing is applied yet, so a damaged file leaves the trainer untouched."""
        device = self.accelerator.device
        where = "cpu" if device.type == "cpu" else str(device)  # a multi-process CPU run's "cpu:0" is refused by both loaders
        state = json.loads((path / "state.json").read_text())
        model = load_file(path / "model.safetensors", device=where)
        ema = load_file(path / "ema" / "unet" / "diffusion_pytorch_model.safetensors", device=where)
        opt = torch.load(path / "optimizer.pt", map_location=where, weights_only=True)
        rng_file = path / f"rng-{self.rank}.pt"
        rng = None
        if state["world_size"] == self.world and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
        return dict(state=state, model=model, ema=ema, optimizer=opt["optimizer"], lr_schedule=opt["lr_schedule"], rng=rng)

    def _apply_checkpoint(self, path: Path, loaded: dict) -> None:
        state = loaded["state"]
        if state["world_size"] != self.world and self.is_main:
            self.echo(f"note: checkpoint was written by {state['world_size']} process(es), resuming on {self.world}; "
                      f"the data order continues from the same epoch")
        try:
            self.accelerator.unwrap_model(self.model).load_state_dict(loaded["model"])
            self.ema_unet.load_state_dict(loaded["ema"])
            self.optimizer.load_state_dict(loaded["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UsageError(
                f"checkpoint {path} does not fit the configured model ({one_line(err, 200)}); "
                f"resume with the settings it was trained with, or choose a new --out"
            ) from None
        with torch.no_grad():
            for shadow, p in zip(self.ema.shadow_params, self.ema_unet.parameters()):
                shadow.copy_(p)
        self.ema.optimization_step = state["ema_step"]
        self.lr_schedule.load_state_dict(loaded["lr_schedule"])
        self.step = state["step"]
        if state["world_size"] == self.world:
            self.batches.epoch, self.batches.index = state["epoch"], state["batch"]
            if loaded["rng"] is not None:
                _set_rng_state(loaded["rng"])
        else:
            self.batches.epoch, self.batches.index = state["epoch"] + 1, 0
            set_seed(self.cfg.train.seed + 1_000_003 * (self.step + 1), device_specific=True)

    # -------------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT finish the current step, checkpoint and exit; a second signal exits at once.
        Returns the handlers they replace, for fit() to put back."""

        def handler(signum, _frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main:
                self.echo(f"\nsignal {signum}: finishing step {self.step + 1}, then checkpointing (signal again to quit now)")

        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old = signal.signal(sig, handler)
                if old is not None:  # None: a handler not set from Python, which cannot be put back
                    previous[sig] = old
        except ValueError:  # not the main thread (e.g. inside a notebook worker): keep the defaults
            pass
        return previous

    def _poll_stop(self) -> bool:
        """Whether any process was signalled. All processes must stop at the same step, so with several
        processes they agree through one small all-reduce every 10 steps rather than a sync every step."""
        if self.world == 1:
            return self._stop_signal is not None
        if self.step % 10:
            return False
        flag = torch.tensor([0 if self._stop_signal is None else 1], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())


def _lost_contact(err: RuntimeError) -> bool:
    """Whether a RuntimeError is a collective failing because another process died or timed out."""
    text = str(err).lower()
    return isinstance(err, torch.distributed.DistError) or "gloo" in text or "nccl" in text or "timed out" in text


def _why_lost(err: RuntimeError) -> str:
    """The gist of a backend's error: without its source-file prefixes and its boilerplate advice."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", one_line(err, 1000))
    return one_line(text.split(". ")[0].strip(" ."), 120)


def _fast_adamw() -> dict:
    """Fused AdamW where torch supports it (one kernel for all parameters), else the foreach loop."""
    return {"fused": True} if "fused" in inspect.signature(torch.optim.AdamW).parameters else {"foreach": True}


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
