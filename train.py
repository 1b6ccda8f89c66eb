"""`python train.py` in a clone of resdiff: the same program and flags as the installed `resdiff-train` command
(resdiff.cli.train; run it with --help)."""

import sys

from resdiff.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
