"""KID, precision/recall and memorisation at FID scale: time and peak memory at n = 10,000 and 50,000.

    python bench/metrics_scale.py                          # n = 10000 and 50000, this machine's GPU if any, else CPU
    python bench/metrics_scale.py --n 10000 --device cpu
    torchrun --nproc_per_node 2 bench/metrics_scale.py --n 50000   # the work shared out (split=True)

Synthetic 2048-d features (two Gaussians, float32, as Inception's): the cost of the metrics depends on n and
d, not on what the features show. Each (metric, n) runs in a fresh process (one process or one torchrun
group), so the peak memory is its own: CPU peak resident memory above the features' baseline (ru_maxrss),
and on CUDA torch.cuda.max_memory_allocated. KID: 100 subsets of 1000 (evaluate.py's default); precision/
recall with k=3; memorisation of n samples against n training features; chunks of 1024 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=METRICS, default=None, help="(internal) run one metric in this process")
    args = parser.parse_args()
    if args.only is not None:
        row = one(args.only, args.n[0], args.device)
        if int(os.environ.get("RANK", 0)) == 0:
            print("ROW " + json.dumps(row), flush=True)
        return
    if "RANK" in os.environ:  # under torchrun: every process runs every measurement together
        for n in args.n:
            for metric in METRICS:
                row = one(metric, n, args.device)
                if int(os.environ["RANK"]) == 0:
                    print(json.dumps(row), flush=True)
        return
    for n in args.n:
        for metric in METRICS:
            out = subprocess.run([sys.executable, __file__, "--only", metric, "--n", str(n), "--device", args.device],
                                 capture_output=True, text=True)
            rows = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
            print(rows[0] if rows else f"{metric} n={n} failed: {out.stderr[-500:]}", flush=True)


if __name__ == "__main__":
    main()
