"""The command-line programs: each module parses its flags and makes one call into the library.

    resdiff-train     (python train.py)             resdiff.cli.train
    resdiff-sample    (python sample.py)            resdiff.cli.sample
    resdiff-evaluate  (python evaluate.py)          resdiff.cli.evaluate
    resdiff-prepare   (python -m resdiff.prepare)   resdiff.cli.prepare

pip installs the ``resdiff-*`` commands (pyproject.toml's ``[project.scripts]``); the top-level scripts of a clone
call the same ``main`` functions, so both take the same flags. A parser's module imports no torch, so ``--help``
answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path


def invoked_as(script: str) -> str:
    """How the user started this program, for help and error lines: ``resdiff-train`` for the installed command,
    ``python train.py`` for the script of a clone (``script`` is that script's name)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("resdiff-") else f"python {script}"
