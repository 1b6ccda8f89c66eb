"""Writing files so that an interruption never leaves half of one under its final name.

Everything resdiff writes (checkpoints, the exported model, previews, sampled PNGs, the demo data,
config.yaml, the log) goes first to a temporary dot-name beside its target, ``.NAME.tmp`` (or
``.NAME.<pid>.tmp`` where several processes may write the same folder), and is then renamed into
place; a folder being replaced is first renamed to ``.NAME.old``. This module is the one owner of
those names: ``leftovers`` finds what an interrupted write left, by the same rule.

A rename makes a file whole, not right: a bit flipped or a block rewritten later keeps its length, and
neither torch's zip reader nor safetensors checks content. So a finished folder (a checkpoint, a pipeline
folder) gets ``SHA256SUMS``, in the format ``sha256sum -c`` reads, and ``checksum_problem`` names the first
file that no longer matches it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from .errors import one_line
from .layout import CHECKSUMS

__all__ = [
    "cache_root", "WRITE_ERRORS", "write_problem", "human_size", "temporary", "replaced", "write_atomic", "replace_folder",
    "fsync_tree", "leftovers", "file_digest", "write_checksums", "checksum_problem",
    "read_checksums",
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


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's content, in hex. hashlib.file_digest reads it in blocks of its own choosing (256 KiB
    in CPython 3.11), so memory stays flat for any size."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """Write ``folder/SHA256SUMS``: the digest of every file below ``folder`` except those under the relative
    paths in ``skip`` (a sub-folder with sums of its own). Written atomically, after the files are final."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == CHECKSUMS or any(name == s or name.startswith(f"{s}/") for s in skip):
            continue
        lines.append(f"{file_digest(path)}  {name}\n")
    target = folder / CHECKSUMS
    write_atomic(target, lambda tmp: tmp.write_text("".join(lines)))
    return target


def read_checksums(folder: Path) -> tuple[dict[str, str], str | None]:
    """``folder/SHA256SUMS`` as {relative name: SHA-256}, and what is wrong with the file itself (None: nothing).
    A folder without sums (written before resdiff kept them, or by another tool) gives ({}, None)."""
    sums = folder / CHECKSUMS
    if not sums.is_file():
        return {}, None
    try:
        entries = [line.split("  ", 1) for line in sums.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        return {}, f"{CHECKSUMS} is unreadable ({err})"
    if any(len(entry) != 2 or len(entry[0]) != 64 for entry in entries):
        return {}, f"{CHECKSUMS} is damaged (a line is not '<sha256>  <file>')"
    return {name: digest for digest, name in entries}, None


def checksum_problem(folder: Path) -> str | None:
    """The first file of ``folder`` that does not match ``folder/SHA256SUMS`` (``"model.safetensors does not
    match its SHA-256 in SHA256SUMS: the file is damaged"``), or None when all match or the folder has no sums
    (written before resdiff kept them, or by another tool)."""
    sums, problem = read_checksums(folder)
    if problem:
        return problem
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing (listed in {CHECKSUMS})"
        if file_digest(path) != digest:
            return f"{name} does not match its SHA-256 in {CHECKSUMS}: the file is damaged"
    return None
