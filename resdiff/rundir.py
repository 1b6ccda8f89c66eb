"""The run directory: the one owner of its file layout, its checkpoint format and how it stays whole.

    RUN/config.yaml        the resolved config               RUN/log.jsonl   one JSON line per logged step
    RUN/identity.json      what the run learns from (data, diffusion, batch, seed), checked on resume
    RUN/samples/           preview grids, step-NNNNNNN.png   RUN/model/      the EMA model, a DDPMPipeline folder
    RUN/checkpoints/step-NNNNNNN/   resumable state:
        state.json (step, data position, EMA updates, world size)   model.safetensors (the trained weights)
        optimizer.pt (optimizer, LR schedule, fp16 loss scale)   rng-<rank>.pt (each process's RNG)
        ema/ (a pipeline folder)   SHA256SUMS (digests of all but ema/, which has its own)
    RUN/.lock              names the process that owns the run, which holds a kernel lock on it (``RunLock``)

Every file is written under a temporary name and renamed into place (``resdiff.files``), so an interruption
leaves the old version or the new one, never half of one; ``remove_leftovers`` deletes what an interrupted
run left. A folder with a checkpoint's final name can still be damaged afterwards (a file deleted by hand,
a disk that lost its tail), so nothing trusts the name alone: ``checkpoint_problem`` checks that every part
is there and whole (JSON parses, safetensors headers match the file sizes, torch files are complete zip
archives), and ``complete_checkpoints`` / ``latest_checkpoint`` list only folders that pass.

Content is checked too: each checkpoint and its ``ema/`` folder (so also the exported ``model/``) get
``SHA256SUMS`` when written, and ``load_checkpoint`` refuses a file that no longer matches (the trainer then
falls back to the checkpoint before). ``RUN/identity.json`` records what the run learns from (the data's
location and listing, the data and diffusion settings, batch size and seed); ``identity_changes`` names what a
resume would change, and ``earlier_training`` what a start from step 0 would replace.

``RunDir`` is what the trainer holds: it saves and loads a ``TrainState`` and the EMA pipeline, writes the
log, previews and the exported model, and never lets the trainer name a file. Weights are read through
safetensors only, optimizer and RNG state through ``torch.load(weights_only=True)``, which refuses any
pickle that is not plain tensors and containers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import time
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .config import Config, config_diff, load_config, save_config
from .errors import TrainingError, UsageError
from .files import (
    WRITE_ERRORS, checksum_problem, fsync_tree, human_size, leftovers, replace_folder, temporary, write_atomic,
    write_checksums, write_problem,
)

__all__ = [
    "RunDir", "TrainState", "RunLock", "checkpoint_dir", "step_of", "list_checkpoints", "complete_checkpoints",
    "latest_checkpoint", "checkpoint_problem", "file_problem", "rotate_checkpoints", "remove_leftovers",
    "check_same_model", "check_disk", "checkpoint_bytes", "trim_log", "write_config", "export_model", "PIPELINE_FILES",
    "PIPELINE_CONFIGS", "MODEL", "EMA", "CHECKPOINTS", "LOG", "QUALITY_PICTURE", "MODEL_INDEX", "UNET_CONFIG",
    "SCHEDULER_CONFIG",
    "human_size", "write_problem", "identity_changes", "write_identity", "earlier_training", "clear_run",
]

# The layout: every name in a run directory, here and nowhere else.
CONFIG, LOG, MODEL, SAMPLES, CHECKPOINTS, LOCK = "config.yaml", "log.jsonl", "model", "samples", "checkpoints", ".lock"
IDENTITY = "identity.json"
QUALITY_PICTURE = "quality.png"  # FID and loss against step (resdiff.evaluation draws it at each evaluation)
STATE, WEIGHTS, OPTIMIZER, EMA = "state.json", "model.safetensors", "optimizer.pt", "ema"
# A pipeline folder as DDPMPipeline.save_pretrained writes it: what sampling needs (its configs, and the weights,
# which a diffusers folder may hold under another name: model_folder checks those itself).
MODEL_INDEX, UNET_CONFIG, SCHEDULER_CONFIG = "model_index.json", "unet/config.json", "scheduler/scheduler_config.json"
PIPELINE_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
PIPELINE_CONFIGS = (MODEL_INDEX, UNET_CONFIG, SCHEDULER_CONFIG)
PIPELINE_FILES = (MODEL_INDEX, UNET_CONFIG, PIPELINE_WEIGHTS, SCHEDULER_CONFIG)
EMA_FILES = tuple(f"{EMA}/{name}" for name in PIPELINE_FILES)
# Everything resuming needs (rng-<rank>.pt files are optional: without them a resume reseeds).
CHECKPOINT_FILES = (STATE, WEIGHTS, OPTIMIZER, *EMA_FILES)
_STATE_KEYS = ("step", "epoch", "batch", "ema_step", "world_size")
_NAME = re.compile(r"^step-(\d+)$")


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` optimizer steps."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def step_of(path: str | Path) -> int:
    """The step a checkpoint folder was taken at."""
    m = _NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (step-NNNNNNN)")
    return int(m.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every folder named like a checkpoint (``checkpoints/step-N``), complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=step_of)


def _safetensors_problem(file: Path) -> str | None:
    """Whether a safetensors file is whole: its header parses and its tensors end exactly at the end of the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                return "truncated or not a safetensors file (header larger than the file)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable ({' '.join(str(err).split())})"
    if not isinstance(header, dict):
        return "not a safetensors file"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"truncated ({size} bytes, expected {expected})"
    return None


def file_problem(file: str | Path) -> str | None:
    """Why one file of a checkpoint or pipeline folder is unusable (``"is missing"``, ``"is truncated ..."``), or None."""
    file = Path(file)
    if not file.is_file():
        return "is missing"
    if file.suffix == ".safetensors":
        problem = _safetensors_problem(file)
        return f"is {problem}" if problem else None
    if file.suffix == ".pt":  # torch.save writes zip archives; a cut-off one lacks its central directory
        return None if zipfile.is_zipfile(file) else "is truncated or not a torch checkpoint file"
    if file.suffix == ".json":
        try:
            json.loads(file.read_text())
        except (OSError, ValueError) as err:
            return f"is unreadable ({' '.join(str(err).split())})"
    return None


def checkpoint_problem(path: str | Path, *, ema_only: bool = False) -> str | None:
    """Why a checkpoint folder cannot be used (``"optimizer.pt is missing"``), or None when it is complete.

    ``ema_only`` checks just the exported EMA pipeline (what sampling reads), not the training state.
    """
    path = Path(path)
    if not path.is_dir():
        return "is not a folder"
    if not ema_only:
        try:
            state = json.loads((path / STATE).read_text())
        except FileNotFoundError:
            return f"{STATE} is missing"
        except (OSError, ValueError) as err:
            return f"{STATE} is unreadable ({' '.join(str(err).split())})"
        if not isinstance(state, dict) or any(not isinstance(state.get(k), int) for k in _STATE_KEYS):
            return f"{STATE} lacks one of {', '.join(_STATE_KEYS)}"
        if _NAME.match(path.name) and state["step"] != step_of(path):
            return f"{STATE} is for step {state['step']}, not {step_of(path)}"
    for name in EMA_FILES if ema_only else CHECKPOINT_FILES[1:]:
        problem = file_problem(path / name)
        if problem:
            return f"{name} {problem}"
    return None


def complete_checkpoints(
    run_dir: str | Path, warn: Callable[[str], None] | None = None, *, ema_only: bool = False
) -> list[Path]:
    """The complete checkpoints of a run, oldest first; ``warn`` hears one line per damaged one skipped."""
    found = []
    for path in list_checkpoints(run_dir):
        problem = checkpoint_problem(path, ema_only=ema_only)
        if problem is None:
            found.append(path)
        elif warn is not None:
            warn(f"warning: skipping checkpoint {path}: {problem}")
    return found


def latest_checkpoint(
    run_dir: str | Path, warn: Callable[[str], None] | None = None, *, ema_only: bool = False
) -> Path | None:
    """The newest complete checkpoint, or None. Damaged ones are passed over (``warn`` hears why)."""
    found = complete_checkpoints(run_dir, warn, ema_only=ema_only)
    return found[-1] if found else None


def rotate_checkpoints(saved: Path, keep: int) -> list[Path]:
    """Once the checkpoint ``saved`` is complete, delete the oldest complete checkpoints taken before it
    until ``keep`` complete ones at or below its step remain; returns the deleted folders.

    So the checkpoint a run resumed from is deleted only after a newer one is complete; the newest complete
    one (the one just saved) never is; and neither are checkpoints of later steps (left from before a resume
    fell back past them; the run overwrites them when it gets there) nor damaged folders, which
    ``complete_checkpoints`` warns about and which are left for a person to look at."""
    if checkpoint_problem(saved) is not None:
        return []
    older = [p for p in complete_checkpoints(saved.parent.parent) if step_of(p) < step_of(saved)]
    doomed = older[: max(0, len(older) + 1 - keep)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def write_config(run_dir: Path, cfg: Config) -> None:
    """RUN/config.yaml, written under a temporary name and renamed, so it is never half-written."""
    try:
        write_atomic(run_dir / CONFIG, lambda tmp: save_config(cfg, tmp))
    except OSError as err:
        raise UsageError(f"cannot write to run directory {run_dir}: {err.strerror or err}") from None


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete what an interrupted run left half-written; returns their names. Call it holding the run's lock,
    so that no running process is writing them."""
    found = sorted([
        *leftovers(run_dir / CHECKPOINTS, "step-*"), *leftovers(run_dir / SAMPLES), *leftovers(run_dir, MODEL),
        *leftovers(run_dir, CONFIG), *leftovers(run_dir, LOG), *leftovers(run_dir, IDENTITY), *run_dir.glob(f"{LOCK}.stale.*"),
    ])
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [str(p.relative_to(run_dir)) for p in found]


def export_model(run_dir: Path, source: Path) -> None:
    """Replace RUN/model with a copy of ``source`` (a checkpoint's EMA pipeline), never leaving it half-written."""
    target = run_dir / MODEL
    tmp = temporary(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        shutil.copytree(source, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(target, tmp)


def check_same_model(run_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose config changes the shape of the model saved in ``run_dir``."""
    saved = run_dir / CONFIG
    if not saved.is_file():
        return
    old = load_config(saved)
    diffs = config_diff(old, cfg, "model")
    for key in ("image_size", "image_channels", "class_cond"):
        a, b = getattr(old.data, key), getattr(cfg.data, key)
        if a != b:
            diffs.append(f"data.{key}: {a} -> {b}")
    if diffs:
        raise UsageError(
            f"cannot resume {run_dir}: the config changes the model ({'; '.join(diffs)}); "
            f"use the original settings or a new --out"
        )


def _plain_json(value: object) -> object:
    """``value`` as it reads back from JSON (tuples become lists), so recorded and current values compare."""
    return json.loads(json.dumps(value))


def identity_changes(run_dir: Path, identity: dict[str, object]) -> list[str]:
    """What ``identity`` (dotted key -> value) changes against the one recorded in RUN/identity.json, as
    ``"key: old -> new"``; empty when nothing changes or nothing was recorded (a run from before identities)."""
    try:
        recorded = json.loads((run_dir / IDENTITY).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        return [f"{IDENTITY}: unreadable ({' '.join(str(err).split())})"]
    if not isinstance(recorded, dict):
        return [f"{IDENTITY}: not a JSON object"]
    current = _plain_json(identity)
    return [f"{k}: {recorded[k]} -> {current[k]}" for k in current if k in recorded and recorded[k] != current[k]]


def write_identity(run_dir: Path, identity: dict[str, object]) -> None:
    """Record what the run learns from in RUN/identity.json (atomically)."""
    write_atomic(run_dir / IDENTITY, lambda tmp: tmp.write_text(json.dumps(_plain_json(identity), indent=1)))


def earlier_training(run_dir: Path, checkpoint_every: int) -> str | None:
    """What earlier training left in ``run_dir`` that a start from step 0 would replace, in a few words, or
    None: an exported model, or logged steps that reached a checkpoint (``checkpoint_every``). Steps logged
    before the first checkpoint are work a crash lost, which the run redoes (an elastic restart among them)."""
    found = []
    if (run_dir / MODEL).is_dir():
        found.append(f"the exported model {MODEL}/")
    try:
        lines = (run_dir / LOG).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            steps.append(record["step"])
    if steps and max(steps) >= checkpoint_every:
        found.append(f"{LOG} up to step {max(steps)}")
    return " and ".join(found) or None


def clear_run(run_dir: Path) -> list[str]:
    """Delete what earlier training wrote (checkpoints, model, log, previews, identity): an explicit start over.
    Call it holding the run's lock. Returns the names removed."""
    removed = []
    for name in (CHECKPOINTS, MODEL, SAMPLES, LOG, IDENTITY):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def checkpoint_bytes(parameters: int) -> tuple[int, int]:
    """About how many bytes (one checkpoint, the exported model) a model of ``parameters`` parameters takes. All
    in float32 whatever the precision of the run: a checkpoint holds the weights (model.safetensors), the EMA
    weights (its ema/ pipeline) and Adam's two moments (optimizer.pt), 16 bytes a parameter; the exported
    model/ is the EMA weights again, 4 bytes. state.json, the RNG states and the configs are a few KB."""
    return parameters * 4 * 4, parameters * 4


def check_disk(run_dir: Path, parameters: int, keep: int = 3) -> None:
    """The run directory takes a new file, and its disk has room for the most the run will hold at once.

    That peak comes while a checkpoint is written: ``keep`` complete ones are kept and the new one is written
    before the oldest goes (``rotate_checkpoints``), and then the exported model is copied beside the one it
    replaces. With the default keep of 3 that is 4 x 16 + 2 x 4 = 72 bytes a parameter; what the run directory
    already holds of it (checkpoint folders, model/) is counted as there."""
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if not folder.is_dir():
            continue
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            probe.unlink()
        except OSError as err:
            raise UsageError(f"cannot write to {folder}: {err.strerror}; fix its permissions or choose another --out") from None
    checkpoint, model = checkpoint_bytes(parameters)
    held = len(list_checkpoints(run_dir))
    needed = (max(keep, held) + 1 - held) * checkpoint + (1 if (run_dir / MODEL).is_dir() else 2) * model
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UsageError(
            f"not enough free disk space in {run_dir}: {human_size(free)} free, but this run needs about "
            f"{human_size(needed)} more: one checkpoint of this {parameters / 1e6:.1f}M-parameter model takes about "
            f"{human_size(checkpoint)}, train.keep_checkpoints={keep} of them are kept ({held} now) and one more is "
            f"written before the oldest goes, and each export writes the model ({human_size(model)}) beside the "
            f"one it replaces; free some space, lower train.keep_checkpoints, or choose another --out"
        )


def trim_log(run_dir: Path, step: int) -> int:
    """Keep log.jsonl's records up to ``step``, where training continues from: records past it (work an
    interruption lost, which the run repeats) and a line cut off mid-write go. Returns how many went."""
    log = run_dir / LOG
    if not log.is_file():
        return 0
    lines = log.read_text(errors="replace").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if len(kept) < len(lines):
        write_atomic(log, lambda tmp: tmp.write_text("".join(kept)))
    return len(lines) - len(kept)


# ----------------------------------------------------------------------------- the run lock

_OPEN: set[int] = set()  # the lock files' descriptors this process holds


def _close_in_child() -> None:
    """In a forked child (a DataLoader worker), close the inherited lock descriptors: the kernel lock then
    belongs to the process that took it alone, and goes the moment that process dies, not with its last child."""
    for fd in _OPEN:
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""


def _owner(text: str) -> str:
    """Who a lock file's text names ("pid 123 on host"), or "another process" when it names no one readable."""
    try:
        owner = json.loads(text)
        return f"pid {int(owner['pid'])} on {owner['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (its owner may have removed it while we opened it)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(path: Path, fd: int, pid: int) -> None:
    """Remove the lock file and let go of its kernel lock (at exit, on errors, or when the RunLock is collected).
    Only the process that took it does: a forked child has closed its copy, and its descriptor number means
    something else there."""
    if os.getpid() != pid or fd not in _OPEN:
        return
    _OPEN.discard(fd)
    if _same_file(fd, path):  # removed first, so that nobody can lock the file on its way out
        with contextlib.suppress(OSError):
            path.unlink()
    os.close(fd)  # this drops the kernel lock


class RunLock:
    """``RUN/.lock``: one process writes a run directory at a time.

    Ownership is a kernel lock (``flock``) on the file, held while the run lives: the kernel lets one open
    file hold it and drops it when its process ends, however it ends (SIGKILL, a crash, an elastic restart),
    so no process ID is ever judged. PIDs and host names mislead across PID namespaces (two containers
    with one host name) and across machines; the lock does not, on a local disk and on network filesystems
    with working locks (NFS). The file also names the holder, for the message a second run gets:
    a one-line UsageError. A file left by a dead run is taken over with a warning. ``release`` (also run at
    interpreter exit and when the object is collected) removes the file and lets go of the lock.
    """

    def __init__(self, run_dir: str | Path, warn: Callable[[str], None] = print):
        self.run_dir, self.path, self.warn = Path(run_dir), Path(run_dir) / LOCK, warn
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> None:
        if self.held:
            return
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UsageError(f"cannot write to run directory {self.run_dir}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                owner = _owner(_read(fd))
                os.close(fd)
                if isinstance(err, BlockingIOError):
                    raise UsageError(
                        f"{self.run_dir} is in use by {owner}, which holds the lock on {self.path}; "
                        f"wait for that run to end or stop it"
                    ) from None
                raise UsageError(f"cannot lock {self.path} ({err.strerror}); put the run directory on a filesystem "
                                 f"with file locks") from None
            if not _same_file(fd, self.path):  # its owner removed it on the way out: lock the file there now
                os.close(fd)
                continue
            left = _read(fd)
            token = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time())})
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, token.encode(), 0)
            except OSError as err:
                os.close(fd)
                raise UsageError(f"cannot write to run directory {self.run_dir}: {err.strerror}") from None
            _OPEN.add(fd)
            self._finalizer = weakref.finalize(self, _release, self.path, fd, os.getpid())  # runs at exit too
            if left.strip():
                self.warn(f"warning: {self.path} was left by {_owner(left)}, which is no longer running; taking it over")
            return
        raise UsageError(f"cannot take {self.path}: other processes keep creating it; is another run starting on {self.run_dir}?")

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # calls _release once, and not again at exit
        self._finalizer = None


# ----------------------------------------------------------------------------- what the trainer holds


@dataclass
class TrainState:
    """Everything a run resumes from besides the EMA model: what a checkpoint's state.json, model.safetensors,
    optimizer.pt and rng-<rank>.pt hold. ``rng`` is this process's (None: the checkpoint has none for it);
    ``scaler`` is the fp16 GradScaler's state (None without one); ``micro_batch`` is the images one micro-batch
    of all processes together takes, which places ``batch`` in the epoch's order (0: not recorded)."""

    step: int
    epoch: int
    batch: int
    ema_updates: int
    world_size: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    lr_schedule: dict
    rng: dict | None
    scaler: dict | None = None
    micro_batch: int = 0


class RunDir:
    """A run directory as the trainer sees it: it asks to save and load state, log, preview and export, and the
    names of the files stay in here. Methods marked "main process" are called on the main process only."""

    def __init__(self, path: str | Path, warn: Callable[[str], None] = print):
        self.path = Path(path)
        self.lock = RunLock(self.path, warn=warn)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL

    @property
    def samples_dir(self) -> Path:
        return self.path / SAMPLES

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    def open(self) -> None:
        """Create the folder if needed and take its lock (main process)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create run directory {self.path}: {err.strerror}") from None
        self.lock.acquire()

    def has_model(self) -> bool:
        return (self.path / MODEL / PIPELINE_FILES[0]).is_file()

    # --------------------------------------------------------------------- the log and previews (main process)
    def append_log(self, record: dict) -> None:
        """One JSON line in log.jsonl; a failed write is a TrainingError saying what to do."""
        try:
            with open(self.path / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise TrainingError(
                f"cannot write {self.path / LOG} at step {record.get('step')} ({write_problem(err)}); "
                f"free disk space in {self.path} (or fix its permissions), then resume with the same command"
            ) from None

    def save_preview(self, step: int, save: Callable[[Path], object]) -> Path:
        """samples/step-NNNNNNN.png, written by ``save(path)`` under a temporary name (a grid with its final name
        is always whole)."""
        path = self.path / SAMPLES / f"step-{step:07d}.png"
        try:
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, save)
        except OSError as err:
            raise TrainingError(
                f"cannot write preview {path} ({write_problem(err)}); free disk space in {self.path}, "
                f"then resume with the same command"
            ) from None
        return path

    # --------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, state: TrainState, ema: object, *, rank: int, agree: Callable[[bool], bool], keep: int
    ) -> Path:
        """Write checkpoint ``state.step`` on every process (each writes its own RNG state, the main process the
        rest), with ``ema`` (a DDPMPipeline) as its ``ema/`` folder; then export the EMA model and keep the
        ``keep`` newest complete checkpoints (see ``rotate_checkpoints``). Returns the folder.

        It is written under a temporary name, fsynced and renamed into place. ``agree(ok)`` is a collective: True
        when every process's ``ok`` is. A failed write anywhere (disk full, a read-only or vanished folder)
        removes the temporary folder, leaves every earlier checkpoint as it was, and raises a TrainingError on
        every process that names the folder."""
        main = rank == 0
        final = checkpoint_dir(self.path, state.step)
        tmp = temporary(final)
        error: BaseException | None = None
        if main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except WRITE_ERRORS as err:
                error = err
        ok = agree(error is None)  # also the barrier: no process writes before the folder exists
        if ok:
            try:
                torch.save(state.rng, tmp / rng_file(rank))
                if main:
                    save_file({k: v.contiguous() for k, v in state.model.items()}, tmp / WEIGHTS)  # channels_last is strided
                    ema.save_pretrained(tmp / EMA)
                    torch.save({"optimizer": state.optimizer, "lr_schedule": state.lr_schedule, "scaler": state.scaler},
                               tmp / OPTIMIZER)
                    counters = {"step": state.step, "epoch": state.epoch, "batch": state.batch,
                                "ema_step": state.ema_updates, "world_size": state.world_size,
                                "micro_batch": state.micro_batch}
                    (tmp / STATE).write_text(json.dumps(counters, indent=1))
            except WRITE_ERRORS as err:
                error = err
            ok = agree(error is None)  # also: every process's rng file is written now
        if not ok:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(self._save_failed(final, error, "checkpoint", state.step))
        what = "checkpoint"
        if main:
            try:  # the sums cover every process's files, so they come after the agreement
                write_checksums(tmp / EMA)
                write_checksums(tmp, skip=(EMA,))
                fsync_tree(tmp)
                replace_folder(final, tmp)  # a checkpoint of this step from before an interruption is replaced
                what = "model export"
                export_model(self.path, final / EMA)
                rotate_checkpoints(final, keep)
            except WRITE_ERRORS as err:
                error = err
        if not agree(error is None):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(self._save_failed(final, error, what, state.step))
        return final

    def _save_failed(self, final: Path, error: BaseException | None, what: str, step: int) -> str:
        """The message of a failed checkpoint: what failed, what is still there, what to do."""
        done = [p for p in complete_checkpoints(self.path) if p != final]
        kept = f"the last complete checkpoint, {done[-1]}, is intact" if done else "no earlier checkpoint exists"
        if final.is_dir() and checkpoint_problem(final) is None:
            kept = f"the checkpoint {final} itself is complete"
        why = write_problem(error) if error is not None else "it failed on another process"
        where = final.parent if what == "checkpoint" else self.path / MODEL
        return (f"cannot write the {what} of step {step} in {where} ({why}); {kept}. "
                f"Free disk space there (or fix its permissions), then resume with the same command")

    def load_checkpoint(
        self, path: Path, *, rank: int, world: int, device: torch.device
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """A checkpoint read into memory on ``device``: the training state and the EMA weights. Nothing is
        applied, so a damaged file (any error raised here) leaves the trainer untouched."""
        where = "cpu" if device.type == "cpu" else str(device)  # a multi-process CPU run's "cpu:0" is refused by both loaders
        for folder, prefix in ((path, ""), (path / EMA, f"{EMA}/")):
            problem = checksum_problem(folder)
            if problem:  # the file changed after it was written whole: the trainer falls back past it
                raise ValueError(f"{prefix}{problem}")
        counters = json.loads((path / STATE).read_text())
        model = load_file(path / WEIGHTS, device=where)
        ema = load_file(path / EMA / PIPELINE_WEIGHTS, device=where)
        opt = torch.load(path / OPTIMIZER, map_location=where, weights_only=True)
        rng = None
        if counters["world_size"] == world and (path / rng_file(rank)).is_file():
            rng = torch.load(path / rng_file(rank), weights_only=True)
        state = TrainState(
            step=counters["step"], epoch=counters["epoch"], batch=counters["batch"], ema_updates=counters["ema_step"],
            world_size=counters["world_size"], model=model, optimizer=opt["optimizer"], lr_schedule=opt["lr_schedule"],
            rng=rng, scaler=opt.get("scaler"), micro_batch=int(counters.get("micro_batch", 0)),
        )
        return state, ema
