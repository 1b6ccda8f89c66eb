"""Evaluation throughput: evaluate.py's work per image (sampling, then FID Inception features) on this machine.

    python bench/evaluate.py                        # the small preset, 64 samples, DDIM-50, batch 32
    python bench/evaluate.py --preset ddpm-cifar10 --num-images 128

A fresh model of the preset is saved as a run directory and scored with resdiff.evaluation.evaluate
against demo-shape images, with deterministic synthetic Inception weights (the speed of the network
does not depend on its weights; the real file is not fetched). Sampling and feature extraction are also
timed alone, so the table says where the time goes. One process; evaluate.py shards over more.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench.common import machine, table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ref-images", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from diffusers import DDPMPipeline, DDPMScheduler
    from PIL import Image

    from resdiff import UNet
    from resdiff.data import demo_shapes
    from resdiff.evaluation import evaluate
    from resdiff.settings import Scoring
    from resdiff.inception import FIDInceptionV3, load_inception, synthetic_weights
    from resdiff.features import extract_features
    from resdiff.sampling import SamplingSettings, generate

    print(machine())
    n = args.num_images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["RESDIFF_CACHE"] = str(tmp / "cache")  # the reference statistics are cached there, not in ~
        torch.manual_seed(0)
        unet = UNet.from_preset(args.preset, zero_init_last=False)
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp / "run" / "model")
        size = unet.config.sample_size
        (tmp / "data").mkdir()
        for i, image in enumerate(demo_shapes(args.ref_images, size).permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image).save(tmp / "data" / f"{i:03d}.png")
        torch.save(synthetic_weights(FIDInceptionV3()), tmp / "inception.pth")
        net = load_inception(tmp / "inception.pth", sha256=None)

        settings = SamplingSettings(sampler="ddim", steps=args.steps, seed=0, batch_size=args.batch_size)
        scoring = Scoring(inception=tmp / "inception.pth", verify_inception=False, kid_subsets=10)
        start = time.perf_counter()
        images = generate(tmp / "run", n, settings, progress=False)
        sampling = time.perf_counter() - start
        start = time.perf_counter()
        extract_features(images, net, args.batch_size, channels_last=True)
        features = time.perf_counter() - start
        evaluate(model=tmp / "run", ref=tmp / "data", num_images=n, settings=settings, scoring=scoring,
                 log=None)  # warm: the reference is cached now
        start = time.perf_counter()
        result = evaluate(model=tmp / "run", ref=tmp / "data", num_images=n, settings=settings, scoring=scoring, log=None)
        whole = time.perf_counter() - start
    rows = [
        {"part": f"sampling ({args.preset}, DDIM-{args.steps})", "images/s": f"{n / sampling:.2f}"},
        {"part": "Inception features (channels_last, float32)", "images/s": f"{n / features:.2f}"},
        {"part": "evaluate() end to end (reference cached)", "images/s": f"{n / whole:.2f}"},
    ]
    print(table(rows, ["part", "images/s"]))
    path = write_json("evaluate", {"args": vars(args), "rows": rows, "fid": result["fid"]}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
