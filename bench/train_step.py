"""Training-step throughput and memory: resdiff's trainer vs diffusers' UNet2DModel training loop.

Both train the identical architecture (the resdiff preset converted with convert.to_diffusers, parameter
counts checked). A "step" is everything the loop does per batch: noise, forward, loss, backward,
gradient clipping, optimizer, EMA update. resdiff's step is the Trainer's own; the diffusers step
follows its train_unconditional.py example (AdamW and EMAModel with their defaults).

    python bench/train_step.py                       # ddpm-cifar10 and small, fp32 and (where it is native) bf16
    python bench/train_step.py --presets small --precisions bf16 --rounds 5
    python bench/train_step.py --memory              # peak memory of a step, each model in a fresh process
    python bench/train_step.py --presets tiny --rounds 1 --steps-per-round 1 --quick   # the plumbing only (tests)

Each (preset, precision) runs in its own process; inside it the two loops alternate round by round.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    count_flops, default_precisions, interleaved, machine, matmul_peak, median, op_counts, table, write_json,
)


def make_trainer(preset: str, precision: str, batch: int, workdir: str, dropout: float | None, extra: tuple[str, ...] = (),
                 demo_images: int = 256):
    from resdiff.config import load_config
    from resdiff.build import build_trainer

    overrides = [f"model.preset={preset}", f"train.batch_size={batch}", f"train.mixed_precision={precision}",
                 f"data.demo_images={demo_images}", "data.num_workers=0", f"out={workdir}/run{len(extra)}", *extra]
    if dropout is not None:
        overrides.append(f"model.dropout={dropout}")
    size = {"ddpm-celebahq-256": 256}.get(preset, 32)
    overrides.append(f"data.image_size={size}")
    return build_trainer(load_config(None, overrides), resume="never", echo=lambda _m: None)


def diffusers_step_fn(trainer, batch: int):
    """The inner loop of diffusers' examples/unconditional_image_generation/train_unconditional.py."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from resdiff.convert import to_diffusers

    acc = trainer.accelerator
    model = to_diffusers(acc.unwrap_model(trainer.model)).to(acc.device).train()
    # Prepared like the example does: with fp16, accelerate's grad scaler then unscales this optimizer's gradients too.
    optimizer = acc.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8))
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    size, ch = trainer.ema.model.config.sample_size, trainer.ema.model.config.in_channels
    clean = torch.rand(batch, ch, size, size, device=acc.device) * 2 - 1

    def step():
        noise = torch.randn(clean.shape, device=acc.device)
        t = torch.randint(0, 1000, (batch,), device=acc.device)
        noisy = scheduler.add_noise(clean, noise, t)
        with acc.autocast():
            out = model(noisy, t).sample
        loss = F.mse_loss(out.float(), noise.float())
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())

    return model, step


def resdiff_step_fn(trainer, batch: int):
    images = torch.randint(0, 256, (batch, trainer.ema.model.config.in_channels, trainer.ema.model.config.sample_size, trainer.ema.model.config.sample_size), dtype=torch.uint8)
    labels = torch.zeros(batch, dtype=torch.long)
    return lambda: trainer.train_step(images, labels)


# Optional resdiff variants timed beside the default path (name -> config overrides).
VARIANTS = {"channels_last": ("train.channels_last=true",), "compile": ("train.compile=true",)}


def run_one(preset: str, precision: str, batch: int, rounds: int, steps_per_round: int, variants: list[str] = (),
            quick: bool = False) -> dict:
    # The peak first, on an idle process: measured after torch.compile it came out a third low (MFU over 100%).
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    peak_size = dict(n=256, seconds=0.05) if quick else {}  # --quick: a figure, not a measurement
    peak = matmul_peak(dtype, "cuda" if torch.cuda.is_available() else "cpu", **peak_size)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(preset, precision, batch, workdir, dropout=None, demo_images=16 if quick else 256)
        theirs, diffusers_step = diffusers_step_fn(trainer, batch)
        ours = trainer.accelerator.unwrap_model(trainer.model)
        n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
        assert n_ours == n_theirs, f"architectures differ: {n_ours} vs {n_theirs} parameters"
        resdiff_step = resdiff_step_fn(trainer, batch)
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def repeat(fn):
            return lambda: [fn() for _ in range(steps_per_round)]

        contenders = {"resdiff": repeat(resdiff_step), "diffusers": repeat(diffusers_step)}
        for name in variants:
            contenders[f"resdiff+{name}"] = repeat(resdiff_step_fn(make_trainer(preset, precision, batch, workdir, None, VARIANTS[name]), batch))
        times = interleaved(contenders, rounds, sync)
        # Casts and copies of one step: the dtype flow does not depend on the hardware, so this holds on any CPU.
        copies = {"resdiff": op_counts(resdiff_step), "diffusers": op_counts(diffusers_step)}
        size = trainer.ema.model.config.sample_size
        x = torch.randn(1, 3, size, size, device=trainer.accelerator.device)
        flops = count_flops(lambda: ours(x, torch.tensor([10], device=x.device)).sample.sum().backward())
        ours.zero_grad(set_to_none=True)
    res = {}
    for name, ts in times.items():
        ips = batch * steps_per_round / median(ts)
        res[name] = {"images_per_s": round(ips, 2), "mfu": round(ips * flops / peak, 4), "seconds": [round(t, 3) for t in ts],
                     **({"ops_per_step": copies[name]} if name in copies else {})}
    return {"preset": preset, "precision": precision, "batch": batch, "parameters": n_ours, "gflop_per_image": round(flops / 1e9, 2),
            "matmul_peak_tflops": round(peak / 1e12, 3), "ratio": round(res["resdiff"]["images_per_s"] / res["diffusers"]["images_per_s"], 3),
            **{f"ratio {k}": round(v["images_per_s"] / res["diffusers"]["images_per_s"], 3) for k, v in res.items() if "+" in k}, **res}


def peak_memory(which: str, preset: str, precision: str, batch: int, steps: int = 3, quick: bool = False) -> dict:
    """Run ``steps`` training steps of one loop in this (fresh) process and report peak memory."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(preset, precision, batch, workdir, dropout=None, demo_images=16 if quick else 256)
        if which == "diffusers":
            theirs, step = diffusers_step_fn(trainer, batch)
            del trainer.model, trainer.optimizer, trainer.ema  # only diffusers' copy stays
        else:
            step = resdiff_step_fn(trainer, batch)
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
    mb = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"which": which, "preset": preset, "precision": precision, "batch": batch, "peak_mb": round(mb, 1),
            "kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS (includes the Python process)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["ddpm-cifar10", "small"])
    p.add_argument("--precisions", nargs="+", default=None, help="default: no and bf16, or no alone where bf16 is emulated", choices=["no", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS), help="also time these resdiff options")
    p.add_argument("--memory", action="store_true", help="measure peak memory instead of throughput")
    p.add_argument("--quick", action="store_true", help="check the plumbing: the matmul peak from one small product, 16 demo images")
    p.add_argument("--json", help="where to write the results (default bench/results/train_step.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:  # one measurement in this fresh process, printed as JSON
        spec = json.loads(args.child)
        fn = peak_memory if "which" in spec else run_one
        print("RESULT " + json.dumps(fn(**spec)))
        return

    rows, precisions = [], args.precisions or default_precisions()
    for preset in args.presets:
        for precision in precisions:
            specs = ([dict(which=w, preset=preset, precision=precision, batch=args.batch_size, quick=args.quick)
                      for w in ("resdiff", "diffusers")]
                     if args.memory else [dict(preset=preset, precision=precision, batch=args.batch_size, rounds=args.rounds,
                                               steps_per_round=args.steps_per_round, variants=args.variants,
                                               quick=args.quick)])
            for spec in specs:
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
                line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
                if out.returncode or not line:
                    sys.exit(f"benchmark {spec} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(line[0][7:]))
                print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith(("resdiff", "diffusers"))} | (
                    {"resdiff_img_s": rows[-1]["resdiff"]["images_per_s"], "diffusers_img_s": rows[-1]["diffusers"]["images_per_s"]}
                    if not args.memory else {})), flush=True)
    print(f"\nmachine: {machine()}")
    if args.memory:
        print(table(rows, ["which", "preset", "precision", "batch", "peak_mb"]))
    else:
        flat = [{**r, "resdiff img/s": r["resdiff"]["images_per_s"], "diffusers img/s": r["diffusers"]["images_per_s"],
                 "resdiff MFU": f"{r['resdiff']['mfu']:.1%}", "diffusers MFU": f"{r['diffusers']['mfu']:.1%}",
                 "copy_/cast per step (resdiff, diffusers)": "{}/{}, {}/{}".format(
                     *(r[w]["ops_per_step"][op] for w in ("resdiff", "diffusers") for op in ("aten::copy_", "aten::_to_copy")))}
                for r in rows]
        extra = [f"ratio resdiff+{v}" for v in args.variants]
        print(table(flat, ["preset", "precision", "batch", "parameters", "gflop_per_image", "resdiff img/s", "diffusers img/s",
                           "ratio", *extra, "resdiff MFU", "diffusers MFU", "copy_/cast per step (resdiff, diffusers)"]))
    path = write_json("train_memory" if args.memory else "train_step", {"rows": rows}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
