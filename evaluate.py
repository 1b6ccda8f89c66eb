"""Score a model's samples: FID, KID, precision/recall and memorisation against a reference set.

    python evaluate.py --model runs/NAME --ref DATA_DIR -n 50000            # generate, then score
    python evaluate.py --samples GEN_DIR_or_samples.npz --ref stats.npz     # images from any tool
    torchrun --nproc_per_node 4 evaluate.py --model runs/NAME --ref DATA_DIR -n 50000

--ref is an image folder (prepared as training prepares it: resize, crop, channels; its statistics are
cached), an .npz of images, or a statistics .npz (mu, sigma: published reference files load; FID only).
Features are those of the FID Inception network (pytorch-fid's weights, downloaded on first use, or
--inception PATH). Results go to RUN/eval/<sampler>-<steps>-n<N>-seed<S>.json and RUN/eval/nearest.png.
FID depends on n: compare figures only at the same n.
"""

from __future__ import annotations

import argparse
import sys

from resdiff.diffusion import SAMPLERS
from resdiff.errors import ArgumentParser, UsageError, run_cli
from resdiff.hardware import MIXED_PRECISIONS


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="run directory or pipeline folder to generate samples from")
    what.add_argument("--samples", help="folder of images or .npz (arr_0 uint8 (N, H, W, C)) to score as they are")
    p.add_argument("--ref", required=True, help="reference: image folder, .npz of images, or statistics .npz (mu, sigma)")
    p.add_argument("--num-images", "-n", type=int, default=50000, help="samples to generate (default 50000, FID's usual n)")
    p.add_argument("--sampler", default="ddim", metavar="{" + ",".join(SAMPLERS) + "}", help="default ddim")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's own)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ddim only)")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i) (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each process (default 64)")
    p.add_argument("--class-label", type=int, nargs="+", default=None, metavar="LABEL", help="class-conditional models")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    p.add_argument("--mixed-precision", default="no", metavar="{" + ",".join(MIXED_PRECISIONS) + "}",
                   help="sampling under autocast (default no); features are always float32")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: this process's GPU, else cpu)")
    p.add_argument("--inception", default=None, help="path of pt_inception-2015-12-05-6726825d.pth (offline machines)")
    p.add_argument("--inception-unverified", action="store_true",
                   help="accept Inception weights with another checksum (the figures are then not comparable)")
    p.add_argument("--out", default=None, help="where to write the JSON and nearest.png (default: RUN/eval)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="with several processes: how long one waits for the others")
    return p


def main(argv: list[str] | None = None) -> int:
    def run() -> None:
        args = build_parser().parse_args(argv)
        for flag, value, least in (("--batch-size", args.batch_size, 1), ("--kid-subsets", args.kid_subsets, 1),
                                   ("--kid-subset-size", args.kid_subset_size, 2)):
            if value < least:
                raise UsageError(f"{flag} must be at least {least}, got {value} (see python evaluate.py --help)")
        from resdiff.evaluation import evaluate

        evaluate(
            ref=args.ref, model=args.model, samples=args.samples, num_images=args.num_images, sampler=args.sampler,
            steps=args.steps, seed=args.seed, batch_size=args.batch_size, class_labels=args.class_label,
            guidance_scale=args.guidance_scale, eta=args.eta, device=args.device, mixed_precision=args.mixed_precision,
            inception=args.inception, verify_inception=not args.inception_unverified, out=args.out,
            kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, timeout_s=args.timeout_s,
        )

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
