"""How resdiff's defaults were chosen (issue #25): FID of one change at a time, on real images, at equal time.

Every variant is the defaults (resdiff.config.Config()) with the settings as they stood before this measurement (BASE) plus one
change, so the table keeps its meaning after the defaults move. Each trains for --minutes of wall clock with
bench/contenders.py and is scored with FID of --fid-images samples (DPM++ 20 unless told) against the whole
folder. Two variants run at a time, one torch thread each, so a 2-core machine measures twice as many; every
variant, the baseline included, trains under the same condition (one core, a neighbour on the other), which is
why these minutes buy fewer steps than the benchmark's. The figures rank the variants against each other; the
benchmark (bench/contenders.py) then measures the chosen defaults against diffusers.

    python -m bench.tuning --data data/openmoji --minutes 7 --fid-images 500 --only base lr2e-3 lr5e-4 batch16 \
        batch64 wide48 deep2 ema-power0.10 min-snr5 eps-cosine     # the first round of docs/benchmarks.md (7 minutes each)
    python -m bench.tuning --data data/openmoji                     # every variant below, 5 minutes each
    python -m bench.tuning --data data/openmoji --only base lr2e-3  # some of them
    python -m bench.tuning --data data/openmoji --report            # the table of what has run
    python -m bench.tuning --data data/openmoji --dry-run           # the bench.contenders command of each variant

Resumable: each variant writes OUT/NAME/results.json (bench/contenders.py's file), and a finished one is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine
from bench.runner import ROOT

# The default training settings before this measurement, written out so the variants stay comparable.
BASE = ["model.preset=tiny", "train.lr=1e-3", "train.warmup_steps=50", "train.batch_size=32", "train.ema_decay=0.995",
        "diffusion.prediction_type=v_prediction", "diffusion.beta_schedule=squaredcos_cap_v2", "data.random_flip=true",
        "diffusion.min_snr_gamma=null", "train.ema_sigma_rel=null"]

# name: (the one change, why it is worth a try)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "base": ([], "the defaults before: tiny preset, v-prediction cosine, lr 1e-3, batch 32, EMA 0.995"),
    "lr2e-3": (["train.lr=2e-3"], "a higher rate for a small model"),
    "lr5e-4": (["train.lr=5e-4"], "a lower rate"),
    "batch16": (["train.batch_size=16"], "more, noisier steps in the same time"),
    "batch64": (["train.batch_size=64"], "fewer, cleaner steps"),
    "ema0.999": (["train.ema_decay=0.999"], "a longer average"),
    "ema-power0.10": (["train.ema_sigma_rel=0.10"], "EDM2's power-function EMA, which spans a fixed share of the run"),
    "min-snr5": (["diffusion.min_snr_gamma=5"], "Min-SNR-5 loss weighting (Hang et al. 2023)"),
    "eps-cosine": (["diffusion.prediction_type=epsilon"], "the epsilon target on the same schedule"),
    "noflip": (["data.random_flip=false"], "no augmentation (emoji are not mirror-symmetric in meaning)"),
    "wide48": (["model.channels=48"], "a wider U-Net, fewer steps"),
    "deep2": (["model.num_res_blocks=2"], "two ResBlocks per level"),
    "noattn": (["model.attention_resolutions=[]"], "no self-attention: cheaper steps"),
    "attn16": (["model.attention_resolutions=[16,8]"], "attention at 16x16 too"),
    "seed1": (["train.seed=1"], "the base again with another seed: how far FID moves by chance"),
    "batch8": (["train.batch_size=8"], "smaller still, after batch 16 beat 32 and 64"),
    # the second round: the changes that won the first, together
    "b16-minsnr": (["train.batch_size=16", "diffusion.min_snr_gamma=5"], "batch 16 and Min-SNR-5, the two clear wins"),
    "b16-minsnr-lr2e-3": (["train.batch_size=16", "diffusion.min_snr_gamma=5", "train.lr=2e-3"],
                          "and the higher rate, the third"),
}


def command(args: argparse.Namespace, name: str) -> list[str]:
    """The bench/contenders.py run of one variant: its own folder, one budget, one thread, no sampler sweep."""
    overrides, _ = VARIANTS[name]
    return [sys.executable, "-m", "bench.contenders", "--data", str(args.data.resolve()), "--out",
            str((args.out / name).resolve()), "--budgets", f"{args.minutes:g}", "--fid-images", str(args.fid_images),
            "--sampler", args.sampler, "--steps", str(args.steps), "--threads", "1", "--nfe",
            "--contenders", name, "--variant", name, *BASE, *overrides]


def result(out: Path, name: str) -> dict | None:
    """The variant's scored row, or None while it has none."""
    file = out / name / "results.json"
    rows = json.loads(file.read_text())["budgets"] if file.is_file() else {}
    return next(iter(rows.values()), None)


def run_all(args: argparse.Namespace, names: list[str]) -> None:
    """Run the variants without a result, ``args.parallel`` at a time; each logs to OUT/NAME.log."""
    todo = [n for n in names if result(args.out, n) is None]
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            name = todo.pop(0)
            (args.out / name).mkdir(parents=True, exist_ok=True)
            log = open(args.out / f"{name}.log", "w")
            print(f"start {name}: {' '.join(VARIANTS[name][0]) or '(the base)'}", flush=True)
            running.append((name, subprocess.Popen(command(args, name), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                                   env={**os.environ, "OMP_NUM_THREADS": "1"})))
        time.sleep(1)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                row = result(args.out, name)
                print(f"done {name}: " + (f"FID {row['fid']}, {row['steps']} steps" if row else
                                          f"failed (exit {proc.returncode}); see {args.out / name}.log"), flush=True)


def report(args: argparse.Namespace, names: list[str]) -> str:
    """Markdown: the variants by FID, with steps, images/s and the change against the base."""
    rows = [(n, r) for n in names if (r := result(args.out, n))]
    base = result(args.out, "base")  # run or not in this call
    lines = [f"FID@{args.fid_images} ({args.sampler.upper()}-{args.steps}) after {args.minutes:g} min of training, "
             f"{args.parallel} variant(s) at a time, one thread each; {machine().rsplit(', ', 1)[0]}", "",
             "| variant | change | FID | vs base | steps | img/s | why try it |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, r in sorted(rows, key=lambda nr: nr[1]["fid"]):
        change, why = VARIANTS[name]
        vs = f"{r['fid'] / base['fid'] - 1:+.1%}" if base else ""
        lines.append(f"| {name} | {' '.join(change) or '-'} | {r['fid']} | {vs} | {r['steps']} | {r['images_per_s']} | {why} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, help="default bench/results/tuning-<data folder name>")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants (default: all)")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--fid-images", type=int, default=1000)
    p.add_argument("--sampler", default="dpm++")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--parallel", type=int, default=2, help="variants at a time (one thread each)")
    p.add_argument("--report", action="store_true", help="only print the table of what has run")
    p.add_argument("--dry-run", action="store_true", help="only print each variant's bench.contenders command")
    args = p.parse_args(argv)
    args.out = args.out or ROOT / "bench" / "results" / f"tuning-{args.data.resolve().name}"
    names = args.only or list(VARIANTS)
    if args.dry_run:
        print("\n".join(shlex.join(command(args, name)) for name in names))
        return
    if not args.report:
        run_all(args, names)
    table = report(args, names)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
