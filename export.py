"""`python export.py` in a clone of resdiff: the same program and flags as the installed `resdiff-export` command
(resdiff.cli.export; run it with --help)."""

import sys

from resdiff.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
