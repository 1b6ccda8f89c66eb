"""`python sample.py` in a clone of resdiff: the same program and flags as the installed `resdiff-sample` command
(resdiff.cli.sample; run it with --help)."""

import sys

from resdiff.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
