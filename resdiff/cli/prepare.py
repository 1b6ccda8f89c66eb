"""Decode an image folder once into a prepared dataset: `resdiff-prepare DIR OUT --image-size 64`
(`python -m resdiff.prepare` too). The program is resdiff.prepare's; this is its installed entry point."""

from __future__ import annotations

import sys

from ..errors import run_cli


def main(argv: list[str] | None = None) -> int:
    from ..prepare import main as prepare_main

    return run_cli(lambda: prepare_main(argv))


if __name__ == "__main__":
    sys.exit(main())
