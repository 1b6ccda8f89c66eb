"""Where a run keeps its resumable state, and which checkpoint is the newest complete one.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` that is written under a temporary name and
renamed into place only when complete, so any folder with that name is whole.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["checkpoint_dir", "list_checkpoints", "latest_checkpoint", "step_of"]

_NAME = re.compile(r"^step-(\d+)$")


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
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
