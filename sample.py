"""Generate images from a trained model: `python sample.py --model runs/NAME --num-images 64`.

Runs on one process, or on several with `torchrun --nproc_per_node N sample.py ...` /
`accelerate launch sample.py ...`: each process makes its share of the images.

No flag may be a prefix of a torchrun or accelerate launcher option (they parse abbreviations even
after the script name), hence `--num-images`, never a bare `--num`.
"""

from __future__ import annotations

import sys

from resdiff.diffusion import SAMPLERS
from resdiff.errors import ArgumentParser, run_cli
from resdiff.hardware import MIXED_PRECISIONS


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="sample.py", description="Generate images from a resdiff run directory or diffusers pipeline folder.")
    p.add_argument("--model", required=True,
                   help="run directory (its model/, else its newest checkpoint's ema/) or pipeline folder")
    p.add_argument("--num-images", "-n", type=int, default=64, help="how many images in all (default 64)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    def run() -> None:
        args = build_parser().parse_args(argv)
        from resdiff.sampling import sample_to_folder

        sample_to_folder(
            args.model, args.num_images, out=args.out, sampler=args.sampler, steps=args.steps, seed=args.seed,
            batch_size=args.batch_size, class_labels=args.class_label, guidance_scale=args.guidance_scale,
            eta=args.eta, device=args.device, mixed_precision=args.mixed_precision, npz=args.npz, grid=not args.no_grid,
            compile=args.compile, timeout_s=args.timeout_s,
        )

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
