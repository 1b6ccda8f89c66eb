"""The training loop: it receives a model, a GaussianDiffusion, batches, an accelerator and a run directory,
and trains.

Like improved-diffusion's ``TrainLoop``, the loop is handed its parts, so another model or dataset needs
no change here; ``resdiff.build.build_trainer`` makes the parts a Config describes. accelerate supplies the
process group, DDP, autocast and gradient accumulation; the step itself (noise, loss, backward, clipping,
optimizer, schedule, EMA) is spelled out in ``train_step``. What is written where is ``resdiff.rundir``'s
business: the trainer asks it to save and load state and never names a file.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable

import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline
from diffusers.optimization import get_constant_schedule_with_warmup
from tqdm.auto import tqdm

from .config import TrainConfig
from .data import to_model_range
from .diffusion import GaussianDiffusion
from .ema import EMA
from .errors import TrainingError, UsageError, one_line
from .features import Stopped
from .hardware import reuse_freed_memory
from .processes import gather_shares, on_main, share
from .checkpoint import TrainState
from .rundir import RunDir

__all__ = ["Trainer"]


class Trainer:
    """Trains ``model`` with the ``diffusion``'s objective on ``batches`` (an endless iterable of uint8
    (N, C, H, W) images and labels), for ``settings.steps`` optimizer steps, writing logs, previews and checkpoints to ``run``.

    ``batches`` yields this process's micro-batches; if it has ``position`` and ``seek(epoch, index)``
    (``resdiff.data.ShardedBatches``), checkpoints record where it is and a resumed run continues there.
    A class-conditional model (``model.config.num_classes``) gets its labels, dropped to the null class with
    the diffusion's ``label_dropout`` for classifier-free guidance. ``about`` is printed when training starts;
    ``hparams`` go to the experiment trackers (default: ``settings``). ``evaluator(ema_model, scheduler_config)``
    (e.g. ``resdiff.quality.TrainingEvaluator``) scores the EMA model every ``evaluator.every`` steps and at
    the end; its figures go to the log, the trackers and the progress bar. On a CPU it makes this process's
    malloc keep freed memory for the next step (``hardware.reuse_freed_memory``: no page faults for what each step
    allocates again).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion: GaussianDiffusion,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        accelerator: Accelerator,
        run: RunDir,
        settings: TrainConfig,
        about: str = "",
        hparams: dict | None = None,
        evaluator: Callable[[torch.nn.Module, dict], dict[str, float]] | None = None,
        echo: Callable[[str], None] = print,
    ):
        t = settings
        self.diffusion, self.batches, self.accelerator, self.run, self.settings = diffusion, batches, accelerator, run, t
        self.about, self.echo, self.evaluator = about, echo, evaluator
        self.hparams = hparams or {f"train.{k}": v for k, v in vars(t).items()}
        acc = accelerator
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        if acc.device.type == "cpu":
            reuse_freed_memory()  # no page faults re-allocating each step's activations
        self.null_label = getattr(model.config, "num_classes", None) or None
        self.ema = EMA(model, t.ema_decay, warmup=t.ema_warmup,  # before any layout change or compile
                       sigma_rel=t.ema_sigma_rel).to(acc.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if t.compile:
            model.compile_blocks()
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                                      **_fast_adamw())
        self.lr_schedule = get_constant_schedule_with_warmup(optimizer, t.warmup_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step = 0
        self.train_seconds = 0.0  # wall time in training steps since step 0 (previews, checkpoints, evaluations apart)
        self.eval_seconds = 0.0  # wall time in evaluations since step 0 (what eval_every auto bounds)
        self.resumed_from: Path | None = None  # the checkpoint ``resume`` loaded
        self._stop_signal: int | None = None
        # Processes agree on a signal every step (so a preempted run checkpoints within one step), with a CPU
        # all-reduce: on a GPU backend it goes through a gloo side group, so the vote never waits for the GPU.
        self._votes = None
        if self.world > 1 and torch.distributed.get_backend() != "gloo":
            self._votes = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=t.timeout_s))

    # ------------------------------------------------------------------------------- training
    def fit(self) -> Path:
        """Train up to ``settings.steps`` total steps; returns the exported pipeline folder.

        The run directory stays locked while it runs and is released when it ends, however it ends."""
        if self.is_main:
            self.run.open()  # the lock again, if an earlier fit() released it
        previous = self._install_signal_handlers()
        ok = False
        try:
            self._train()
            ok = True
            return self.run.model_dir
        except RuntimeError as err:
            if self.world > 1 and _lost_contact(err):
                raise TrainingError(
                    f"process {self.rank} lost contact with the others at step {self.step + 1} ({_why_lost(err)}): "
                    f"another process died, or did not answer within train.timeout_s={self.settings.timeout_s:g} s; "
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

    def close(self) -> None:
        """Release the run directory's lock (fit() does this when it ends; also done at exit)."""
        self.run.lock.release()

    def _train(self) -> None:
        """The loop: steps, then on their boundaries the log, previews and checkpoints; a signal stops it cleanly."""
        acc, t = self.accelerator, self.settings
        if self.is_main and self.about:
            self.echo(self.about)
        if t.trackers:
            acc.init_trackers("resdiff", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                 for k, v in self.hparams.items()})
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True, desc="train")
        loss_sum, loss_count, shown = torch.zeros((), device=acc.device), 0, {}
        last_time, last_step = time.perf_counter(), self.step
        data = iter(self.batches)
        self.model.train()
        try:  # the bar is closed before any error is reported, so the error line comes last
            while self.step < t.steps:
                for _ in range(t.grad_accum):  # micro-batches; the optimizer steps on the last (see train_step)
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
                    stop = stop or self._poll_stop()  # signalled during the write: the step is saved, stop now
                if not stop and (self.step % t.preview_every == 0 or final):
                    self.preview()
                if not stop and self.evaluator is not None and (self.step % self.evaluator.every == 0 or final):
                    try:
                        figures = self.evaluate()
                    except Stopped:  # a signal during the evaluation: the checkpoint of this step is written
                        stop, figures = True, {}
                        if self.is_main:
                            self.echo(f"signal {self._stop_signal}: the evaluation of step {self.step} stopped")
                    shown.update({k: f"{v:.4g}" for k, v in figures.items() if not k.startswith("kid_std")})
                    bar.set_postfix(shown)
                if self.step % t.log_every == 0 or checkpoint:
                    last_time = time.perf_counter()  # previews, evaluations and checkpoints do not count against images/s
                if stop:
                    break
        finally:
            bar.close()
        if self.is_main:
            if self.step < t.steps:
                self.echo(f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved, resume with the same command")
            else:
                self.echo(f"done: {self.step} steps; model in {self.run.model_dir}, previews in {self.run.samples_dir}")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: noise, forward, backward; on the last micro-batch of a step also clip, step the
        optimizer and the LR schedule, and update the EMA.

        ``images`` are uint8 (N, C, H, W), ``labels`` (N,). Returns the detached loss (no host sync)."""
        acc, t = self.accelerator, self.settings
        x0 = to_model_range(images.to(acc.device, non_blocking=True))  # (N, C, H, W) in [-1, 1]
        if t.channels_last:
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
            if acc.sync_gradients and t.grad_clip:
                acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
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
        if self.settings.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "time"}, step=self.step)
        self._on_main(lambda: self.run.append_log(record), "the training log")

    def evaluate(self) -> dict[str, float]:
        """The evaluator's figures of the EMA model now (every process takes part), logged on their own line with
        the samples it took and its seconds, or the reason it took fewer or none (``TrainingEvaluator.plan``).
        Raises ``resdiff.features.Stopped`` when a signal arrives during it."""
        result = self.evaluator(self.ema.model, dict(self.diffusion.scheduler.config), step=self.step,
                                train_seconds=self.train_seconds, eval_seconds=self.eval_seconds,
                                should_stop=self._poll_stop)
        self.eval_seconds += result.seconds
        if result.note and self.is_main:
            self.echo(f"step {self.step}: evaluation {result.note}")
        figures = {k: round(v, 6) for k, v in result.figures.items()}
        record = {"step": self.step, **figures, "eval_images": result.images, "eval_s": round(result.seconds, 2),
                  **({"eval_note": result.note} if result.note else {}), "time": round(time.time(), 3)}
        if self.settings.trackers and figures:
            self.accelerator.log(figures, step=self.step)
        self._on_main(lambda: self.run.append_log(record), "the training log")
        return result.figures

    def pipeline(self) -> DDPMPipeline:
        """The EMA model with the training noise schedule, as a diffusers pipeline."""
        return DDPMPipeline(unet=self.ema.model, scheduler=self.diffusion.scheduler)

    def preview(self) -> None:
        """A grid of EMA samples; every process draws its share of the images, the main process writes the grid."""
        from .images import make_grid
        from .sampling import SamplingSettings, generate

        t = self.settings
        n = t.preview_images
        mine = share(n, self.rank, self.world)
        settings = SamplingSettings(sampler=t.preview_sampler, steps=t.preview_steps, seed=t.seed,
                                    batch_size=max(len(mine), 1), mixed_precision=t.mixed_precision,
                                    device=self.accelerator.device)
        images = generate(self.ema.model, n, settings, indices=mine, progress=False,
                          scheduler_config=dict(self.diffusion.scheduler.config))
        ordered = gather_shares(images, n)  # (n, C, H, W) in image order
        self._on_main(lambda: self.run.save_preview(self.step, lambda tmp: make_grid(ordered).save(tmp, format="PNG")),
                      f"the preview of step {self.step}")

    def _on_main(self, write: Callable[[], object], what: str) -> None:
        """Run a write only the main process does. If it fails, every process stops with a one-line error (the
        main one with its cause, the others pointing to it), instead of the others dying in their next collective
        with a traceback."""
        on_main(write, errors=(TrainingError,), share_result=False,
                elsewhere=f"stopped at step {self.step}: the main process could not write {what} (its error says why)")

    def all_ok(self, ok: bool) -> bool:
        """Whether every process's ``ok`` is True (one all-reduce when there are several)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.accelerator.device)
        return not bool(self.accelerator.reduce(flag, reduction="sum").item())

    # ---------------------------------------------------------------------------- checkpoints
    def state(self) -> TrainState:
        """Everything a resumed run needs, besides the EMA model."""
        position = getattr(self.batches, "position", (0, 0))
        scaler = self.accelerator.scaler  # fp16's loss scale and its growth counter (None in fp32 and bf16)
        return TrainState(
            step=self.step, epoch=position[0], batch=position[1], ema_updates=self.ema.updates, world_size=self.world,
            model=self.accelerator.unwrap_model(self.model).state_dict(), optimizer=self.optimizer.state_dict(),
            lr_schedule=self.lr_schedule.state_dict(), rng=_rng_state(),
            scaler=scaler.state_dict() if scaler is not None else None, micro_batch=self._micro_batch(),
            train_seconds=self.train_seconds, eval_seconds=self.eval_seconds,
        )

    def _micro_batch(self) -> int:
        """The images one micro-batch of all processes together takes (the unit of the data position)."""
        return self.settings.batch_size // self.settings.grad_accum

    def save_checkpoint(self) -> Path:
        """Checkpoint this step (every process takes part) and export the EMA model; see ``RunDir.save_checkpoint``."""
        return self.run.save_checkpoint(
            self.state(), self.pipeline(), rank=self.rank, agree=self.all_ok, keep=self.settings.keep_checkpoints,
        )

    def resume(self, candidates: list[Path], *, fallback: bool) -> Path | None:
        """Load the first checkpoint of ``candidates`` (newest first) that every process can read; returns it.
        A damaged one is skipped with a warning when ``fallback`` (--resume auto), else it is an error."""
        failures = []
        for path in candidates:
            try:
                loaded, error = self.run.load_checkpoint(path, rank=self.rank, world=self.world, device=self.accelerator.device), None
            except Exception as err:  # any damage in any file: truncated, corrupt, unpicklable, wrong keys
                loaded, error = None, err
            if self.all_ok(error is None):
                self.load_state(path, *loaded)
                self.resumed_from = path
                return path
            reason = one_line(error) if error is not None else "unreadable on another process"
            failures.append(f"{path.name}: {reason}")
            if not fallback:
                break
            if self.is_main and path != candidates[-1]:
                self.echo(f"warning: cannot load checkpoint {path} ({reason}); falling back to the one before it")
        if failures:
            raise UsageError(
                f"cannot resume {self.run}: no checkpoint loads ({'; '.join(failures)}); move the damaged "
                f"checkpoint folders away to start over, or choose a new --out"
            )
        return None

    def load_state(self, path: Path, state: TrainState, ema: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint read by ``RunDir.load_checkpoint``."""
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
        self.step = state.step
        self.train_seconds, self.eval_seconds = state.train_seconds, state.eval_seconds
        seek = getattr(self.batches, "seek", None)
        if seek is not None:
            seek(*self._position_after(state))
        if state.world_size == self.world and state.rng is not None:
            _set_rng_state(state.rng)
        else:  # each process's randomness was saved for another number of processes: draw it afresh
            from accelerate.utils import set_seed

            set_seed(self.settings.seed + 1_000_003 * (self.step + 1), device_specific=True)

    def _position_after(self, state: TrainState) -> tuple[int, int]:
        """Where the data continues after ``state``. An epoch's order does not depend on the number of processes
        (each takes its slice of every global micro-batch), so with the same images per micro-batch (the same
        global batch and accumulation) the run continues at the same place on any number of processes; with
        another micro-batch it continues at the image it reached, when a whole number of micro-batches gets
        there, else at the next epoch."""
        micro, old = self._micro_batch(), state.micro_batch or (self._micro_batch() if state.world_size == self.world else 0)
        done = state.batch * old  # images of the epoch already trained on
        same = old and done % micro == 0
        if state.world_size != self.world and self.is_main:
            where = "the same place in the data" if same else "the next epoch"
            self.echo(f"note: checkpoint was written by {state.world_size} process(es), resuming on {self.world}; "
                      f"training continues at {where}, with fresh random noise")
        return (state.epoch, done // micro) if same else (state.epoch + 1, 0)

    # --------------------------------------------------------------------------- ending
    def _end_distributed(self) -> None:
        """Tear down DDP and the process group in the one order that cannot deadlock.

        accelerate's ``end_training`` destroys the process group while the DDP wrapper still holds it, which
        leaves DDP's C++ ``Reducer`` as the group's last owner. The Reducer is freed with the GIL held (its
        Python binding keeps it), so ``~ProcessGroupGloo`` then joins gloo's worker threads while holding the
        GIL. A worker that has just finished the last collective is still dropping that work object, whose
        tensors have Python wrappers: to free them it waits for the GIL, and the join waits for it, so both
        processes can hang after "done" (bench/multiprocess_exit.py counts how often a run ends). So the
        DDP wrapper is dropped first, while torch.distributed still owns the group, and only then is the group
        destroyed: its last reference then goes through torch's binding for process groups, which releases the
        GIL before ``~ProcessGroupGloo`` runs.
        """
        acc = self.accelerator
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model = acc.unwrap_model(self.model)  # the module itself; the DDP wrapper and its Reducer go
            acc.free_memory()  # accelerate's own references to the wrapper, then a garbage collection
        acc.end_training()  # trackers, then the process group (a no-op with one process)

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
        """Whether any process was signalled. All processes must stop at the same step, and soon after the
        signal (a launcher sends SIGKILL ~30 s after SIGTERM), so they vote every step: one all-reduce of a
        CPU integer (microseconds; no GPU sync, see ``__init__``)."""
        if self.world == 1:
            return self._stop_signal is not None
        votes = torch.tensor([int(self._stop_signal is not None)])
        torch.distributed.all_reduce(votes, group=self._votes)  # None: the default group, gloo on CPUs
        return bool(votes.item())


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
