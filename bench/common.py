"""Shared benchmark helpers: the machine, its matmul peak, FLOP counts, interleaved timing, tables, result files.

Timings on a shared machine are noisy, so every comparison alternates the contenders round by
round inside one process and reports medians and their ratio, never a single run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """A one-line description of where the numbers come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from resdiff.hardware import bf16_is_native

    bf16 = "bf16 native" if bf16_is_native("cpu") else "bf16 emulated"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else torch.backends.cpu.get_cpu_capability()
    return f"{cpu} ({isa}, {bf16}), {torch.get_num_threads()} threads (torch {torch.__version__})"


def default_precisions() -> list[str]:
    """fp32 and bf16 where bf16 runs in hardware; fp32 alone elsewhere (emulated bf16 takes many times longer)."""
    from resdiff.hardware import bf16_is_native

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if bf16_is_native(device):
        return ["no", "bf16"]
    print(f"note: bf16 is emulated on this {device} ({torch.backends.cpu.get_cpu_capability()}), so only fp32 is timed; "
          f"pass --precisions no bf16 to time it anyway", file=sys.stderr)
    return ["no"]


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 2.0) -> float:
    """Measured dense matmul throughput in FLOP/s: the ceiling MFU is reported against.

    Square products from 512 (or ``n`` if smaller) doubling up to ``n``, each size timed for about
    ``seconds / 2``; the best rate wins. The doubling stops early once one product takes over 0.2 s,
    so a dtype the hardware only emulates costs seconds: one 2048³ bf16 product took 90 s on an
    AVX2 core, and three of them timed out the benchmark tests."""
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    best, size = 0.0, min(512, n)
    while True:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up
        end = time.perf_counter() + seconds / 2
        while True:
            sync()
            start = time.perf_counter()
            a @ b
            sync()
            took = time.perf_counter() - start
            best = max(best, 2 * size**3 / took)
            if time.perf_counter() > end:
                break
        if size >= n or took > 0.2:
            return best
        size = min(2 * size, n)


def count_flops(fn: Callable[[], object], custom_mapping: dict | None = None) -> int:
    """FLOPs of one call of ``fn`` as torch's flop counter sees them (matmuls and convolutions; ``custom_mapping``:
    its formulas replaced for some ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=custom_mapping or {}) as counter:
        fn()
    return counter.get_total_flops()


def interleaved(contenders: dict[str, Callable[[], None]], rounds: int, sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each contender, alternating them every round (after one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    sync()
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) in the given column order."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def write_json(name: str, payload: dict, path: str | Path | None = None) -> Path:
    """Write results to ``path`` or bench/results/NAME.json, with the machine and date, whole (a temporary name, then
    renamed: a benchmark killed while writing never leaves half a file)."""
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}, indent=1))
    tmp.replace(out)
    return out


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as the help, --json, and --child (a measurement in a fresh process,
    bench.runner.in_child)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help=f"where to write the results (default bench/results/{name}.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def report(name: str, payload: dict, path: str | None, rows: list[dict], columns: list[str]) -> Path:
    """The end of a benchmark: the machine and the table of ``rows`` printed, the results written."""
    print(f"machine: {machine()}\n{table(rows, columns)}")
    out = write_json(name, payload, path)
    print(f"wrote {out}", flush=True)
    return out


COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::clone")  # a cast is a _to_copy (+ its copy_); clone copies too


def op_counts(fn: Callable[[], object], ops: tuple[str, ...] = COPY_OPS) -> dict[str, int]:
    """How often each of ``ops`` runs in one call of ``fn`` (torch.profiler, CPU ops, nested calls included).

    Which ops run, and in which dtype, does not depend on the hardware: the counts of a bf16 step are the
    same on a CPU that emulates bf16 as on one that runs it natively."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {op: 0 for op in ops}
    for event in prof.events():
        if event.name in counts:
            counts[event.name] += 1
    return counts
