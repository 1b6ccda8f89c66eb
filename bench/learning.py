"""Time to quality: how fast each U-Net learns, measured by the quality of its samples.

Data: 16x16 grayscale digits drawn procedurally here (Pillow's built-in font, random size, position,
slant, stroke and brightness): nothing to download, and apart from what the unit tests use.
Quality: the Frechet distance between the features of generated and held-out real images, in a
small CIFAR ResNet (resdiff.resnet) trained here to classify the digits; lower is better. The
benchmark first checks that the measure ranks real held-out images < slightly blurred ones < noise.

Contenders, all trained by one loop (bench/loops.py's ExampleLoop with resdiff's diffusion loss, Adam,
clipping, an EMA with warm-up), so that only the network and the recipe differ:
    resdiff @ ddpm      resdiff's UNet (the tiny preset at the widths below), the DDPM paper's recipe
    diffusers @ ddpm    diffusers' UNet2DModel of the same architecture, the same recipe
    resdiff @ fast      resdiff's UNet, resdiff's default recipe (Config(): v on the cosine schedule)
    resdiff (old init)  resdiff's UNet with the initialisation it had before this benchmark existed
Each is sampled with DDIM-50 from its EMA weights at the listed steps, and scored.

    python -m bench.learning                          # 250 / 500 / 1000 steps, 512 samples: about 30 min on 2 cores
    python -m bench.learning --steps 100 200 --samples 256 --contenders "resdiff @ ddpm" "diffusers @ ddpm"
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bench.common import parser, report
from bench.loops import ExampleLoop

SIZE = 16
# The model of the comparison: ~1.7M parameters (the tiny preset at these widths; diffusers' twin below).
MODEL = dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,), norm_groups=8)
# diffusers puts no GroupNorm before the middle attention of a scale-shift UNet2DModel: the same here, for an exact twin.
TWIN = dict(mid_attention_norm=False)


# ----------------------------------------------------------------------------------------- data


def digits(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` grayscale images of digits, uint8 (n, 1, size, size), and their labels (n,)."""
    rng = np.random.default_rng(seed)
    big = 4 * size  # draw large, then shrink with antialiasing
    images, labels = np.empty((n, 1, size, size), np.uint8), rng.integers(0, 10, n)
    fonts = {s: ImageFont.load_default(size=s) for s in range(int(2.0 * size), int(3.4 * size) + 1, 2)}
    for i, label in enumerate(labels):
        fg, bg = int(rng.integers(170, 256)), int(rng.integers(0, 40))
        canvas = Image.new("L", (big, big), bg)
        font = fonts[int(rng.choice(list(fonts)))]
        draw = ImageDraw.Draw(canvas)
        box = draw.textbbox((0, 0), str(label), font=font, stroke_width=int(rng.integers(0, 3)))
        w, h = box[2] - box[0], box[3] - box[1]
        x = (big - w) / 2 - box[0] + rng.normal(0, big * 0.05)
        y = (big - h) / 2 - box[1] + rng.normal(0, big * 0.05)
        draw.text((x, y), str(label), fill=fg, font=font, stroke_width=int(rng.integers(0, 3)), stroke_fill=fg)
        canvas = canvas.rotate(float(rng.normal(0, 10)), resample=Image.Resampling.BICUBIC, fillcolor=bg)
        images[i, 0] = np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS))
    return torch.from_numpy(images), torch.from_numpy(labels)


def to_model(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


# ---------------------------------------------------------------------------------- the measure


class FeatureDistance:
    """Frechet distance in the pooled features of a CIFAR ResNet trained to classify the digits."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, epochs: int = 2, seed: int = 0):
        from resdiff.resnet import resnet20

        torch.manual_seed(seed)
        self.net = resnet20(in_channels=1, num_classes=10)
        opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        steps = epochs * (len(images) // 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
        self.net.train()
        for step in range(steps):
            idx = torch.randint(0, len(images), (128,))
            loss = F.cross_entropy(self.net(to_model(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        self.net.eval()
        self.train_loss = float(loss.detach())
        self.reference = self.stats(reference)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return torch.cat([self.net.forward_features(to_model(b)) for b in images.split(256)]).double().numpy()

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            return float((self.net.fc(torch.from_numpy(self.features(images)).float()).argmax(1) == labels).float().mean())

    def stats(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        f = self.features(images)
        return f.mean(0), np.cov(f, rowvar=False)

    def __call__(self, images: torch.Tensor) -> float:
        (m1, s1), (m2, s2) = self.stats(images), self.reference
        # tr(sqrt(s1 s2)) from the eigenvalues of s1 s2 (real and >= 0 up to rounding for PSD s1, s2)
        eig = np.linalg.eigvals(s1 @ s2)
        return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


# ---------------------------------------------------------------------------------- contenders


@dataclass
class Recipe:
    """What the paper or the config sets: objective, schedule, optimiser."""

    prediction_type: str
    beta_schedule: str
    lr: float
    warmup: int
    ema: float


RECIPES = {
    # Ho et al. 2020 (the cifar10 config at a short-run EMA): epsilon, linear betas, Adam 2e-4, clip 1.
    "ddpm": Recipe("epsilon", "linear", 2e-4, 0, 0.999),
    # resdiff's default recipe, Config(): v-prediction on the cosine schedule, lr 1e-3.
    "fast": Recipe("v_prediction", "squaredcos_cap_v2", 1e-3, 50, 0.995),
}


def resdiff_unet(seed: int) -> torch.nn.Module:
    from resdiff import UNet

    torch.manual_seed(seed)
    return UNet.from_preset("tiny", sample_size=SIZE, in_channels=1, **MODEL, **TWIN)


def diffusers_unet(seed: int) -> torch.nn.Module:
    """diffusers' UNet2DModel with the blocks and widths of ``resdiff_unet``, built and initialised by diffusers."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    levels = len(MODEL["channel_mult"])
    res = [SIZE // 2**i for i in range(levels)]
    down = tuple("AttnDownBlock2D" if r in MODEL["attention_resolutions"] else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in MODEL["attention_resolutions"] else "UpBlock2D" for r in reversed(res))
    return UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=tuple(MODEL["channels"] * m for m in MODEL["channel_mult"]),
        layers_per_block=MODEL["num_res_blocks"], down_block_types=down, up_block_types=up, norm_num_groups=MODEL["norm_groups"],
        resnet_time_scale_shift="scale_shift", flip_sin_to_cos=True, freq_shift=0, attention_head_dim=None,
    )


def resdiff_unet_kaiming(seed: int) -> torch.nn.Module:
    """resdiff's UNet initialised as resdiff did before 2026-11-27 (Kaiming-normal, ReLU gain; zeroed ResBlock ends;
    output conv x0.1), kept here to show what the change of initialisation bought."""
    from torch import nn

    from resdiff.nn import ResBlock

    model = resdiff_unet(seed)
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, ResBlock):
            nn.init.zeros_(getattr(m, m.branch_end).weight)
    model.out[-1].weight.data.mul_(0.1)
    return model


CONTENDERS: dict[str, tuple[Callable[[int], torch.nn.Module], str]] = {
    "resdiff @ ddpm": (resdiff_unet, "ddpm"),
    "diffusers @ ddpm": (diffusers_unet, "ddpm"),
    "resdiff @ fast": (resdiff_unet, "fast"),
    "resdiff (old init) @ ddpm": (resdiff_unet_kaiming, "ddpm"),
    "resdiff (old init) @ fast": (resdiff_unet_kaiming, "fast"),
}


# ------------------------------------------------------------------------------- train and score


def scheduler_config(recipe: Recipe) -> dict:
    return dict(num_train_timesteps=1000, beta_schedule=recipe.beta_schedule, beta_start=1e-4, beta_end=0.02,
                prediction_type=recipe.prediction_type, clip_sample=True)


@torch.no_grad()
def sample(model: torch.nn.Module, recipe: Recipe, n: int, seed: int, steps: int = 50, batch: int = 256) -> torch.Tensor:
    """DDIM samples of ``model`` as uint8 (n, 1, SIZE, SIZE)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**scheduler_config(recipe))
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(0, n, batch):
        x = torch.randn(min(batch, n - k), 1, SIZE, SIZE, generator=g)
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def train(name: str, data: torch.Tensor, checkpoints: list[int], score: Callable[[torch.Tensor], float], *,
          batch: int, samples: int, seed: int) -> list[dict]:
    """Train one contender, scoring its EMA model at each of ``checkpoints`` (optimizer steps)."""
    from accelerate import Accelerator

    from resdiff.diffusion import GaussianDiffusion

    build, recipe_name = CONTENDERS[name]
    recipe = RECIPES[recipe_name]
    diffusion = GaussianDiffusion.from_config(**{k: v for k, v in scheduler_config(recipe).items() if k != "clip_sample"})
    warmup = (lambda s: min(1.0, (s + 1) / recipe.warmup)) if recipe.warmup else (lambda s: 1.0)
    loop = ExampleLoop(build(seed), Accelerator(mixed_precision="no", cpu=True),
                       optimizer=dict(lr=recipe.lr, weight_decay=0.0),  # Adam: AdamW without weight decay
                       ema=dict(decay=recipe.ema, use_ema_warmup=False, min_decay=0.0),  # (1+n)/(10+n) up to `ema`
                       lr_schedule=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup), loss=diffusion.loss)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    rows, trained, step = [], 0.0, 0
    for target in checkpoints:
        start = time.perf_counter()
        while step < target:
            loss = loop.step(to_model(data[torch.randint(0, len(data), (batch,), generator=g)]))
            step += 1
        trained += time.perf_counter() - start
        t0 = time.perf_counter()
        fd = score(sample(loop.ema_model(), recipe, samples, seed=1234))
        rows.append({"contender": name, "steps": step, "train s": round(trained, 1), "FD": round(fd, 2),
                     "loss": round(float(loss.detach()), 4), "score s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def check_measure(score: FeatureDistance, held_out: torch.Tensor, seed: int) -> dict:
    """The measure must rank real held-out images < slightly blurred ones < noise, or its figures mean nothing."""
    blurred = torch.from_numpy(np.stack([
        np.asarray(Image.fromarray(im[0].numpy()).filter(ImageFilter.GaussianBlur(0.6)))[None] for im in held_out]))
    noise = torch.randint(0, 256, held_out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    ranks = {"real held-out": score(held_out), "blurred (0.6 px)": score(blurred), "uniform noise": score(noise)}
    values = list(ranks.values())
    if not values[0] < values[1] < values[2]:
        raise SystemExit(f"the quality measure does not rank real < blurred < noise: {ranks}")
    return {k: round(v, 2) for k, v in ranks.items()}


def main() -> None:
    p = parser(__doc__, "learning")
    p.add_argument("--steps", type=int, nargs="+", default=[250, 500, 1000], help="optimizer steps at which to score")
    p.add_argument("--contenders", nargs="*", default=list(CONTENDERS)[:4], choices=list(CONTENDERS),
                   help="none: only the check of the measure")
    p.add_argument("--images", type=int, default=4000, help="training images (as many again are drawn for the reference)")
    p.add_argument("--samples", type=int, default=512, help="generated images per score (and held-out real ones)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    start = time.perf_counter()
    train_x, train_y = digits(args.images, seed=args.seed)
    ref_x, ref_y = digits(args.images, seed=args.seed + 1)  # the measure's reference: never trained on
    held_out = digits(args.samples, seed=args.seed + 2)[0]
    score = FeatureDistance(torch.cat([train_x, ref_x]), torch.cat([train_y, ref_y]), ref_x, seed=args.seed)
    sanity = check_measure(score, held_out, args.seed)
    accuracy = score.accuracy(*digits(1000, seed=args.seed + 3))
    print(f"measure: classifier accuracy {accuracy:.3f} on fresh digits; FD of {json.dumps(sanity)} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows = []
    for name in args.contenders:
        rows += train(name, train_x, sorted(args.steps), score, batch=args.batch_size, samples=args.samples, seed=args.seed)
    report("learning", {"measure": {"accuracy": accuracy, **sanity}, "model": MODEL, "batch": args.batch_size,
                        "samples": args.samples, "rows": rows}, args.json, rows, ["contender", "steps", "FD", "train s", "loss"])


if __name__ == "__main__":
    main()
