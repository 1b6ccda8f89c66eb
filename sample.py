"""Generate images from a trained model: `python sample.py --model runs/NAME --num-images 64`.

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

from resdiff.diffusion import SAMPLERS
from resdiff.editing import DEFAULT_RESAMPLE, DETERMINISTIC_SAMPLERS, INPAINT_SAMPLERS
from resdiff.errors import ArgumentParser, run_cli
from resdiff.hardware import MIXED_PRECISIONS


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="sample.py", description="Generate images from a resdiff run directory or diffusers pipeline folder.")
    p.add_argument("--model", required=True,
                   help="run directory (its model/, else its newest checkpoint's ema/) or pipeline folder")
    p.add_argument("--num-images", "-n", type=int, default=None, help="how many images in all (default 64; 8 when editing)")
    p.add_argument("--sampler", default="ddim", metavar="{" + ",".join(SAMPLERS) + "}", help="default ddim")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's own: "
                   + ", ".join(f"{k} {v[1]}" for k, v in SAMPLERS.items()) + ")")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 like DDPM (ddim only)")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i) (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each process (default 64)")
    p.add_argument("--out", default=None, help="output folder (default: a new RUN/samples-<sampler>-<steps>-seed<seed>[-N]/)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz: uint8 arr_0 of shape (N, H, W, C) for FID tools")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--mixed-precision", default="no", metavar="{" + ",".join(MIXED_PRECISIONS) + "}", help="run the model under autocast (default no)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net's blocks: slow start, faster for many images")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: this process's GPU, else cpu)")
    p.add_argument("--class-label", type=int, nargs="+", default=None, metavar="LABEL",
                   help="class-conditional models: one label for all images, or several cycled over the images")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale (default 1: none)")
    p.add_argument("--timeout-s", type=float, default=1800.0,
                   help="with several processes: how long one waits for the others before giving up (default 1800)")
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
                      help="for --init: 0 returns the image, 1 samples from scratch (default 0.6)")
    mode.add_argument("--interpolate", type=int, nargs=2, default=None, metavar=("SEED_A", "SEED_B"),
                      help="frames between image 0 of two seeds (deterministic samplers: " + ", ".join(DETERMINISTIC_SAMPLERS) + ")")
    edit.add_argument("--frames", type=int, default=None, help="for --interpolate: how many frames, ends included (default 8)")
    edit.add_argument("--gif", action="store_true", help="for --interpolate: also write frames.gif")
    return p


def _edit(args):
    """The edit the flags ask for (None: plain sampling); a flag of another mode is a mistake, not ignored."""
    from resdiff.errors import UsageError

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
    from resdiff import editing

    if chosen == "--inpaint":
        return editing.Inpaint(args.inpaint, args.mask, DEFAULT_RESAMPLE if args.resample is None else args.resample)
    if chosen == "--init":
        return editing.Img2Img(args.init, 0.6 if args.strength is None else args.strength)
    return editing.Interpolate(*args.interpolate, 8 if args.frames is None else args.frames)


def main(argv: list[str] | None = None) -> int:
    def run() -> None:
        args = build_parser().parse_args(argv)
        edit = _edit(args)
        common = dict(out=args.out, sampler=args.sampler, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                      class_labels=args.class_label, guidance_scale=args.guidance_scale, eta=args.eta,
                      device=args.device, mixed_precision=args.mixed_precision, timeout_s=args.timeout_s)
        if edit is None:
            from resdiff.sampling import sample_to_folder

            num_images = 64 if args.num_images is None else args.num_images
            sample_to_folder(args.model, num_images, npz=args.npz, grid=not args.no_grid, compile=args.compile, **common)
            return
        from resdiff.editing import Interpolate, edit_to_folder
        from resdiff.errors import UsageError

        if args.npz or args.no_grid or args.compile:
            raise UsageError("--npz, --no-grid and --compile are for plain sampling, not editing")
        num_images = edit.frames if isinstance(edit, Interpolate) else 8 if args.num_images is None else args.num_images
        edit_to_folder(args.model, edit, num_images, gif=args.gif, **common)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
