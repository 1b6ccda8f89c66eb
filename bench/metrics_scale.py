"""KID, precision/recall and memorisation at FID scale: time and peak memory at n = 10,000 and 50,000.

    python -m bench.metrics_scale                          # n = 10000 and 50000, this machine's GPU if any, else CPU
    python -m bench.metrics_scale --n 10000 --device cpu
    torchrun --nproc_per_node 2 -m bench.metrics_scale --n 50000   # the work shared out (split=True)

Synthetic 2048-d features (two Gaussians, float32, as Inception's): the cost of the metrics depends on n and
d, not on what the features show. Each (metric, n) runs in a fresh process (one process or one torchrun
group), so the peak memory is its own: CPU peak resident memory above the features' baseline (ru_maxrss),
and on CUDA torch.cuda.max_memory_allocated. KID: 100 subsets of 1000 (evaluate.py's default); precision/
recall with k=3; memorisation of n samples against n training features; chunks of 1024 rows.
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch

from bench.common import parser, report
from bench.runner import child, in_child

METRICS = ("kid", "precision_recall", "memorisation")


def one(metric: str, n: int, device: str) -> dict:
    """Time and peak memory of one metric at n, in this process (every process of a torchrun group calls it)."""
    from resdiff import metrics

    if "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = f"cuda:{torch.cuda.current_device()}"
    g = torch.Generator().manual_seed(0)
    real = torch.randn(n, 2048, generator=g)
    fake = torch.randn(n, 2048, generator=g) * 1.1 + 0.05
    split = torch.distributed.is_initialized()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if metric == "kid":
        metrics.kid(fake, real, subsets=100, subset_size=1000, device=device, split=split)
    elif metric == "precision_recall":
        metrics.precision_recall(real, fake, k=3, device=device, split=split)
    else:
        metrics.memorisation(real, fake, device=device, split=split)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"metric": metric, "n": n, "device": device, "processes": torch.distributed.get_world_size() if split else 1,
           "seconds": round(seconds, 2),
           "cpu_peak_MB_above_features": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)}
    if device.startswith("cuda"):
        row["gpu_peak_MB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if split:
        torch.distributed.destroy_process_group()
    return row


def main() -> None:
    p = parser(__doc__.split("\n")[0], "metrics_scale")
    p.add_argument("--n", type=int, nargs="+", default=[10000, 50000])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.child:
        return child(one, args.child)
    rows = []
    for n in args.n:
        for metric in METRICS:
            if "RANK" in os.environ:  # under torchrun: every process runs every measurement together
                rows.append(one(metric, n, args.device))
            else:
                try:
                    rows.append(in_child("bench.metrics_scale", dict(metric=metric, n=n, device=args.device)))
                except SystemExit as failed:  # out of memory at this n, say: the other measurements still run
                    print(failed, flush=True)
                    continue
            print(json.dumps(rows[-1]), flush=True)
    if rows and int(os.environ.get("RANK", 0)) == 0:
        report("metrics_scale", {"rows": rows}, args.json, rows, list(rows[0]))


if __name__ == "__main__":
    main()
