"""Training-step throughput and memory: resdiff's trainer vs diffusers' UNet2DModel training loop.

Both train the identical architecture (the resdiff preset converted with convert.to_diffusers, parameter
counts checked). A "step" is everything the loop does per batch: noise, forward, loss, backward,
gradient clipping, optimizer, EMA update. resdiff's step is the Trainer's own; the diffusers step
is its train_unconditional.py example (bench/loops.py).

    python -m bench.train_step                       # ddpm-cifar10 and small, fp32 and (where it is native) bf16
    python -m bench.train_step --presets small --precisions bf16 --rounds 5
    python -m bench.train_step --memory              # peak memory of a step, each model in a fresh process
    python -m bench.train_step --presets tiny --rounds 1 --steps-per-round 1 --quick   # the plumbing only (tests)

Each (preset, precision) runs in its own process; inside it the two loops alternate round by round.
"""

from __future__ import annotations

import gc
import json
import resource
import tempfile

import torch

from bench.common import (
    count_flops, default_precisions, interleaved, matmul_peak, median, op_counts, parser, report,
)
from bench.loops import diffusers_step, make_trainer, resdiff_step
from bench.runner import child, in_child

# Optional resdiff variants timed beside the default path (name -> config overrides).
VARIANTS = {"channels_last": ("train.channels_last=true",), "compile": ("train.compile=true",)}


def flops_per_image(trainer) -> int:
    """FLOPs of one image's forward and backward pass through the trainer's model."""
    ours = trainer.accelerator.unwrap_model(trainer.model)
    size = trainer.ema.model.config.sample_size
    x = torch.randn(1, 3, size, size, device=trainer.accelerator.device)
    flops = count_flops(lambda: ours(x, torch.tensor([10], device=x.device)).sample.sum().backward())
    ours.zero_grad(set_to_none=True)
    return flops


def run_one(preset: str, precision: str, batch: int, rounds: int, steps_per_round: int, variants: list[str] = (),
            quick: bool = False) -> dict:
    # The peak first, on an idle process: measured after torch.compile it came out a third low (MFU over 100%).
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    peak_size = dict(n=256, seconds=0.05) if quick else {}  # --quick: a figure, not a measurement
    peak = matmul_peak(dtype, "cuda" if torch.cuda.is_available() else "cpu", **peak_size)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(preset, precision, batch, workdir, demo_images=16 if quick else 256)
        theirs, step_theirs = diffusers_step(trainer, batch)
        n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (trainer.model, theirs))
        assert n_ours == n_theirs, f"architectures differ: {n_ours} vs {n_theirs} parameters"
        steps = {"resdiff": resdiff_step(trainer, batch), "diffusers": step_theirs}
        for name in variants:
            steps[f"resdiff+{name}"] = resdiff_step(make_trainer(preset, precision, batch, workdir, None, VARIANTS[name]),
                                                    batch)
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        times = interleaved({k: (lambda f=f: [f() for _ in range(steps_per_round)]) for k, f in steps.items()}, rounds,
                            sync)
        # Casts and copies of one step: the dtype flow does not depend on the hardware, so this holds on any CPU.
        copies = {name: op_counts(steps[name]) for name in ("resdiff", "diffusers")}
        flops = flops_per_image(trainer)
    res = {}
    for name, ts in times.items():
        ips = batch * steps_per_round / median(ts)
        res[name] = {"images_per_s": round(ips, 2), "mfu": round(ips * flops / peak, 4),
                     "seconds": [round(t, 3) for t in ts], **({"ops_per_step": copies[name]} if name in copies else {})}
    ratios = {f"ratio {k}": round(v["images_per_s"] / res["diffusers"]["images_per_s"], 3) for k, v in res.items()
              if "+" in k}
    return {"preset": preset, "precision": precision, "batch": batch, "parameters": n_ours,
            "gflop_per_image": round(flops / 1e9, 2), "matmul_peak_tflops": round(peak / 1e12, 3),
            "ratio": round(res["resdiff"]["images_per_s"] / res["diffusers"]["images_per_s"], 3), **ratios, **res}


def peak_memory(which: str, preset: str, precision: str, batch: int, steps: int = 3, quick: bool = False) -> dict:
    """Run ``steps`` training steps of one loop in this (fresh) process and report peak memory."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(preset, precision, batch, workdir, demo_images=16 if quick else 256)
        if which == "diffusers":
            step = diffusers_step(trainer, batch)[1]
            del trainer.model, trainer.optimizer, trainer.ema  # only diffusers' copy stays
        else:
            step = resdiff_step(trainer, batch)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
    cuda = torch.cuda.is_available()
    mb = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"which": which, "preset": preset, "precision": precision, "batch": batch, "peak_mb": round(mb, 1),
            "kind": "cuda max_memory_allocated" if cuda else "peak RSS (includes the Python process)"}


def measure(**spec) -> dict:
    return (peak_memory if "which" in spec else run_one)(**spec)


def main() -> None:
    p = parser(__doc__, "train_step (--memory: train_memory)")
    p.add_argument("--presets", nargs="+", default=["ddpm-cifar10", "small"])
    p.add_argument("--precisions", nargs="+", default=None, choices=["no", "bf16", "fp16"],
                   help="default: no and bf16, or no alone where bf16 is emulated")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS), help="also time these resdiff options")
    p.add_argument("--memory", action="store_true", help="measure peak memory instead of throughput")
    p.add_argument("--quick", action="store_true", help="check the plumbing: the matmul peak from one small product, "
                                                        "16 demo images")
    args = p.parse_args()
    if args.child:  # one measurement in this fresh process
        return child(measure, args.child)

    rows = []
    for preset in args.presets:
        for precision in args.precisions or default_precisions():
            common = dict(preset=preset, precision=precision, batch=args.batch_size, quick=args.quick)
            specs = ([dict(which=w, **common) for w in ("resdiff", "diffusers")] if args.memory else
                     [dict(rounds=args.rounds, steps_per_round=args.steps_per_round, variants=args.variants, **common)])
            for spec in specs:
                rows.append(in_child("bench.train_step", spec))
                print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith(("resdiff", "diffusers"))} | (
                    {} if args.memory else {f"{w}_img_s": rows[-1][w]["images_per_s"] for w in ("resdiff", "diffusers")})),
                    flush=True)
    if args.memory:
        return report("train_memory", {"rows": rows}, args.json, rows, ["which", "preset", "precision", "batch", "peak_mb"])
    ops = "copy_/cast per step (resdiff, diffusers)"
    flat = [{**r, **{f"{w} img/s": r[w]["images_per_s"] for w in ("resdiff", "diffusers")},
             **{f"{w} MFU": f"{r[w]['mfu']:.1%}" for w in ("resdiff", "diffusers")},
             ops: "{}/{}, {}/{}".format(*(r[w]["ops_per_step"][op] for w in ("resdiff", "diffusers")
                                        for op in ("aten::copy_", "aten::_to_copy")))} for r in rows]
    report("train_step", {"rows": rows}, args.json, flat,
           ["preset", "precision", "batch", "parameters", "gflop_per_image", "resdiff img/s", "diffusers img/s", "ratio",
            *(f"ratio resdiff+{v}" for v in args.variants), "resdiff MFU", "diffusers MFU", ops])


if __name__ == "__main__":
    main()
