"""Generate images from a trained model: `resdiff-sample --model runs/NAME --num-images 64` (`python sample.py` in a
clone).

Runs on one process, or on several with `torchrun --nproc_per_node N sample.py ...` /
`accelerate launch sample.py ...`: each process makes its share of the images.

Editing (resdiff.editing): `--inpaint IMAGE [--mask MASK]` keeps the mask's white pixels (or the image's
opaque ones) and generates the rest; `--init IMAGE --strength S` is image-to-image; `--interpolate SEED_A
SEED_B --frames N` walks between two seeds' noise.

No flag may be a prefix of a torchrun or accelerate launcher option (they parse abbreviations even
after the script name), hence `--num-images`, never a bare `--num`.
"""

from __future__ import annotations

import sys

from ..errors import ArgumentParser, run_cli
from ..settings import (DEFAULT_FRAMES, DEFAULT_IMAGES, DEFAULT_RESAMPLE, DEFAULT_STRENGTH, DETERMINISTIC_SAMPLERS,
                        INPAINT_SAMPLERS, SamplingSettings, add_arguments)
from . import invoked_as

PLAIN_IMAGES = 64  # --num-images' default (editing: DEFAULT_IMAGES)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=invoked_as("sample.py"), description="Generate images from a resdiff run directory or diffusers pipeline folder.")
    p.add_argument("--model", required=True,
                   help="run directory (its model/, else its newest checkpoint's ema/) or pipeline folder")
    p.add_argument("--num-images", "-n", type=int, default=None,
                   help=f"how many images in all (default {PLAIN_IMAGES}; {DEFAULT_IMAGES} when editing)")
    add_arguments(p)  # --sampler, --steps, --eta, --seed, --batch-size, --class-label, --guidance-scale, ...
    p.add_argument("--out", default=None, help="output folder (default: a new RUN/samples-<sampler>-<steps>-seed<seed>[-N]/)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz: uint8 arr_0 of shape (N, H, W, C) for FID tools")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net's blocks: slow start, faster for many images")
    edit = p.add_argument_group("editing (one of --inpaint, --init, --interpolate)")
    mode = edit.add_mutually_exclusive_group()
    mode.add_argument("--inpaint", metavar="IMAGE", default=None,
                      help="keep the pixels --mask marks white (or IMAGE's opaque pixels) and generate the rest "
                           "(RePaint; samplers " + ", ".join(INPAINT_SAMPLERS) + ")")
    edit.add_argument("--mask", default=None, help="for --inpaint: white = keep, black = generate (grayscale, the size of IMAGE)")
    edit.add_argument("--resample", type=int, default=None,
                      help=f"for --inpaint: RePaint's repeats per step, each after a jump back (default {DEFAULT_RESAMPLE})")
    mode.add_argument("--init", metavar="IMAGE", default=None, help="image to image (SDEdit): start from IMAGE noised to --strength")
    edit.add_argument("--strength", type=float, default=None,
                      help=f"for --init: 0 returns the image, 1 samples from scratch (default {DEFAULT_STRENGTH})")
    mode.add_argument("--interpolate", type=int, nargs=2, default=None, metavar=("SEED_A", "SEED_B"),
                      help="frames between image 0 of two seeds (deterministic samplers: " + ", ".join(DETERMINISTIC_SAMPLERS) + ")")
    edit.add_argument("--frames", type=int, default=None, help=f"for --interpolate: how many frames, ends included (default {DEFAULT_FRAMES})")
    edit.add_argument("--gif", action="store_true", help="for --interpolate: also write frames.gif")
    return p


def _edit(args):
    """The edit the flags ask for (None: plain sampling); a flag of another mode is a mistake, not ignored."""
    from ..errors import UsageError

    belongs = {"--mask": "--inpaint", "--resample": "--inpaint", "--strength": "--init", "--frames": "--interpolate",
               "--gif": "--interpolate"}
    chosen = next((flag for flag in ("--inpaint", "--init", "--interpolate") if getattr(args, flag[2:]) is not None), None)
    for flag, mode in belongs.items():
        if getattr(args, flag[2:]) not in (None, False) and mode != chosen:
            raise UsageError(f"{flag} goes with {mode}")
    if chosen == "--interpolate" and args.num_images is not None:
        raise UsageError("--interpolate makes --frames images; drop --num-images")
    if chosen is None:
        return None
    from .. import editing

    if chosen == "--inpaint":
        return editing.Inpaint(args.inpaint, args.mask, DEFAULT_RESAMPLE if args.resample is None else args.resample)
    if chosen == "--init":
        return editing.Img2Img(args.init, DEFAULT_STRENGTH if args.strength is None else args.strength)
    return editing.Interpolate(*args.interpolate, DEFAULT_FRAMES if args.frames is None else args.frames, gif=args.gif)


def main(argv: list[str] | None = None) -> int:
    def run() -> None:
        args = build_parser().parse_args(argv)
        edit = _edit(args)
        if edit is not None and (args.npz or args.no_grid or args.compile):
            from ..errors import UsageError

            raise UsageError("--npz, --no-grid and --compile are for plain sampling, not editing")
        from ..editing import Interpolate
        from ..sampling import sample_to_folder

        if isinstance(edit, Interpolate):
            num_images = edit.frames
        elif args.num_images is not None:
            num_images = args.num_images
        else:
            num_images = PLAIN_IMAGES if edit is None else DEFAULT_IMAGES

        settings = SamplingSettings.from_args(args, edit)  # interpolation: its own sampler
        sample_to_folder(args.model, num_images, settings, edit=edit, out=args.out, npz=args.npz, grid=not args.no_grid)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
