"""The training loop: it receives every part it works with, and trains.

    Trainer(model=UNet, diffusion=GaussianDiffusion, optimizer=AdamW, lr_schedule=..., ema=EMA, batches=..., run=RunDir,
            accelerator=Accelerator, vote=StopVote, previews=Previews, evaluator=TrainingEvaluator, steps=..., ...)

Like improved-diffusion's ``TrainLoop``, the loop is handed its parts (``resdiff.build.build_trainer`` makes the
ones a Config describes), so another model, optimizer, schedule or dataset needs no change here. accelerate
supplies the process group, DDP, autocast and gradient accumulation; the step itself (noise, loss, backward,
clipping, optimizer, schedule, EMA) is spelled out in ``train_step``. The trainer does three jobs: the loop, its
checkpoints, and signals. What is written where is the run directory's business (``resdiff.rundir``): the trainer
asks it to save and load state and never names a file. Previews and evaluations are hooks it calls at their
intervals with the EMA model.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline
from tqdm.auto import tqdm

from .batches import continue_at
from .checkpoint import TrainState
from .data import to_model_range
from .diffusion import GaussianDiffusion
from .ema import EMA
from .errors import TrainingError, UsageError, one_line
from .features import Stopped
from .hardware import reuse_freed_memory
from .processes import StopVote, all_agree, end_training, handle_stop_signals, lost_contact, main_writes
from .layout import LATENT
from .rundir import RunDir

if TYPE_CHECKING:
    from .autoencoder import LatentSpace

__all__ = ["Trainer"]

# A hook called with the EMA model at its interval: ``hook(model, scheduler_config, step)`` (``resdiff.previews``).
Hook = Callable[[torch.nn.Module, dict, int], object]


class Trainer:
    """Trains ``model`` with the ``diffusion``'s objective on ``batches`` (an endless iterable of this process's uint8
    (N, C, H, W) micro-batches and their labels), up to ``steps`` optimizer steps, writing the log and checkpoints to
    ``run``.

    ``optimizer`` holds ``model``'s parameters and ``lr_schedule`` steps once per optimizer step; ``ema`` averages the
    weights after each. ``batch_size`` is the global batch (all processes, all ``grad_accum`` micro-batches): what
    images/s counts. ``batches`` with ``position`` and ``seek(epoch, index)`` (``resdiff.batches.ShardedBatches``)
    lets checkpoints record where the data is, so a resumed run continues there. A class-conditional model
    (``model.config.num_classes``) gets its labels, dropped to the null class with the diffusion's
    ``label_dropout`` for classifier-free guidance. ``vote`` asks every process whether one was signalled (one per
    step). ``previews(model, scheduler_config, step)`` runs every ``previews.every`` steps, ``evaluator`` (e.g.
    ``resdiff.quality.TrainingEvaluator``) every ``evaluator.every`` steps, both at the end too; the evaluator's
    figures go to the log, the trackers (``tracker_config``: the run's settings for them; None: no trackers) and
    the progress bar. ``about`` is printed when training starts. ``seed`` reseeds each process's noise when a
    checkpoint of another number of processes is resumed.
    """

    def __init__(
        self, *, model: torch.nn.Module, diffusion: GaussianDiffusion, optimizer: torch.optim.Optimizer,
        lr_schedule: torch.optim.lr_scheduler.LRScheduler, ema: EMA, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        run: RunDir, accelerator: Accelerator, steps: int, batch_size: int, grad_accum: int = 1,
        grad_clip: float | None = None, log_every: int = 50, checkpoint_every: int = 1000, keep_checkpoints: int = 3,
        channels_last: bool = False, seed: int = 0, vote: Callable[[bool], bool] | None = None,
        previews: Hook | None = None, evaluator: Callable | None = None, tracker_config: dict | None = None,
        latent: LatentSpace | None = None, about: str = "", echo: Callable[[str], None] = print,
    ):
        self.diffusion, self.ema, self.batches, self.run, self.accelerator = diffusion, ema, batches, run, accelerator
        self.steps, self.batch_size, self.grad_accum, self.grad_clip = steps, batch_size, grad_accum, grad_clip
        self.log_every, self.checkpoint_every, self.keep_checkpoints = log_every, checkpoint_every, keep_checkpoints
        self.channels_last, self.seed, self.vote = channels_last, seed, vote or StopVote()
        self.previews, self.evaluator, self.tracker_config = previews, evaluator, tracker_config
        self.about, self.echo, self.lr_schedule, self.latent = about, echo, lr_schedule, latent
        acc = accelerator
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        if acc.device.type == "cpu":
            reuse_freed_memory()  # no page faults re-allocating each step's activations
        self.null_label = getattr(model.config, "num_classes", None) or None
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step = 0
        self.train_seconds = 0.0  # wall time in training steps since step 0 (previews, checkpoints, evaluations apart)
        self.eval_seconds = 0.0  # wall time in evaluations since step 0 (what eval_every auto bounds)
        self.resumed_from: Path | None = None  # the checkpoint ``load_state`` continued from
        self._stop_signal: int | None = None
        self._data: Iterable | None = None

    # ------------------------------------------------------------------------------- training
    def fit(self) -> Path:
        """Train up to ``steps`` total steps with logs, checkpoints, previews and evaluations; returns the exported
        model folder. The run directory stays locked while it runs and is released when it ends, however it ends."""
        if self.is_main:
            self.run.open()  # the lock again, if an earlier fit() released it
        previous = self._install_signal_handlers()
        ok = False
        try:
            self._loop()
            ok = True
            return self.run.model_dir
        except RuntimeError as err:
            lost = lost_contact(err, self.step + 1, getattr(self.vote, "timeout_s", None))
            if lost is not None:
                raise lost from None
            raise
        finally:
            self.close()
            # The DDP wrapper goes first, while torch.distributed still owns the process group (see end_training).
            self.model = self.accelerator.unwrap_model(self.model)
            if ok:
                end_training(self.accelerator)
            else:  # the process is on its way out with an error: a teardown failure must not replace it
                with contextlib.suppress(RuntimeError):
                    end_training(self.accelerator)
            # Handlers go back last: a launcher's SIGTERM to the survivors of a dead process must not kill
            # this one before its error is reported. And a library call must not leave its handlers behind
            # (a notebook's next Ctrl-C would be swallowed).
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """Release the run directory's lock (fit() does this when it ends; also done at exit)."""
        self.run.lock.release()

    def run_steps(self, steps: int) -> torch.Tensor:
        """``steps`` optimizer steps and nothing else (no log, checkpoint, preview or signal check): what ``fit``
        repeats, and what a benchmark drives by its own clock. Returns the mean loss of the last step's
        micro-batches, on the device (no host sync)."""
        if self._data is None:
            self._data = iter(self.batches)
            self.model.train()
        loss = torch.zeros((), device=self.accelerator.device)
        for _ in range(steps):
            loss = sum(self.train_step(*next(self._data)) for _ in range(self.grad_accum)) / self.grad_accum
            self.step += 1
        return loss

    def _loop(self) -> None:
        """The loop: steps, then on their boundaries the log, checkpoints, previews and evaluations; a signal
        stops it at the step it arrived in, checkpoint first."""
        acc = self.accelerator
        if self.is_main and self.about:
            self.echo(self.about)
        if self.tracker_config is not None:
            acc.init_trackers("resdiff", config=self.tracker_config)
        bar = tqdm(total=self.steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True, desc="train")
        loss_sum, loss_count, shown = torch.zeros((), device=acc.device), 0, {}
        last_time, last_step = time.perf_counter(), self.step
        scheduler_config = dict(self.diffusion.scheduler.config)
        try:  # the bar is closed before any error is reported, so the error line comes last
            while self.step < self.steps:
                loss_sum += self.run_steps(1)
                loss_count += 1
                bar.update(1)
                stop = self.vote(self._stop_signal is not None)
                final = self.step == self.steps or stop
                checkpoint = self.step % self.checkpoint_every == 0 or final
                if self.step % self.log_every == 0 or checkpoint:  # never checkpoint a diverged model unchecked
                    rate = (self.step - last_step) * self.batch_size / max(time.perf_counter() - last_time, 1e-9)
                    loss = acc.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()  # the one host sync
                    self.train_seconds += time.perf_counter() - last_time
                    self._check_finite(loss)
                    self.log(loss, rate)
                    shown.update(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
                    bar.set_postfix(shown)
                    loss_sum.zero_()
                    loss_count, last_step = 0, self.step
                if checkpoint:  # first: a preempted run has seconds before SIGKILL, and previews can wait
                    self.save_checkpoint()
                    stop = stop or self.vote(self._stop_signal is not None)  # signalled during the write: stop now
                if not stop and self.previews is not None and (self.step % self.previews.every == 0 or final):
                    self.previews(self.ema.model, scheduler_config, self.step)
                if not stop and self.evaluator is not None and (self.step % self.evaluator.every == 0 or final):
                    try:
                        shown.update({k: f"{v:.4g}" for k, v in self.evaluate().items() if not k.startswith("kid_std")})
                    except Stopped:  # a signal during the evaluation: this step's checkpoint is already written
                        stop = True
                        if self.is_main:
                            self.echo(f"signal {self._stop_signal}: the evaluation of step {self.step} stopped")
                    bar.set_postfix(shown)
                if checkpoint and not stop and self.is_main:  # the exported model's card, now with this step's
                    self.run.describe_model(self.step)       # preview and figures (they come after the checkpoint)
                if self.step % self.log_every == 0 or checkpoint:
                    last_time = time.perf_counter()  # previews, evaluations and checkpoints do not count against images/s
                if stop:
                    break
        finally:
            bar.close()
        if self.is_main:
            if self.step < self.steps:
                self.echo(f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved, resume with the same command")
            else:
                self.echo(f"done: {self.step} steps; model in {self.run.model_dir}, previews in {self.run.samples_dir}")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: noise, forward, backward; on the last micro-batch of a step also clip, step the
        optimizer and the LR schedule, and update the EMA.

        ``images`` are uint8 (N, C, H, W) (a latent model's: raw latents), ``labels`` (N,). Returns the detached loss
        (no host sync)."""
        acc = self.accelerator
        images = images.to(acc.device, non_blocking=True)
        # (N, C, H, W): images in [-1, 1], or normalised latents
        x0 = to_model_range(images) if self.latent is None else self.latent.normalize(images)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        class_labels = None
        if self.null_label is not None:  # classifier-free guidance learns the null class from dropped labels
            class_labels = self.diffusion.drop_labels(labels.to(acc.device), null_label=self.null_label)
        # accumulate() skips DDP's gradient all-reduce and makes optimizer.step() / zero_grad() no-ops on
        # every micro-batch but the last of a step (sync_gradients is True only there).
        with acc.accumulate(self.model):
            with acc.autocast():
                loss = self.diffusion.loss(self.model, x0, class_labels)
            acc.backward(loss)  # the loss divided by grad_accum, so the step sees the mean gradient
            if acc.sync_gradients and self.grad_clip:
                acc.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            self.lr_schedule.step()
            self.ema.update(self.model)
        return loss.detach()

    def _check_finite(self, loss: float) -> None:
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise TrainingError(
                f"loss is {loss} at step {self.step}: training diverged; no checkpoint was written for it. "
                f"Lower train.lr, enable train.grad_clip, or use bf16 instead of fp16, then resume from the last checkpoint"
            )

    # ------------------------------------------------------------------------- outputs
    def log(self, loss: float, rate: float) -> None:
        """One record in the run's log (and the trackers)."""
        record = {
            "step": self.step, "loss": round(loss, 6), "lr": self.lr_schedule.get_last_lr()[0],
            "images_per_s": round(rate, 2), "world_size": self.world, "time": round(time.time(), 3),
        }
        if self.tracker_config is not None:
            self.accelerator.log({k: v for k, v in record.items() if k != "time"}, step=self.step)
        main_writes(lambda: self.run.append_log(record), "the training log", self.step)

    def evaluate(self) -> dict[str, float]:
        """The evaluator's figures of the EMA model now (every process takes part), logged on their own line with
        the samples it took and its seconds, or the reason it took fewer or none (``TrainingEvaluator.plan``).
        Raises ``resdiff.features.Stopped`` when a signal arrives during it."""
        result = self.evaluator(self.ema.model, dict(self.diffusion.scheduler.config), step=self.step,
                                train_seconds=self.train_seconds, eval_seconds=self.eval_seconds,
                                should_stop=lambda: self.vote(self._stop_signal is not None))
        self.eval_seconds += result.seconds
        if result.note and self.is_main:
            self.echo(f"step {self.step}: evaluation {result.note}")
        figures = {k: round(v, 6) for k, v in result.figures.items()}
        record = {"step": self.step, **figures, "eval_images": result.images, "eval_s": round(result.seconds, 2),
                  **({"eval_note": result.note} if result.note else {}), "time": round(time.time(), 3)}
        if self.tracker_config is not None and figures:
            self.accelerator.log(figures, step=self.step)
        main_writes(lambda: self.run.append_log(record), "the training log", self.step)
        return result.figures

    def pipeline(self) -> DDPMPipeline:
        """The EMA model with the training noise schedule, as a diffusers pipeline."""
        return DDPMPipeline(unet=self.ema.model, scheduler=self.diffusion.scheduler)

    # ---------------------------------------------------------------------------- checkpoints
    def state(self) -> TrainState:
        """Everything a resumed run needs, besides the EMA model."""
        position = getattr(self.batches, "position", (0, 0))
        scaler = self.accelerator.scaler  # fp16's loss scale and its growth counter (None in fp32 and bf16)
        return TrainState(
            step=self.step, epoch=position[0], batch=position[1], ema_updates=self.ema.updates, world_size=self.world,
            model=self.accelerator.unwrap_model(self.model).state_dict(), optimizer=self.optimizer.state_dict(),
            lr_schedule=self.lr_schedule.state_dict(), rng=_rng_state(),
            scaler=scaler.state_dict() if scaler is not None else None, micro_batch=self.batch_size // self.grad_accum,
            train_seconds=self.train_seconds, eval_seconds=self.eval_seconds,
        )

    def save_checkpoint(self) -> Path:
        """Checkpoint this step (every process takes part) and export the EMA model; see ``RunDir.save_checkpoint``."""
        return self.run.save_checkpoint(
            self.state(), self.pipeline(), rank=self.rank, agree=self._all_agree, keep=self.keep_checkpoints,
            records={LATENT: self.latent.record()} if self.latent is not None else {},
        )

    def _all_agree(self, ok: bool) -> bool:
        return all_agree(ok, self.accelerator.device)

    def load_state(self, path: Path, state: TrainState, ema: dict[str, torch.Tensor]) -> None:
        """Continue from the checkpoint ``path`` as ``RunDir.resume`` (or ``load_checkpoint``) read it."""
        try:
            self.accelerator.unwrap_model(self.model).load_state_dict(state.model)
            self.ema.load(ema, state.ema_updates)
            self.optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, ValueError, KeyError) as err:
            raise UsageError(
                f"checkpoint {path} does not fit the configured model ({one_line(err, 200)}); "
                f"resume with the settings it was trained with, or choose a new --out"
            ) from None
        self.lr_schedule.load_state_dict(state.lr_schedule)
        if state.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state.scaler)  # fp16 continues at its loss scale
        self.step, self.resumed_from = state.step, path
        self.train_seconds, self.eval_seconds = state.train_seconds, state.eval_seconds
        seek = getattr(self.batches, "seek", None)
        if seek is not None:
            micro = self.batch_size // self.grad_accum
            old = state.micro_batch or (micro if state.world_size == self.world else 0)
            epoch, index = continue_at(state.epoch, state.batch, old, micro)
            seek(epoch, index)
            self._data = None  # the next step iterates from the new position
            if state.world_size != self.world and self.is_main:
                where = "the same place in the data" if epoch == state.epoch else "the next epoch"
                self.echo(f"note: checkpoint was written by {state.world_size} process(es), resuming on {self.world}; "
                          f"training continues at {where}, with fresh random noise")
        if state.world_size == self.world and state.rng is not None:
            _set_rng_state(state.rng)
        else:  # each process's randomness was saved for another number of processes: draw it afresh
            from accelerate.utils import set_seed

            set_seed(self.seed + 1_000_003 * (self.step + 1), device_specific=True)

    # --------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT finish the current step, checkpoint and exit; a second signal exits at once.
        Returns the handlers they replace, for fit() to put back."""

        def handler(signum, _frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main:
                self.echo(f"\nsignal {signum}: finishing step {self.step + 1}, then checkpointing (signal again to quit now)")

        return handle_stop_signals(handler)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
