"""Where a run keeps its resumable state, which checkpoint is the newest complete one, and who owns the run.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` that the trainer writes as ``.step-NNNNNNN.tmp``,
fsyncs and renames into place. A folder with the final name can still be damaged afterwards (a file
deleted by hand, a disk that lost its tail), so nothing trusts the name alone: ``checkpoint_problem``
checks that every part is there and whole (JSON parses, safetensors headers match the file sizes,
torch files are complete zip archives), and ``complete_checkpoints`` / ``latest_checkpoint`` list only
folders that pass, warning about the others.

``RunLock`` is ``RUN/.lock``: created atomically by the one process that writes a run directory, holding
its host and pid, so a second training run on the same directory is refused instead of interleaving
checkpoints; a lock left by a process that no longer runs (same host) is taken over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import time
import weakref
import zipfile
from pathlib import Path
from typing import Callable

from .errors import UsageError

__all__ = [
    "checkpoint_dir", "list_checkpoints", "complete_checkpoints", "latest_checkpoint", "checkpoint_problem", "file_problem", "step_of",
    "rotate_checkpoints", "CHECKPOINT_FILES", "EMA_FILES", "RunLock",
]

_NAME = re.compile(r"^step-(\d+)$")

# The exported EMA pipeline inside a checkpoint: what sampling needs.
EMA_FILES = (
    "ema/model_index.json", "ema/unet/config.json", "ema/unet/diffusion_pytorch_model.safetensors",
    "ema/scheduler/scheduler_config.json",
)
# Everything resuming needs (rng-<rank>.pt files are optional: without them a resume reseeds).
CHECKPOINT_FILES = ("state.json", "model.safetensors", "optimizer.pt", *EMA_FILES)
_STATE_KEYS = ("step", "epoch", "batch", "ema_step", "world_size")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` optimizer steps."""
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def step_of(path: str | Path) -> int:
    """The step a checkpoint folder was taken at."""
    m = _NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (step-NNNNNNN)")
    return int(m.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every folder named like a checkpoint (``checkpoints/step-N``), complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
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
            state = json.loads((path / "state.json").read_text())
        except FileNotFoundError:
            return "state.json is missing"
        except (OSError, ValueError) as err:
            return f"state.json is unreadable ({' '.join(str(err).split())})"
        if not isinstance(state, dict) or any(not isinstance(state.get(k), int) for k in _STATE_KEYS):
            return f"state.json lacks one of {', '.join(_STATE_KEYS)}"
        if _NAME.match(path.name) and state["step"] != step_of(path):
            return f"state.json is for step {state['step']}, not {step_of(path)}"
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


# ----------------------------------------------------------------------------- the run lock

_HELD: set[str] = set()  # lock files this process holds (a lock naming our own pid but not in here is stale)


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, from /proc), to tell a reused pid from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _release(path: Path, token: str) -> None:
    """Remove the lock file if it is still ours (at exit, on errors, or when the Trainer is collected)."""
    _HELD.discard(str(path))
    try:
        if path.read_text() == token:
            path.unlink()
    except OSError:
        pass


class RunLock:
    """``RUN/.lock``: one process writes a run directory at a time.

    ``acquire`` creates the file with O_CREAT | O_EXCL (atomic: of two processes exactly one succeeds),
    writing host, pid and the process start time. An existing lock whose process is alive (or on another
    host, which cannot be checked) is a one-line UsageError; one whose process is gone is taken over with
    a warning. ``release`` (also run at interpreter exit and when the object is collected) removes it.
    """

    def __init__(self, run_dir: str | Path, warn: Callable[[str], None] = print):
        self.run_dir, self.path, self.warn = Path(run_dir), Path(run_dir) / ".lock", warn
        self._token: str | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> None:
        if self.held:
            return
        pid = os.getpid()
        token = json.dumps({"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "time": round(time.time())})
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as err:
                raise UsageError(f"cannot write to run directory {self.run_dir}: {err.strerror}") from None
            try:
                os.write(fd, token.encode())
            finally:
                os.close(fd)
            self._token = token
            _HELD.add(str(self.path))
            self._finalizer = weakref.finalize(self, _release, self.path, token)  # runs at exit too
            return
        raise UsageError(f"cannot take {self.path}: other processes keep creating it; is another run starting on {self.run_dir}?")

    def _take_over_if_stale(self) -> None:
        """Remove an existing lock whose owner is gone, else raise the UsageError that names the owner."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            owner = json.loads(text)
            host, pid, start = str(owner["host"]), int(owner["pid"]), owner.get("start")
        except (ValueError, KeyError, TypeError):
            if age < 10:  # being written by a process that just created it
                raise UsageError(f"{self.run_dir} is being claimed by another run right now; wait for it") from None
            raise UsageError(
                f"{self.path} is unreadable; remove it if no run is using {self.run_dir}"
            ) from None
        here = socket.gethostname()
        ours = pid == os.getpid() and str(self.path) in _HELD
        if host != here or ours or (pid != os.getpid() and _alive(pid, start)):
            raise UsageError(
                f"{self.run_dir} is in use by pid {pid} on {host}; wait for it or remove {self.path} if that process is gone"
            )
        # Stale: move it aside under a name of our own (atomic), check we moved the lock we judged, drop it.
        aside = self.path.with_name(f".lock.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != text:  # someone else took it over in between: give theirs back, report them
            os.replace(aside, self.path)
            raise UsageError(f"{self.run_dir} was just claimed by another run; wait for it or remove {self.path}")
        aside.unlink()
        self.warn(f"warning: {self.path} was left by pid {pid} on {host}, which is no longer running; taking it over")

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # calls _release once, and not again at exit
        self._token, self._finalizer = None, None
