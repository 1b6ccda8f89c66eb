"""Sampling throughput: resdiff.sampling.generate vs diffusers' DDIMPipeline, same weights, DDIM-50.

The diffusers model is built at the preset's architecture and converted with resdiff.convert.from_diffusers, so
both run the very same weights. Both contenders alternate round by round in one process.

    python -m bench.sample                          # ddpm-cifar10, batch 16, fp32 and (where it is native) bf16
    python -m bench.sample --preset small --num-images 32 --rounds 3
"""

from __future__ import annotations

import time

import torch

from bench.common import default_precisions, interleaved, median, parser, report


def main() -> None:
    p = parser(__doc__, "sample")
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=None, help="default: no and bf16, or no alone where bf16 is emulated", choices=["no", "bf16"])
    p.add_argument("--compile", action="store_true", help="also time resdiff with compiled blocks (compile time reported apart)")
    args = p.parse_args()

    from diffusers import DDIMPipeline, DDIMScheduler

    from resdiff import UNet
    from resdiff.convert import from_diffusers, to_diffusers
    from resdiff.sampling import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    theirs = to_diffusers(UNet.from_preset(args.preset)).to(device).eval()  # diffusers' model ...
    ours = from_diffusers(theirs).to(device).eval()  # ... and resdiff's, with its exact weights
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipe = DDIMPipeline(unet=theirs, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    n = args.num_images
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for precision in args.precisions or default_precisions():
        dtype = torch.bfloat16 if precision == "bf16" else None

        def run_diffusers():
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                pipe(batch_size=n, num_inference_steps=args.steps, output_type="np", generator=torch.Generator().manual_seed(0))

        def run_resdiff():
            generate(ours, n, sampler="ddim", steps=args.steps, batch_size=n, device=device, mixed_precision=precision,
                     progress=False, scheduler_config=dict(scheduler.config))

        contenders = {"resdiff": run_resdiff, "diffusers": run_diffusers}
        compile_s = None
        if args.compile:
            compiled = from_diffusers(theirs).to(device).eval().compile_blocks()
            start = time.perf_counter()
            generate(compiled, n, sampler="ddim", steps=2, batch_size=n, device=device, mixed_precision=precision,
                     progress=False, scheduler_config=dict(scheduler.config))  # compiles (timed apart)
            compile_s = round(time.perf_counter() - start, 1)
            contenders["resdiff+compile"] = lambda: generate(
                compiled, n, sampler="ddim", steps=args.steps, batch_size=n, device=device, mixed_precision=precision,
                progress=False, scheduler_config=dict(scheduler.config))
        times = interleaved(contenders, args.rounds, sync)
        ips = {k: n / median(v) for k, v in times.items()}
        rows.append({"preset": args.preset, "precision": precision, "images": n, "steps": args.steps,
                     "resdiff img/s": round(ips["resdiff"], 3), "diffusers img/s": round(ips["diffusers"], 3),
                     "ratio": round(ips["resdiff"] / ips["diffusers"], 3),
                     **({"resdiff+compile img/s": round(ips["resdiff+compile"], 3),
                         "ratio compile": round(ips["resdiff+compile"] / ips["diffusers"], 3), "compile s": compile_s} if args.compile else {}),
                     "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()}})
        print(rows[-1], flush=True)
    extra = ["resdiff+compile img/s", "ratio compile", "compile s"] if args.compile else []
    report("sample", {"rows": rows}, args.json, rows,
           ["preset", "precision", "images", "steps", "resdiff img/s", "diffusers img/s", "ratio", *extra])


if __name__ == "__main__":
    main()
