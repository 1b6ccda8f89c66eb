"""Writing files so that an interruption never leaves half of one under its final name.

Everything resdiff writes (checkpoints, the exported model, previews, sampled PNGs, the demo data,
config.yaml, the log) goes first to a temporary dot-name beside its target, ``.NAME.tmp`` (or
``.NAME.<pid>.tmp`` where several processes may write the same folder), and is then renamed into
place; a folder being replaced is first renamed to ``.NAME.old``. This module is the one owner of
those names: ``leftovers`` finds what an interrupted write left, by the same rule.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from .errors import one_line

__all__ = [
    "cache_root", "WRITE_ERRORS", "write_problem", "human_size", "temporary", "replaced", "write_atomic", "replace_folder",
    "fsync_tree", "leftovers",
]

def cache_root() -> Path:
    """resdiff's cache folder: $RESDIFF_CACHE, default ~/.cache/resdiff (demo data, Inception weights, reference
    statistics)."""
    return Path(os.environ.get("RESDIFF_CACHE", Path.home() / ".cache" / "resdiff"))


# What a failed write raises: OSError from Python, RuntimeError from torch.save, SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


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


def temporary(path: Path, *, per_process: bool = False) -> Path:
    """The temporary name ``path`` is written under: ``.NAME.tmp`` (``.NAME.<pid>.tmp`` with ``per_process``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp" if per_process else f".{path.name}.tmp")


def replaced(path: Path) -> Path:
    """Where a folder that is being replaced waits until its successor is in place: ``.NAME.old``."""
    return path.with_name(f".{path.name}.old")


def leftovers(folder: Path, pattern: str = "*") -> list[Path]:
    """What interrupted writes of files matching ``pattern`` left in ``folder``: their temporary and old names."""
    found = [*folder.glob(f".{pattern}.tmp"), *folder.glob(f".{pattern}.old")]
    return sorted(p for p in found if p.name.endswith((".tmp", ".old")))


def write_atomic(path: Path, write: Callable[[Path], object], *, per_process: bool = False) -> None:
    """Call ``write(tmp)`` to write a file under its temporary name, then rename it to ``path``; on failure
    the temporary file is removed and the error raised, and an earlier ``path`` is left as it was."""
    tmp = temporary(path, per_process=per_process)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def replace_folder(target: Path, new: Path) -> None:
    """Put the finished folder ``new`` in place of ``target`` (which may not exist) without ever leaving
    neither: ``target`` moves to its old name, ``new`` takes its name, then the old one is deleted."""
    old = replaced(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """Flush every file below ``root`` and the folders themselves to disk."""
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
