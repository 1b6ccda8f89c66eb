"""Train a DDPM on a folder of images (or the built-in demo data), on one CPU or many GPUs.

    python train.py                                   # the demo: a tiny model on procedural shapes
    python train.py --data ~/pictures --out runs/pics # your own images
    python train.py --config configs/cifar10.yaml --data cifar/train train.ema_decay=0.9995
    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/folder64.yaml --data DIR
    torchrun --nproc_per_node 2 train.py ...           # CPU processes (gloo) work too

A run directory that already has checkpoints is resumed automatically (--resume auto), if it is the same run:
the same data (location and files), diffusion settings, batch size and seed (RUN/identity.json). Otherwise
train.py refuses in one line; --resume-anyway continues it deliberately. A run directory with an exported model
or a log past a checkpoint, but no checkpoint (deleted to save space), is refused too; --start-over replaces it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resdiff.choices import PRECISIONS
from resdiff.errors import ArgumentParser, run_cli

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})")
    p.add_argument("--data", help="image folder (searched recursively) or a prepared dataset (python -m resdiff.prepare); "
                   "omit for the built-in demo shapes")
    p.add_argument("--out", help="run directory (default: runs/<config or data folder name>)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run (a resumed run continues up to it)")
    p.add_argument("--batch-size", type=int, help="global batch size, over all processes and accumulation steps")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--mixed-precision", choices=list(PRECISIONS), help="autocast precision (bf16 works on CPUs too)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in the run directory, if any), never, or a checkpoint folder")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume even though the data or the settings that define the run changed (see RUN/identity.json)")
    p.add_argument("--start-over", action="store_true",
                   help="delete the run directory's checkpoints, model, log and previews, and train from step 0")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.ema_decay=0.999 model.channels=64")
    return p.parse_intermixed_args(argv)  # overrides may come before, between and after the flags


def main(argv: list[str] | None = None) -> None:
    """Everything train.py does, for the arguments ``argv`` (default: the command line)."""
    args = parse_args(argv)
    from resdiff.build import build_trainer, model_keys
    from resdiff.config import load_config

    config = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    flags = {"data.path": args.data, "out": args.out, "train.steps": args.steps, "train.batch_size": args.batch_size,
             "train.lr": args.lr, "train.mixed_precision": args.mixed_precision, "train.seed": args.seed}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config(config, overrides, model_keys=model_keys())
    if cfg.out is None:
        name = Path(cfg.data.path).resolve().name if cfg.data.path else Path(config).stem if config else "demo"
        cfg.out = str(Path("runs") / name)
    build_trainer(cfg, resume=args.resume, resume_anyway=args.resume_anyway, start_over=args.start_over).fit()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
