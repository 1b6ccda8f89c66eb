"""Proof that resdiff.inception.FIDInceptionV3 is pytorch-fid's FID Inception network.

Runs in a throw-away environment that has torch + torchvision + pytorch-fid (they cannot be installed
next to the project's CPU torch), e.g.

    python3 -m venv /tmp/fidenv
    /tmp/fidenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid
    /tmp/fidenv/bin/python -m bench.inception_equivalence [--write-fixture]   # from the repository root

Both networks get the same deterministic state_dict (`synthetic_weights`: each tensor from a seed
derived from its key); pytorch-fid's `fid_inception_v3` receives it through its own loader (patched to
return it instead of downloading). The script prints, per input size, the largest absolute and relative
feature difference, checks the parameter names against torchvision's patched model, compares
resdiff's Fréchet distance with pytorch-fid's (scipy.linalg.sqrtm), and with --write-fixture stores
pytorch-fid's features of three small inputs in tests/data/inception_expected.npz for the test suite.

resdiff is imported without its package __init__ (which needs diffusers): a stub package points at
the source folder, and resdiff.inception, resdiff.features and resdiff.metrics need only torch, numpy and pillow.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "inception_expected.npz"
SIZES = [(32, 32), (64, 64), (299, 299), (40, 72), (512, 384)]
FIXTURE_INPUTS = [(1, 16, 16), (3, 32, 32), (3, 24, 40)]  # (channels, H, W), one image each
FIXTURE_DIMS = 16


def import_resdiff():
    """resdiff.inception, resdiff.features and resdiff.metrics without resdiff/__init__.py (no diffusers here)."""
    if "resdiff" not in sys.modules:
        stub = types.ModuleType("resdiff")
        stub.__path__ = [str(ROOT / "resdiff")]
        sys.modules["resdiff"] = stub
    import resdiff.inception as inception
    return inception


def images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Deterministic uint8 (n, c, h, w) test images: smooth gradients plus noise, from numpy's PCG64."""
    u = np.random.Generator(np.random.PCG64(seed)).random((n, c, h, w))
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = 0.5 * (yy + xx)[None, None]
    return torch.from_numpy((255 * (0.6 * smooth + 0.4 * u)).astype(np.uint8))


def pytorch_fid_net(state: dict) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (2048-d block, resize and normalise on), built with `state` as its weights."""
    import pytorch_fid.inception as pfi

    pfi.load_state_dict_from_url = lambda *args, **kwargs: state  # fid_inception_v3 loads strictly from this
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float [0, 1], 1 channel repeated to 3: what torchvision's ToTensor gives pytorch-fid."""
    x = x.float().div(255)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-fixture", action="store_true", help=f"write {FIXTURE.relative_to(ROOT)}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import pytorch_fid
    import scipy
    import torchvision

    inception = import_resdiff()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, pytorch-fid {pytorch_fid.__version__}, "
          f"scipy {scipy.__version__}, numpy {np.__version__}")

    ours = inception.FIDInceptionV3()
    from resdiff.testing import synthetic_weights  # torch and numpy only, as the stub package allows

    state = synthetic_weights(ours, seed=0)
    ref = pytorch_fid_net(state)
    ours.load_state_dict(state, strict=True)
    ours.eval()

    # the same names and shapes as pytorch-fid's patched torchvision model (what the real weight file fills)
    import pytorch_fid.inception as pfi
    tv = pfi.fid_inception_v3()
    tv_shapes = {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    print(f"state_dict keys: torchvision-patched {len(tv_shapes)}, resdiff {len(our_shapes)}, "
          f"identical names and shapes: {tv_shapes == our_shapes}")
    assert tv_shapes == our_shapes
    ours.load_state_dict(tv.state_dict(), strict=True)  # and torchvision's own tensors load strictly

    worst = 0.0
    print(f"{'input':>16} {'max |diff|':>11} {'max |ref|':>10} {'rel':>9}")
    with torch.inference_mode():
        for k, (h, w) in enumerate(SIZES):
            x = to_unit(images(2, 3, h, w, seed=100 + k))
            a, b = ours(x), ref(x)[0].flatten(1)
            diff = (a - b).abs().max().item()
            rel = diff / b.abs().max().item()
            worst = max(worst, rel)
            print(f"{f'2x3x{h}x{w}':>16} {diff:11.3e} {b.abs().max().item():10.4f} {rel:9.2e}")
    print(f"largest relative difference {worst:.2e} (float32 eps 1.19e-07)")

    # negative control: torchvision's stock Inception3 (its pooling counts the padding, Mixed_7c
    # average-pools) with the same weights must differ, or the comparison above could not tell
    stock = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    stock.load_state_dict(state, strict=True)
    stock.eval()
    with torch.inference_mode():
        x = to_unit(images(2, 3, 64, 64, seed=101))
        y = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for name, layer in stock.named_children():
            if name in ("AuxLogits", "dropout", "fc"):
                continue
            y = layer(y)
        y, b = y.flatten(1), ref(x)[0].flatten(1)
        print(f"control, torchvision's stock blocks vs pytorch-fid: relative diff "
              f"{((y - b).abs().max() / b.abs().max()).item():.2e} (must be far above float32 eps)")

    fixture = {}
    with torch.inference_mode():
        for k, (c, h, w) in enumerate(FIXTURE_INPUTS):
            x = images(1, c, h, w, seed=200 + k)
            f = ref(to_unit(x))[0].flatten(1).double()
            fixture[f"input{k}"] = x.numpy()
            fixture[f"head{k}"] = f[:, :FIXTURE_DIMS].numpy()
            fixture[f"sum{k}"] = f.sum(1).numpy()
            fixture[f"sumsq{k}"] = (f * f).sum(1).numpy()
            ourf = ours(to_unit(x)).double()
            print(f"fixture input {k} {tuple(x.shape)}: |sum diff| {abs(ourf.sum() - f.sum()).item():.2e}")
    layout = "\n".join(f"{k}:{list(v)}" for k, v in tv_shapes.items())  # torchvision-patched names and shapes
    fixture["keys_sha256"] = np.array(hashlib.sha256(layout.encode()).hexdigest())
    fixture["weights_sum"] = np.array(sum(float(v.double().sum()) for v in state.values()))

    # resdiff's Fréchet distance against pytorch-fid's (scipy.linalg.sqrtm) on features of both networks
    from pytorch_fid.fid_score import calculate_frechet_distance
    import resdiff.features as features
    import resdiff.metrics as metrics

    with torch.inference_mode():
        xa, xb = to_unit(images(24, 3, 32, 32, seed=300)), to_unit(images(24, 3, 32, 32, seed=301)).flip(-1)
        fa, fb = ours(xa).double().numpy(), ours(xb).double().numpy()
        ra, rb = ref(xa)[0].flatten(1).double().numpy(), ref(xb)[0].flatten(1).double().numpy()
    theirs = calculate_frechet_distance(ra.mean(0), np.cov(ra, rowvar=False), rb.mean(0), np.cov(rb, rowvar=False))
    sa, sb = features.FeatureStats(2048), features.FeatureStats(2048)
    sa.update(torch.from_numpy(fa)), sb.update(torch.from_numpy(fb))
    mine = metrics.fid_from_stats(sa, sb)
    print(f"FID of 24 vs 24 images: pytorch-fid {theirs:.6f}, resdiff {mine:.6f}, relative diff {abs(mine - theirs) / theirs:.2e}")

    # and on well-conditioned 2048-d statistics (random Wishart covariances), where sqrtm is accurate
    rng = np.random.Generator(np.random.PCG64(7))
    za, zb = rng.standard_normal((4096, 2048)), rng.standard_normal((4096, 2048)) * 1.1 + 0.05
    ma, mb, ca, cb = za.mean(0), zb.mean(0), np.cov(za, rowvar=False), np.cov(zb, rowvar=False)
    theirs, mine = calculate_frechet_distance(ma, ca, mb, cb), metrics.frechet_distance(ma, ca, mb, cb)
    print(f"Frechet distance of random 2048-d statistics: scipy.linalg.sqrtm {theirs:.9f}, resdiff {mine:.9f}, "
          f"relative diff {abs(mine - theirs) / theirs:.2e}")

    if args.write_fixture:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(FIXTURE, **fixture)
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
