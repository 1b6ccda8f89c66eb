"""The autoencoder of latent diffusion (issue #38) on a real image set: its reconstruction FID (the floor no latent
model trained in it can beat), how long encoding the set takes, and sampling throughput at full size, a latent model
(sampling, then decoding) against a pixel model of the same recipe.

Reconstructions: n images spread over the folder, encoded and decoded; FID against the whole folder at the same size
(resdiff.evaluation, the FID every benchmark uses), PSNR, and a grid of originals over their reconstructions.
Throughput: the "auto" U-Net train.py builds for each space (random weights: speed does not depend on them),
DDIM at --steps, one batch, after a warm-up batch.

    python -m bench.autoencoder --data data/openmoji256 --autoencoder ../shared/weights --image-size 256 -n 1000
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.common import parser, report


def reconstruct(ae, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float, float]:
    """uint8 reconstructions of uint8 ``images``, and the seconds encoding and decoding took."""
    x = images.float() / 127.5 - 1
    start = time.perf_counter()
    z = ae.encode_many(x, batch_size)
    encoded = time.perf_counter()
    y = ae.decode_many(z, batch_size)
    decoded = time.perf_counter()
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), encoded - start, decoded - encoded


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of two uint8 (N, C, H, W) batches, image by image."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def sampling_rate(latent, size: int, images: int, steps: int) -> float:
    """Images per second of DDIM-``steps`` sampling at ``size`` pixels: in the latent space of ``latent`` (decoding
    included) or, with ``latent`` None, in pixel space."""
    from resdiff import UNet
    from resdiff.diffusion import GaussianDiffusion
    from resdiff.sampling import generate

    side, channels = (size // latent.factor, latent.autoencoder.latent_channels) if latent else (size, 3)
    model = UNet.from_preset("auto", sample_size=side, in_channels=channels).eval()
    scheduler = dict(GaussianDiffusion.from_config(latent=latent is not None).scheduler.config)  # the defaults'
    run = lambda: generate(model, images, sampler="ddim", steps=steps, progress=False, latent=latent,
                           scheduler_config=scheduler)
    run()  # warm-up: allocator, kernels
    start = time.perf_counter()
    out = run()
    assert out.shape[-1] == size
    return images / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__, "autoencoder")
    p.add_argument("--data", type=Path, required=True, help="image folder")
    p.add_argument("--autoencoder", required=True, help="autoencoder SPEC, as train.py --autoencoder takes it")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("-n", "--num-images", type=int, default=1000, help="images reconstructed and scored")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the throughput measurement")
    p.add_argument("--sample-images", type=int, default=8, help="images per throughput measurement")
    p.add_argument("--out", type=Path, help="reconstructions, grid and FID files (default bench/results/autoencoder-DATA)")
    args = p.parse_args()

    from resdiff.autoencoder import LatentNorm, LatentSpace, load_autoencoder
    from resdiff.evaluation import evaluate
    from resdiff.images import make_grid
    from resdiff.reference import load_images

    out = args.out or Path(__file__).resolve().parent / "results" / f"autoencoder-{args.data.name}"
    out.mkdir(parents=True, exist_ok=True)
    ae = load_autoencoder(args.autoencoder)
    images = load_images(args.data, args.image_size, 3)
    pick = np.linspace(0, len(images) - 1, min(args.num_images, len(images))).round().astype(int)
    originals = images[torch.from_numpy(pick)]
    recon, encode_s, decode_s = reconstruct(ae, originals, args.batch_size)
    np.savez(out / "reconstructions.npz", arr_0=recon.permute(0, 2, 3, 1).numpy())
    make_grid(torch.cat([originals[:8], recon[:8]]), cols=8).save(out / "reconstructions.png")
    scored = evaluate(ref=args.data, samples=out / "reconstructions.npz", out=out / "eval", log=None)

    latent = LatentSpace(ae, LatentNorm.uniform(ae.latent_channels, 0.0, 1.0, "benchmark"))
    rates = {space: sampling_rate(latent if space == "latent" else None, args.image_size, args.sample_images, args.steps)
             for space in ("latent", "pixel")}
    n = len(originals)
    row = {"autoencoder": args.autoencoder, "size": args.image_size, "n": n, "fid": round(scored["fid"], 2),
           "psnr_db": round(psnr(originals, recon), 2), "encode_img_s": round(n / encode_s, 2),
           "decode_img_s": round(n / decode_s, 2), "encode_set_min": round(len(images) / (n / encode_s) / 60, 1),
           "latent_sample_img_s": round(rates["latent"], 3), "pixel_sample_img_s": round(rates["pixel"], 3)}
    report("autoencoder", {"data": str(args.data), "set_images": len(images), "steps": args.steps,
                           "grid": str(out / "reconstructions.png"), "result": row}, args.json, [row], list(row))


if __name__ == "__main__":
    main()
