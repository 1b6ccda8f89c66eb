"""Helpers shared by the tests that train: a tiny run configuration, real PNG folders, the CLI scripts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resdiff.config import load_config
from resdiff.build import build_trainer, model_keys

ROOT = Path(__file__).resolve().parents[1]
# A tiny run: ~0.3M parameters, 16x16, batch 8, few-step previews, no warm-up, nothing periodic unless asked.
TINY = [
    "model.channels=16", "model.norm_groups=8", "data.image_size=16", "data.num_workers=0", "data.demo_images=64",
    "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=0", "train.preview_steps=3", "train.preview_images=4",
    "train.log_every=1000", "train.checkpoint_every=1000", "train.preview_every=1000",
    "train.eval_every=0",  # whatever FID weights an earlier test left in the cache, these runs log training only
]


def load_script(name: str, file: str):
    """Import a top-level script (train.py, sample.py) as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pngs(folder: Path, n: int, size: int = 16, color: tuple[int, int, int] | None = None, seed: int = 0) -> Path:
    """n real PNG files: random pixels, or all one flat colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if color is None else np.full((size, size, 3), color, np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return folder


def write_blobs(folder: Path, n: int = 10, size: int = 16) -> Path:
    """n real PNG files of random colour blobs (4x4 random pixels, resized smoothly): image-like training data."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        pixels = (g.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(folder / f"{i:02d}.png")
    return folder


def config(out: Path, *overrides: str):
    return load_config(None, [*TINY, f"out={out}", *overrides], model_keys=model_keys())


def fit(out: Path, *overrides: str, resume: str = "auto") -> list[str]:
    """Train in-process; returns what the trainer printed."""
    printed = []
    build_trainer(config(out, *overrides), resume=resume, echo=printed.append).fit()
    return printed


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


class Seen(torch.utils.data.Dataset):
    """A dataset wrapper that records which indices a process loaded (the multi-process tests' probe)."""

    def __init__(self, inner):
        self.inner, self.indices = inner, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.indices.append(int(i))
        return self.inner[i]
