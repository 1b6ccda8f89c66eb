"""What glibc's malloc settings cost a CPU training step: resdiff.hardware.reuse_freed_memory on and off.

Each (loop, setting) runs in a fresh process, because malloc settings are process-wide; the settings
alternate run by run, so a drift of the machine hits both. A process reports its median step time and,
per step, the page faults and the kernel (system) time from getrusage, and its peak RSS.

    python -m bench.allocator                                  # ddpm-cifar10, batch 16, bf16 where native, else fp32
    python -m bench.allocator --precision no --runs 3 --steps 6
    python -m bench.allocator --loops resdiff                  # resdiff's Trainer step only

"default" is glibc as a process starts; "reuse" is after reuse_freed_memory(), which the Trainer and the
sampling/evaluation processes call on a CPU (RESDIFF_KEEP_FREED_MEMORY=0 turns it off). The diffusers loop
(train_unconditional.py's step, bench/loops.py) shows what a diffusers user gets by default.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

from bench.common import default_precisions, median, parser, report
from bench.runner import child, in_child


def worker(loop: str, setting: str, preset: str, precision: str, batch: int, steps: int) -> dict:
    """Time ``steps`` steps of one loop in this process under one malloc setting."""
    from bench.loops import diffusers_step, make_trainer, resdiff_step
    from resdiff.hardware import reuse_freed_memory

    trainer = make_trainer(preset, precision, batch, tempfile.mkdtemp(), 0.1)  # the config's dropout
    applied = reuse_freed_memory()  # in effect? (RESDIFF_KEEP_FREED_MEMORY=0 in the "default" processes keeps it off)
    step = resdiff_step(trainer, batch) if loop == "resdiff" else diffusers_step(trainer, batch)[1]
    step(), step()  # warm-up: oneDNN primitives, optimizer state, the allocator's first growth
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "loop": loop, "setting": setting, "applied": applied, "seconds": [round(t, 3) for t in times],
        "step_s": median(times), "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "kernel_s_per_step": (after.ru_stime - before.ru_stime) / steps, "peak_rss_mb": after.ru_maxrss / 1024,
    }


def main() -> None:
    p = parser(__doc__, "allocator")
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["no", "bf16"], default=None, help="default: bf16 where native, else no (fp32)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per process (after 2 warm-up steps)")
    p.add_argument("--runs", type=int, default=2, help="processes per (loop, setting)")
    p.add_argument("--loops", nargs="+", choices=["resdiff", "diffusers"], default=["resdiff", "diffusers"])
    args = p.parse_args()
    if args.child:
        return child(worker, args.child)
    precision = args.precision or default_precisions()[-1]

    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.runs):
        for loop in args.loops:
            for setting in ("default", "reuse"):
                spec = dict(loop=loop, setting=setting, preset=args.preset, precision=precision, batch=args.batch,
                            steps=args.steps)
                env = {**os.environ, "RESDIFF_KEEP_FREED_MEMORY": "1" if setting == "reuse" else "0"}
                r = in_child("bench.allocator", spec, env=env)
                runs.setdefault((loop, setting), []).append(r)
                print(f"{loop:9} {setting:7} {r['step_s']:.3f} s/step  {r['faults_per_step']:8.0f} faults/step  "
                      f"{r['kernel_s_per_step']:.3f} s kernel/step", file=sys.stderr)

    rows = []
    for (loop, setting), rs in runs.items():
        step = median([r["step_s"] for r in rs])
        base = median([r["step_s"] for r in runs[(loop, "default")]])
        rows.append({
            "loop": loop, "malloc": setting, "s/step": f"{step:.3f}", "images/s": f"{args.batch / step:.2f}",
            "vs default": f"{base / step:.3f}x", "page faults/step": f"{median([r['faults_per_step'] for r in rs]):,.0f}",
            "kernel s/step": f"{median([r['kernel_s_per_step'] for r in rs]):.3f}",
            "peak RSS MB": f"{max(r['peak_rss_mb'] for r in rs):,.0f}",
        })
    print(f"{args.preset}, batch {args.batch}, {precision}, {args.runs} processes x {args.steps} steps each")
    report("allocator", {"preset": args.preset, "batch": args.batch, "precision": precision, "rows": rows,
                         "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}}, args.json, rows, list(rows[0]))


if __name__ == "__main__":
    main()
