"""A trained model as a folder to share, with its model card (README.md) and SHA256SUMS: `resdiff-export RUN OUT`
(`python export.py` in a clone).

    resdiff-export runs/pets pets-ddpm --diffusers   # diffusers' own classes: loads without resdiff
    resdiff-export runs/pets pets-resdiff            # resdiff's format: every architecture; `import resdiff` to load
    hf upload USER/pets-ddpm pets-ddpm .             # then share it on the Hugging Face Hub
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ArgumentParser, run_cli
from . import invoked_as


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=invoked_as("export.py"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory (its model/), a checkpoint's ema/ or a pipeline folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist)")
    p.add_argument("--diffusers", action="store_true",
                   help="convert the U-Net to diffusers' UNet2DModel (exactly), so the folder loads with diffusers "
                        "alone; refused for an architecture diffusers cannot express")
    return p


def main(argv: list[str] | None = None) -> int:
    """Everything resdiff-export does, for the arguments ``argv`` (default: the command line); the exit code."""
    def run() -> None:
        args = build_parser().parse_args(argv)
        from ..card import CARD
        from ..export import export_folder

        out = export_folder(args.run, args.out, diffusers=args.diffusers)
        kind = "diffusers' UNet2DModel and DDPMScheduler" if args.diffusers else "resdiff's UNet (`import resdiff` to load)"
        print(f"exported {out} ({kind}); its card is {out / CARD}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
