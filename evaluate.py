"""`python evaluate.py` in a clone of resdiff: the same program and flags as the installed `resdiff-evaluate` command
(resdiff.cli.evaluate; run it with --help)."""

import sys

from resdiff.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
