"""A checkpoint folder: its format, how it is checked, listed and rotated, and how it is written and read.

    RUN/checkpoints/step-NNNNNNN/   resumable state:
        state.json (step, data position, EMA updates, world size)   model.safetensors (the trained weights)
        optimizer.pt (optimizer, LR schedule, fp16 loss scale)   rng-<rank>.pt (each process's RNG)
        ema/ (a pipeline folder)   SHA256SUMS (digests of all but ema/, which has its own)

A folder with a checkpoint's final name can still be damaged afterwards (a file deleted by hand, a disk that
lost its tail), so nothing trusts the name alone: ``checkpoint_problem`` checks that every part is there and
whole (JSON parses, safetensors headers match the file sizes, torch files are complete zip archives), and
``complete_checkpoints`` / ``latest_checkpoint`` list only folders that pass. Content is checked too:
``read_checkpoint`` refuses a file that no longer matches its ``SHA256SUMS`` (the trainer then falls back to
the checkpoint before). Weights are read through safetensors only, optimizer and RNG state through
``torch.load(weights_only=True)``, which refuses any pickle that is not plain tensors and containers.

The run directory around it (``resdiff.rundir``) decides when a checkpoint is written, by which processes,
and exports its EMA pipeline as the run's model.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .files import checksum_problem
from .layout import (
    CHECKPOINT_FILES, CHECKPOINTS, EMA, EMA_FILES, OPTIMIZER, PIPELINE_WEIGHTS, STATE, STEP_NAME, WEIGHTS, rng_file,
    step_name,
)

__all__ = [
    "TrainState", "checkpoint_dir", "step_of", "list_checkpoints", "complete_checkpoints", "latest_checkpoint",
    "checkpoint_problem", "file_problem", "rotate_checkpoints", "checkpoint_bytes", "write_checkpoint_files",
    "read_checkpoint",
]

_STATE_KEYS = ("step", "epoch", "batch", "ema_step", "world_size")
_NAME = re.compile(STEP_NAME)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` optimizer steps."""
    return Path(run_dir) / CHECKPOINTS / step_name(step)


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



def checkpoint_bytes(parameters: int) -> tuple[int, int]:
    """About how many bytes (one checkpoint, the exported model) a model of ``parameters`` parameters takes. All
    in float32 whatever the precision of the run: a checkpoint holds the weights (model.safetensors), the EMA
    weights (its ema/ pipeline) and Adam's two moments (optimizer.pt), 16 bytes a parameter; the exported
    model/ is the EMA weights again, 4 bytes. state.json, the RNG states and the configs are a few KB."""
    return parameters * 4 * 4, parameters * 4



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
    train_seconds: float = 0.0  # wall time in training steps since step 0
    eval_seconds: float = 0.0  # wall time in in-training evaluations since step 0


def write_checkpoint_files(folder: Path, state: TrainState, ema: object, rank: int,
                           records: dict[str, dict] | None = None) -> None:
    """Write this process's part of checkpoint ``state`` into ``folder``: its RNG state, and on the main process
    (rank 0) the weights, ``ema`` (a DDPMPipeline) as ``ema/``, the optimizer and state.json. The checksums,
    the fsync and the rename come after every process has written (``RunDir.save_checkpoint``)."""
    torch.save(state.rng, folder / rng_file(rank))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.model.items()}, folder / WEIGHTS)  # channels_last is strided
        ema.save_pretrained(folder / EMA)
        for name, record in (records or {}).items():  # what the model folder says besides its weights (latent.json)
            (folder / EMA / name).write_text(json.dumps(record, indent=1))
        torch.save({"optimizer": state.optimizer, "lr_schedule": state.lr_schedule, "scaler": state.scaler},
                   folder / OPTIMIZER)
        counters = {"step": state.step, "epoch": state.epoch, "batch": state.batch,
                    "ema_step": state.ema_updates, "world_size": state.world_size,
                    "micro_batch": state.micro_batch, "train_seconds": round(state.train_seconds, 3),
                    "eval_seconds": round(state.eval_seconds, 3)}
        (folder / STATE).write_text(json.dumps(counters, indent=1))


def read_checkpoint(
    path: Path, *, rank: int, world: int, device: torch.device
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """A checkpoint read into memory on ``device``: the training state and the EMA weights. Nothing is
    applied, so a damaged file (any error raised here) leaves the trainer untouched.

    Every file is first checked against SHA256SUMS, then read by its own loader. Reading each file only once (its
    bytes hashed, then parsed from memory) would copy every byte into Python, which costs more than safetensors'
    memory-mapped second read (bench/checksum_cost.py measures both; figures in docs/benchmarks.md)."""
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
        train_seconds=float(counters.get("train_seconds", 0.0)), eval_seconds=float(counters.get("eval_seconds", 0.0)),
    )
    return state, ema
