"""End-to-end training throughput: Trainer.fit on a folder of PNGs vs the bare training step.

The data pipeline must never starve the model: fit() (decoding, caching, batching, flips, logging)
should run within 10% of the same Trainer's bare train_step on a batch already in memory.
The bare step is timed before and after the fit, and the two are averaged.

    python bench/train_e2e.py                        # 2000 32x32 PNGs, preset small, fp32
    python bench/train_e2e.py --preset tiny --images 4000 --steps 60
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, table, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (data.num_workers)")
    p.add_argument("--json", help="where to write results (default bench/results/train_e2e.json)")
    args = p.parse_args()

    from resdiff.config import load_config
    from resdiff.data import write_demo_folder
    from resdiff.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_demo_folder(Path(tmp) / "pngs", args.images, 32)
        warmup = 5
        cfg = load_config(None, [
            f"model.preset={args.preset}", f"data.path={folder}", f"train.batch_size={args.batch_size}",
            f"train.mixed_precision={args.precision}", f"data.num_workers={args.workers}", f"out={tmp}/run",
            f"train.steps={args.steps + warmup}", f"train.log_every={warmup}", "train.checkpoint_every=100000",
            "train.preview_every=100000", "train.preview_images=1", "train.preview_steps=1",
        ])
        start = time.perf_counter()
        trainer = Trainer(cfg, resume="never", echo=lambda _m: None)
        setup = time.perf_counter() - start  # scanning, decoding and caching the folder

        images, labels = next(iter(trainer.batches))

        def bare(steps: int) -> float:
            trainer.train_step(images, labels).item()
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = trainer.train_step(images, labels)
            loss.item()
            return steps * args.batch_size / (time.perf_counter() - t0)

        before = bare(args.steps // 2)
        trainer.fit()
        after = bare(args.steps // 2)
        log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
    steady = [r["images_per_s"] for r in log if r["step"] > warmup]  # the first interval includes warm-up
    e2e = sum(steady) / len(steady)
    bare_ips = (before + after) / 2
    row = {"preset": args.preset, "images": args.images, "batch": args.batch_size, "precision": args.precision,
           "workers": args.workers, "dataset setup s": round(setup, 1), "fit img/s": round(e2e, 2),
           "bare step img/s": round(bare_ips, 2), "fit / bare": round(e2e / bare_ips, 3)}
    print(f"machine: {machine()}")
    print(table([row], list(row)))
    print(f"wrote {write_json('train_e2e', {'rows': [row], 'bare_before_after': [before, after]}, args.json)}")


if __name__ == "__main__":
    main()
