"""End to end: train.py's time per step against the bare training step, on the configs users run.

`python train.py` runs as users run it (its own process, the given config, a folder of PNGs) in short
chunks that resume one another; between chunks, this process times the same Trainer code's bare
``train_step`` on one batch already in memory (train.py runs alone meanwhile: never two heavy torch
processes at once). train.py's per-step times come from its own log.jsonl (one record per step; the
first two steps of each chunk, which follow start-up and resume, are left out), so they include
everything a step costs a user: batching, flips, logging, the progress bar. Start-up, previews and
checkpoints are one-off costs, reported apart. Target: train.py within 5% of the bare step.

    python -m bench.train_e2e                                   # the cifar10 config at batch 16; fp32 and bf16 where native
    python -m bench.train_e2e --config defaults --batch-size 32 --rounds 2   # train.py's defaults (no --config)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import default_precisions, parser, report
from bench.runner import ROOT, child, in_child, run


def run_one(config: str, precision: str, batch: int, rounds: int, steps: int, images: int, overrides: list[str]) -> dict:
    """One (config, precision) in this fresh process: bare-step rounds here alternate with train.py chunks."""
    from resdiff.build import build_trainer, model_keys
    from resdiff.config import load_config
    from resdiff.data import write_demo_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_demo_folder(Path(tmp) / "pngs", images, 32)
        quiet = ["train.log_every=1", "train.preview_images=1", "train.preview_steps=1", *overrides]  # previews: one-off
        chosen = [] if config == "defaults" else ["--config", config]
        cfg = load_config(None if config == "defaults" else config, [
            f"data.path={folder}", f"train.batch_size={batch}", f"train.mixed_precision={precision}", f"out={tmp}/bare",
            *quiet], model_keys=model_keys())
        trainer = build_trainer(cfg, resume="never", echo=lambda _m: None)
        images_, labels = next(iter(trainer.batches))

        def bare() -> list[float]:
            out = []
            for _ in range(steps):
                start = time.perf_counter()
                trainer.train_step(images_, labels).item()
                out.append(time.perf_counter() - start)
            return out

        bare()  # warm-up
        bare_times, e2e_times, chunk_wall = [], [], []
        run_dir, chunk = Path(tmp) / "run", steps + 2
        for r in range(rounds):
            bare_times += bare()
            done = run([sys.executable, str(ROOT / "train.py"), *chosen, "--data", str(folder), "--batch-size", str(batch),
                        "--mixed-precision", precision, "--out", str(run_dir), "--steps", str((r + 1) * chunk), *quiet],
                       echo=False)
            chunk_wall.append(done.seconds)
            if done.code:
                raise SystemExit(f"train.py failed:\n{done.output[-3000:]}")
            records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
            e2e_times += [batch / rec["images_per_s"] for rec in records if r * chunk + 2 < rec["step"] <= (r + 1) * chunk]
    bare_s, e2e_s = statistics.median(bare_times), statistics.median(e2e_times)
    return {"config": Path(config).name, "precision": precision, "batch": batch, "steps timed": len(e2e_times),
            "bare step s": round(bare_s, 3), "train.py step s": round(e2e_s, 3), "train.py / bare": round(e2e_s / bare_s, 3),
            "train.py img/s": round(batch / e2e_s, 2),
            "one-off s per run": round(statistics.median(chunk_wall) - chunk * e2e_s, 1),
            "bare_times": bare_times, "e2e_times": e2e_times}


def main() -> None:
    p = parser(__doc__, "train_e2e")
    p.add_argument("--config", nargs="+", default=["cifar10"],
                   help="configs to run (each as train.py --config; 'defaults': train.py without --config)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precisions", nargs="+", default=None, choices=["no", "bf16", "fp16"],
                   help="default: no and bf16, or no alone where bf16 is emulated")
    p.add_argument("--rounds", type=int, default=3, help="bare-step rounds alternating with train.py chunks")
    p.add_argument("--steps", type=int, default=6, help="steps per round")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides for both (e.g. model.preset=tiny)")
    args = p.parse_args()
    if args.child:  # one measurement in this fresh process (accelerate allows one precision per process)
        return child(run_one, args.child)
    rows = []
    for config in args.config:
        for precision in args.precisions or default_precisions():
            rows.append(in_child("bench.train_e2e", dict(config=config, precision=precision, batch=args.batch_size,
                                                         rounds=args.rounds, steps=args.steps, images=args.images,
                                                         overrides=args.override)))
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_times")}), flush=True)
    report("train_e2e", {"rows": rows}, args.json, rows, [k for k in rows[0] if not k.endswith("_times")])


if __name__ == "__main__":
    main()
