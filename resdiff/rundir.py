"""The run directory around the checkpoints: its config, log, exported model, and how it stays whole.

    RUN/config.yaml      the resolved config          RUN/log.jsonl   one JSON line per logged step
    RUN/samples/         preview grids by step        RUN/model/      the EMA model, a DDPMPipeline folder
    RUN/checkpoints/     resumable state (see resdiff.checkpoint)
    RUN/.lock            the process that owns the run (resdiff.checkpoint.RunLock)

Every file is written under a temporary dot-name and renamed into place, so an interruption leaves the
old version or the new one, never half of one. ``remove_leftovers`` deletes the temporary names an
interrupted run left behind; ``trim_log`` drops log records of steps that a resume will redo.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from .config import Config, config_diff, load_config, save_config
from .errors import UsageError, one_line

__all__ = [
    "WRITE_ERRORS", "write_problem", "human_size", "fsync_tree", "write_config", "remove_leftovers",
    "check_same_model", "check_disk", "trim_log", "export_model",
]

# What a failed write raises: OSError from Python, RuntimeError from torch.save, SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)

# Temporary names of interrupted writes, relative to the run directory.
_LEFTOVERS = ("checkpoints/.step-*.tmp", "checkpoints/.step-*.old", ".model.tmp", ".model.old", "samples/.*.tmp",
              ".config.yaml.tmp", ".log.jsonl.tmp", ".lock.stale.*")


def write_problem(err: BaseException) -> str:
    """What went wrong in a failed write, in a few words."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    return f"{type(err).__name__}: {one_line(err)}"


def human_size(n: float) -> str:
    """A byte count for people: ``512 bytes``, ``1.5 GB``."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fsync_tree(root: Path) -> None:
    """Flush every file below ``root`` and the folders themselves to disk."""
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_config(run_dir: Path, cfg: Config) -> None:
    """RUN/config.yaml, written under a temporary name and renamed, so it is never half-written."""
    tmp = run_dir / ".config.yaml.tmp"
    try:
        save_config(cfg, tmp)
        os.replace(tmp, run_dir / "config.yaml")
    except OSError as err:
        raise UsageError(f"cannot write to run directory {run_dir}: {err.strerror or err}") from None


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete what an interrupted run left half-written; returns their names. Call it holding the run's lock,
    so that no running process is writing them."""
    found = sorted(path for pattern in _LEFTOVERS for path in run_dir.glob(pattern))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [str(p.relative_to(run_dir)) for p in found]


def check_same_model(run_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose config changes the shape of the model saved in ``run_dir``."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = load_config(saved)
    diffs = config_diff(old, cfg, "model")
    for key in ("image_size", "channels", "class_cond"):
        a, b = getattr(old.data, key), getattr(cfg.data, key)
        if a != b:
            diffs.append(f"data.{key}: {a} -> {b}")
    if diffs:
        raise UsageError(
            f"cannot resume {run_dir}: the config changes the model ({'; '.join(diffs)}); "
            f"use the original settings or a new --out"
        )


def check_disk(run_dir: Path, parameters: int) -> None:
    """The run directory takes a new file, and its disk has room for about three checkpoints."""
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            probe.unlink()
        except OSError as err:
            raise UsageError(f"cannot write to {folder}: {err.strerror}; fix its permissions or choose another --out") from None
    checkpoint = parameters * 4 * 4  # float32 weights + EMA weights + Adam's two moments
    free = shutil.disk_usage(run_dir).free
    if free < 3 * checkpoint:
        raise UsageError(
            f"not enough free disk space in {run_dir}: {human_size(free)} free, but one checkpoint of this "
            f"{parameters / 1e6:.1f}M-parameter model takes about {human_size(checkpoint)} and a run needs room for "
            f"about three ({human_size(3 * checkpoint)}); free some space or choose another --out"
        )


def trim_log(run_dir: Path, step: int) -> int:
    """Keep log.jsonl's records up to ``step``, where training continues from: records past it (work an
    interruption lost, which the run repeats) and a line cut off mid-write go. Returns how many went."""
    log = run_dir / "log.jsonl"
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
        tmp = log.with_name(".log.jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, log)
    return len(lines) - len(kept)


def export_model(run_dir: Path, source: Path) -> None:
    """Replace RUN/model with a copy of ``source`` (a checkpoint's EMA pipeline), never leaving it half-written."""
    target, tmp, old = run_dir / "model", run_dir / ".model.tmp", run_dir / ".model.old"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        shutil.copytree(source, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
