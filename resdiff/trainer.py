"""The accelerate training loop: data, optimisation, EMA, logs, checkpoints, previews and export.

One Trainer serves one CPU, many GPUs and many machines: accelerate supplies the process group,
DDP, autocast and gradient accumulation; everything else is explicit here. The run directory:

    RUN/config.yaml      the resolved config          RUN/log.jsonl   one JSON line per logged step
    RUN/samples/         preview grids by step        RUN/model/      the EMA model, a DDPMPipeline folder
    RUN/checkpoints/     resumable state (see resdiff.checkpoint)
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMPipeline
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, step_of
from .config import Config, config_diff, load_config, save_config
from .data import ImageFolder, to_model_range, write_demo_folder
from .diffusion import DDPM
from .errors import TrainingError, UsageError
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


def _fsync_tree(root: Path) -> None:
    """Flush every file below ``root`` and the folders themselves to disk."""
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Batches:
    """Deterministic, resumable, sharded batches: epoch e is a permutation seeded by (seed, e), cut into
    global micro-batches of which each process takes its own slice. Position = (epoch, micro-batch)."""

    def __init__(self, dataset: ImageFolder, per_process: int, rank: int, world: int, seed: int, loader_kwargs: dict):
        self.dataset, self.per_process, self.rank, self.world, self.seed = dataset, per_process, rank, world, seed
        self.loader_kwargs = loader_kwargs
        self.epoch, self.index = 0, 0
        self.per_epoch = len(dataset) // (per_process * world)
        if self.per_epoch == 0:
            raise UsageError(
                f"the dataset has {len(dataset)} images, fewer than one batch of {per_process * world} "
                f"({per_process} per process x {world} processes); add images or lower --batch-size"
            )

    def _generator(self) -> torch.Generator:
        """This epoch's generator. DataLoader draws worker seeds from it, not from the global RNG."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def _epoch_batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.dataset), generator=self._generator())
        order = order[: self.per_epoch * self.per_process * self.world].view(self.per_epoch, self.world, self.per_process)
        return order[:, self.rank].tolist()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            batches = self._epoch_batches()[self.index :]
            for images, labels in DataLoader(self.dataset, batch_sampler=batches, generator=self._generator(), **self.loader_kwargs):
                self.index += 1
                yield images, labels
            self.epoch, self.index = self.epoch + 1, 0


class Trainer:
    """Trains a DDPM as a Config describes, writing everything to the run directory."""

    def __init__(self, cfg: Config, *, resume: str = "auto", echo: Callable[[str], None] = print):
        self.cfg, self.echo = cfg, echo
        if not cfg.out:
            raise UsageError("no run directory: pass --out DIR (or set out: in the config)")
        self.run_dir = Path(cfg.out)
        t = cfg.train
        self.accelerator = Accelerator(
            mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            cpu=not torch.cuda.is_available(),  # without it, torchrun on a GPU-less machine gives worlds of size 1
            log_with=list(t.trackers) or None, project_dir=str(self.run_dir),
        )
        acc = self.accelerator
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        if t.batch_size % (self.world * t.grad_accum):
            raise UsageError(
                f"train.batch_size {t.batch_size} does not divide into {self.world} processes x {t.grad_accum} "
                f"accumulation steps; use a multiple of {self.world * t.grad_accum}"
            )
        self.micro_batch = t.batch_size // (self.world * t.grad_accum)
        self.resume_from = self._find_resume(resume)
        self._check_run_dir()

        self.dataset = self._load_data()
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
        opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, **_fast_adamw())
        self.lr_schedule = get_constant_schedule_with_warmup(opt, t.warmup_steps)
        self.model, self.optimizer = acc.prepare(unet, opt)
        self.ema.to(acc.device)
        self.ema_unet.to(acc.device)
        self.step = 0
        self.batches = _Batches(
            self.dataset, self.micro_batch, self.rank, self.world, t.seed,
            dict(num_workers=cfg.data.num_workers, pin_memory=acc.device.type == "cuda",
                 persistent_workers=False, prefetch_factor=4 if cfg.data.num_workers else None),
        )
        set_seed(t.seed + 1, device_specific=True)  # from here on each process draws its own noise
        if self.resume_from:
            self._load_checkpoint(self.resume_from)
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------------------------- set-up
    def _find_resume(self, resume: str) -> Path | None:
        if resume in ("auto", ""):
            return latest_checkpoint(self.run_dir)
        if resume in ("never", "no", "none"):
            if list_checkpoints(self.run_dir):
                raise UsageError(f"{self.run_dir} already has checkpoints; resume with --resume auto or choose a new --out")
            return None
        path = Path(resume)
        try:
            step_of(path)
        except ValueError:
            raise UsageError(f"--resume {resume}: not a checkpoint folder (expected .../checkpoints/step-NNNNNNN)") from None
        if not (path / "state.json").is_file():
            raise UsageError(f"--resume {resume}: no such complete checkpoint")
        return path

    def _check_run_dir(self) -> None:
        """Refuse a resume whose config changes the model's shape; record the resolved config."""
        saved = self.run_dir / "config.yaml"
        if self.resume_from and saved.is_file():
            old = load_config(saved)
            diffs = config_diff(old, self.cfg, "model")
            for key in ("image_size", "channels", "class_cond"):
                a, b = getattr(old.data, key), getattr(self.cfg.data, key)
                if a != b:
                    diffs.append(f"data.{key}: {a} -> {b}")
            if diffs:
                raise UsageError(
                    f"cannot resume {self.run_dir}: the config changes the model ({'; '.join(diffs)}); "
                    f"use the original settings or a new --out"
                )
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, saved)
            except OSError as err:
                raise UsageError(f"cannot write to run directory {self.run_dir}: {err.strerror}") from None
        self.accelerator.wait_for_everyone()

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
        return "\n".join([
            f"resdiff: training a DDPM, {params / 1e6:.2f}M parameters ({c.model.get('preset', 'custom')})",
            f"  data:      {data}: {len(self.dataset)} images{f', {skipped} skipped' if skipped else ''}{classes}",
            f"  images:    {c.data.image_size}x{c.data.image_size}, {c.data.channels} channel(s)",
            f"  batch:     {t.batch_size} global = {self.micro_batch} per process x {self.world} process(es) x {t.grad_accum} accumulation",
            f"  world:     {self.world} process(es), device {self.accelerator.device}, precision {t.mixed_precision}",
            f"  steps:     {self.step} -> {t.steps}, lr {t.lr:g}, EMA {t.ema_decay}",
            f"  run dir:   {self.run_dir} ({resumed})",
        ])

    # ------------------------------------------------------------------------------- training
    def fit(self) -> Path:
        """Train up to ``train.steps`` total steps; returns the exported pipeline folder."""
        previous = self._install_signal_handlers()
        try:
            return self._train()
        finally:  # a library call must not leave its handlers behind (a notebook's next Ctrl-C would be swallowed)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
        bar.close()
        acc.end_training()
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
        if self.is_main:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

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
        if self.is_main:
            ordered = torch.stack([gathered[i % self.world, i // self.world] for i in range(n)])
            (self.run_dir / "samples").mkdir(exist_ok=True)
            make_grid(ordered).save(self.run_dir / "samples" / f"step-{self.step:07d}.png")

    # ---------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write the resumable state under a temporary name, then rename it into place; export the EMA model."""
        acc = self.accelerator
        final = checkpoint_dir(self.run_dir, self.step)
        tmp = final.with_name(f".{final.name}.tmp")
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        if self.is_main:
            save_file(acc.unwrap_model(self.model).state_dict(), tmp / "model.safetensors")
            self.pipeline().save_pretrained(tmp / "ema")
            torch.save({"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}, tmp / "optimizer.pt")
        acc.wait_for_everyone()
        if self.is_main:
            state = {"step": self.step, "epoch": self.batches.epoch, "batch": self.batches.index,
                     "ema_step": self.ema.optimization_step, "world_size": self.world}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._export(final / "ema")
            for old in list_checkpoints(self.run_dir)[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _export(self, source: Path) -> None:
        """Replace RUN/model with a copy of a checkpoint's EMA pipeline, never leaving it half-written."""
        target, tmp = self.run_dir / "model", self.run_dir / ".model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(source, tmp)
        old = self.run_dir / ".model.old"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if state["world_size"] != self.world and self.is_main:
            self.echo(f"note: checkpoint was written by {state['world_size']} process(es), resuming on {self.world}; "
                      f"the data order continues from the same epoch")
        unet = self.accelerator.unwrap_model(self.model)
        unet.load_state_dict(load_file(path / "model.safetensors", device=str(self.accelerator.device)))
        ema = UNet.from_pretrained(path / "ema" / "unet")
        with torch.no_grad():
            for shadow, p in zip(self.ema.shadow_params, ema.parameters()):
                shadow.copy_(p)
        self.ema.optimization_step = state["ema_step"]
        opt = torch.load(path / "optimizer.pt", map_location=self.accelerator.device, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_schedule.load_state_dict(opt["lr_schedule"])
        self.step = state["step"]
        if state["world_size"] == self.world:
            self.batches.epoch, self.batches.index = state["epoch"], state["batch"]
            rng = path / f"rng-{self.rank}.pt"
            if rng.is_file():
                _set_rng_state(torch.load(rng, weights_only=True))
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
