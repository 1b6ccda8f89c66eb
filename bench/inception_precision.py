"""Does bf16 autocast or channels_last move FID? Feature extraction speed and FID against float32.

    python -m bench.inception_precision [-n 256] [--size 32]

Two sets of demo-shape images (resdiff.data.demo_shapes, seeds 0 and 1) go through the FID Inception
architecture with `synthetic_weights` (the real weight file cannot be fetched here, so this measures the
arithmetic, not the real features' sensitivity) in each mode; the script prints images/s, the largest
relative feature error against float32 and the FID between the two sets with its relative change.
The issue's bar: bf16 is worth offering only if FID moves by less than 0.1%.
"""

from __future__ import annotations

import time

from bench.common import machine, parser, write_json
from resdiff.data import demo_shapes
from resdiff.features import FeatureStats, extract_features
from resdiff.hardware import bf16_is_native
from resdiff.inception import FIDInceptionV3
from resdiff.testing import synthetic_weights
from resdiff.metrics import fid_from_stats

MODES = {  # name: (channels_last, bf16)
    "float32": (False, False),
    "float32 channels_last": (True, False),
    "bf16": (False, True),
    "bf16 channels_last": (True, True),
}


def main() -> None:
    p = parser(__doc__, "inception_precision")
    p.add_argument("-n", "--num-images", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    print(machine())
    if not bf16_is_native("cpu"):
        print("bf16 is not native on this CPU: extract_features ignores bf16=True here, so the bf16 rows equal float32")
    a = demo_shapes(args.num_images, args.size, seed=0)
    b = demo_shapes(args.num_images, args.size, seed=1)
    rows = {}
    base = None
    for name, (channels_last, bf16) in MODES.items():
        net = FIDInceptionV3()
        net.load_state_dict(synthetic_weights(net))
        extract_features(a[:4], net, 4, channels_last=channels_last, bf16=bf16)  # warm-up
        start = time.perf_counter()
        fa = extract_features(a, net, args.batch_size, channels_last=channels_last, bf16=bf16)
        seconds = time.perf_counter() - start
        fb = extract_features(b, net, args.batch_size, channels_last=channels_last, bf16=bf16)
        fid = fid_from_stats(FeatureStats.from_features(fa), FeatureStats.from_features(fb))
        if base is None:
            base = (fa, fid)
        err = ((fa - base[0]).abs().max() / base[0].abs().max()).item()
        change = abs(fid - base[1]) / base[1]
        rows[name] = {"images_per_s": args.num_images / seconds, "max_rel_feature_error": err, "fid": fid,
                      "fid_rel_change": change}
        print(f"{name:>22}: {args.num_images / seconds:6.1f} images/s, max rel feature error {err:.2e}, "
              f"FID {fid:.6f} (change {100 * change:.4f}%)", flush=True)
    print(f"wrote {write_json('inception_precision', {'images': args.num_images, 'size': args.size, 'rows': rows}, args.json)}")


if __name__ == "__main__":
    main()
