"""Train a DDPM on a folder of images (or the built-in demo shapes), on one CPU or many GPUs.

    resdiff-train --data ~/pictures                        # your images at 32x32 with the tuned defaults
    resdiff-train --data ~/pictures --image-size 64         # at 64x64 (the U-Net is sized for it)
    resdiff-train --data ~/pictures --image-size 256 --autoencoder DIR   # latent diffusion: 256x256 via an 8x autoencoder
    resdiff-train --config cifar10 --data cifar/train train.ema_decay=0.9995
    accelerate launch --multi_gpu --num_processes 8 train.py --config folder64 --data DIR
    torchrun --nproc_per_node 2 train.py ...                # CPU processes (gloo) work too
    resdiff-train --config folder64 --print-config          # the resolved config, as YAML

Without --config the defaults are the recipe tuned on real images (resdiff.config.Config()); --config takes a
YAML file or the name of a shipped config (cifar10, celebahq256, folder64, landscape64x128).
A run directory that already has checkpoints is resumed automatically (--resume auto), if it is the same run:
the same data (location and files), diffusion settings, batch size and seed (RUN/identity.json). Otherwise
training refuses in one line; --resume-anyway continues it deliberately. A run directory with an exported model
or a log past a checkpoint, but no checkpoint (deleted to save space), is refused too; --start-over replaces it.

Fine-tuning: --init-from starts from another model's weights and architecture (a resdiff run or model folder, a
diffusers pipeline folder or a saved UNet2DModel), with a fresh optimizer, EMA and step count:

    resdiff-train --init-from runs/pets --data ~/cats --out runs/cats --steps 2000 --lr 1e-4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..choices import PRECISIONS
from ..errors import ArgumentParser, run_cli
from . import invoked_as

# Flag -> the config key it sets (a flag is a shorthand for the override `key=value`).
FLAG_KEYS = {
    "data": "data.path", "image_size": "data.image_size", "out": "out", "steps": "train.steps",
    "batch_size": "train.batch_size", "lr": "train.lr", "mixed_precision": "train.mixed_precision", "seed": "train.seed",
    "autoencoder": "model.autoencoder",
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=invoked_as("train.py"), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file, or a shipped config's name (default: the tuned defaults)")
    p.add_argument("--data", help="image folder (searched recursively) or a prepared dataset (resdiff-prepare); "
                   "omit for the built-in demo shapes")
    p.add_argument("--image-size", "--resolution", dest="image_size", metavar="SIZE",
                   help="training size: one side (64) or HEIGHTxWIDTH (64x128); images are resized to cover it and "
                        "centre-cropped (default 32)")
    p.add_argument("--autoencoder", metavar="SPEC",
                   help="latent diffusion: learn the latents of this autoencoder (a folder with a NAME_encoder.pth / "
                        "NAME_decoder.pth pair, a diffusers AutoencoderKL or AutoencoderTiny folder, or a Hub id); "
                        "the images are encoded once (a prepared latent dataset needs no flag)")
    p.add_argument("--out", help="run directory (default: runs/<data folder or config name>)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run (a resumed run continues up to it)")
    p.add_argument("--batch-size", type=int, help="global batch size, over all processes and accumulation steps")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--mixed-precision", choices=list(PRECISIONS), help="autocast precision (bf16 works on CPUs too)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--resume", default="auto",
                   help="auto (newest checkpoint in the run directory, if any), never, or a checkpoint folder")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume even though the data or the settings that define the run changed (see RUN/identity.json)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from this model's weights and architecture (a resdiff run or model folder, a diffusers "
                        "pipeline folder or a saved UNet2DModel); resume with the same --init-from")
    p.add_argument("--start-over", action="store_true",
                   help="delete the run directory's checkpoints, model, log and previews, and train from step 0")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.ema_decay=0.999 model.channels=64")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ``argv`` (default: the command line); overrides may come before, between and after them."""
    return build_parser().parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace):
    """The Config the arguments describe: defaults, the --config file, the flags, then the overrides; ``out``
    defaults to runs/<data folder name>, else runs/<config name>, else runs/demo. (With --init-from, build_trainer
    then makes the model section the source's architecture.)"""
    from ..build import model_keys
    from ..config import load_config

    flags = [f"{key}={getattr(args, name)}" for name, key in FLAG_KEYS.items() if getattr(args, name) is not None]
    cfg = load_config(args.config, [*flags, *args.overrides], model_keys=model_keys())
    if cfg.out is None:
        name = Path(cfg.data.path).resolve().name if cfg.data.path else Path(args.config).stem if args.config else "demo"
        cfg.out = str(Path("runs") / name)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Everything train.py does, for the arguments ``argv`` (default: the command line); returns the exit code."""

    def run() -> None:
        args = parse_args(argv)
        cfg = resolve_config(args)
        if args.print_config:
            from ..build import load_init_source
            from ..config import config_yaml

            if args.init_from is not None:  # the model section the run would train: the source's architecture
                load_init_source(cfg, args.init_from)
            print(config_yaml(cfg), end="")
            return
        from ..build import build_trainer

        build_trainer(cfg, resume=args.resume, resume_anyway=args.resume_anyway, start_over=args.start_over,
                      init_from=args.init_from).fit()

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
