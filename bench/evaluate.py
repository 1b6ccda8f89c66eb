"""Evaluation throughput: evaluate.py's work per image (sampling, then FID Inception features) on this machine.

    python -m bench.evaluate                        # the small preset, 64 samples, DDIM-50, batch 32
    python -m bench.evaluate --preset ddpm-cifar10 --num-images 128

A fresh model of the preset is saved as a run directory and scored with resdiff.evaluation.evaluate
against demo-shape images, with deterministic synthetic Inception weights (the speed of the network
does not depend on its weights; the real file is not fetched). Sampling and feature extraction are also
timed alone, so the table says where the time goes. One process; evaluate.py shards over more.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import parser, report


def saved_model(tmp: Path, preset: str) -> tuple[Path, int]:
    """(TMP/run: a run directory holding a fresh model of ``preset``, its sample size); the reference statistics
    are cached in TMP/cache from here on, not in ~."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from resdiff import UNet

    os.environ["RESDIFF_CACHE"] = str(tmp / "cache")
    torch.manual_seed(0)
    unet = UNet.from_preset(preset, zero_init_last=False)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp / "run" / "model")
    return tmp / "run", unet.config.sample_size


def synthetic_inception(tmp: Path):
    """(the FID Inception network with deterministic synthetic weights, their file TMP/inception.pth)."""
    from resdiff.inception import FIDInceptionV3, load_inception
    from resdiff.testing import synthetic_weights

    torch.save(synthetic_weights(FIDInceptionV3()), tmp / "inception.pth")
    return load_inception(tmp / "inception.pth", sha256=None), tmp / "inception.pth"


def main() -> None:
    p = parser(__doc__, "evaluate")
    p.add_argument("--preset", default="small")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ref-images", type=int, default=64)
    args = p.parse_args()

    from resdiff.data import write_demo_folder
    from resdiff.evaluation import evaluate
    from resdiff.features import extract_features
    from resdiff.sampling import SamplingSettings, generate
    from resdiff.settings import Scoring

    n = args.num_images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run, size = saved_model(tmp, args.preset)
        data = write_demo_folder(tmp / "data", args.ref_images, size)
        net, weights = synthetic_inception(tmp)
        settings = SamplingSettings(sampler="ddim", steps=args.steps, seed=0, batch_size=args.batch_size)
        scoring = Scoring(inception=weights, verify_inception=False, kid_subsets=10)
        start = time.perf_counter()
        images = generate(run, n, settings, progress=False)
        sampling = time.perf_counter() - start
        start = time.perf_counter()
        extract_features(images, net, args.batch_size, channels_last=True)
        features = time.perf_counter() - start
        evaluate(model=run, ref=data, num_images=n, settings=settings, scoring=scoring, log=None)  # caches the reference
        start = time.perf_counter()
        result = evaluate(model=run, ref=data, num_images=n, settings=settings, scoring=scoring, log=None)
        whole = time.perf_counter() - start
    rows = [
        {"part": f"sampling ({args.preset}, DDIM-{args.steps})", "images/s": f"{n / sampling:.2f}"},
        {"part": "Inception features (channels_last, float32)", "images/s": f"{n / features:.2f}"},
        {"part": "evaluate() end to end (reference cached)", "images/s": f"{n / whole:.2f}"},
    ]
    report("evaluate", {"args": vars(args), "rows": rows, "fid": result["fid"]}, args.json, rows, ["part", "images/s"])


if __name__ == "__main__":
    main()
