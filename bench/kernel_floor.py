"""How close a training step comes to the floor its own compute kernels set.

MFU against a square matmul's peak says how far a step is from the hardware, but not how much of that
distance any U-Net implementation could close: the convolutions, matmuls and attention of a step run
in oneDNN's and torch's kernels, and some of those (a convolution's weight gradient, attention at
256 tokens) run well below the matmul peak at the step's shapes. This benchmark

1. records every convolution, matmul and attention call of one real training step, forward and
   backward, with its shapes, strides and dtypes (a TorchDispatchMode below autograd and autocast);
2. replays each call alone on fresh random tensors of the same layout and keeps its fastest time;
3. sums them: the step's **kernel floor**, the time a step would take if everything else (norms,
   activations, dropout, casts, the optimizer) cost nothing;
4. times the real steps (resdiff's Trainer and diffusers' example loop, alternating) and reports
   each as a share of its floor, and the floor's own MFU, the best any step built on these kernels
   can reach on this machine.

    python -m bench.kernel_floor                                  # ddpm-cifar10, fp32 and (where native) bf16
    python -m bench.kernel_floor --precisions bf16 --batch-size 16
    python -m bench.kernel_floor --presets tiny --rounds 1 --batch-size 2 --quick   # the plumbing only (tests)

Each (preset, precision) runs in its own process.
"""

from __future__ import annotations

import tempfile
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from bench.common import default_precisions, interleaved, matmul_peak, median, parser, report
from bench.loops import diffusers_step, make_trainer, resdiff_step
from bench.runner import child, in_child
from bench.train_step import flops_per_image

# The ops that do a step's FLOPs, by the name torch dispatches them under (below autograd and autocast).
KERNELS = {
    "convolution": ("convolution.default", "convolution_backward.default"),
    "matmul": ("mm.default", "addmm.default", "bmm.default", "baddbmm.default"),
    "attention": ("_scaled_dot_product_flash_attention_for_cpu.default", "_scaled_dot_product_flash_attention_for_cpu_backward.default",
                  "_scaled_dot_product_flash_attention.default", "_scaled_dot_product_flash_attention_backward.default",
                  "_scaled_dot_product_efficient_attention.default", "_scaled_dot_product_efficient_attention_backward.default",
                  "_scaled_dot_product_cudnn_attention.default", "_scaled_dot_product_cudnn_attention_backward.default"),
}
KIND = {name: kind for kind, names in KERNELS.items() for name in names}


class _Layout:
    """A tensor argument reduced to what its kernel's speed depends on."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype, self.device = tuple(t.shape), tuple(t.stride()), t.dtype, t.device

    def key(self) -> tuple:
        return ("T", self.shape, self.stride, self.dtype, str(self.device))

    def make(self) -> torch.Tensor:
        # Storage big enough for the strides; float values drawn as N(0, 1), like activations after a norm.
        size = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
        base = torch.empty(size, dtype=self.dtype, device=self.device)
        base.normal_() if self.dtype.is_floating_point else base.zero_()
        return base.as_strided(self.shape, self.stride)


def _freeze(tree):
    """Every tensor in ``tree`` (args, kwargs, nested lists) replaced by its layout."""
    return tree_map_only(torch.Tensor, _Layout, tree)


def _thaw(tree):
    return tree_map_only(_Layout, _Layout.make, tree)


def _key(tree) -> tuple:
    leaves, spec = tree_flatten(tree)
    return str(spec), tuple(leaf.key() if isinstance(leaf, _Layout) else repr(leaf) for leaf in leaves)


class _Recorder(TorchDispatchMode):
    """Notes each kernel call (op and argument layouts) and runs it unchanged."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, object, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__ in KIND:
            self.calls.append((func.__name__, func, _freeze(args), _freeze(kwargs)))
        return func(*args, **kwargs)


def record_kernels(fn: Callable[[], object]) -> list[tuple[str, object, tuple, dict]]:
    """The convolution, matmul and attention calls of one call of ``fn``, in order."""
    recorder = _Recorder()
    with recorder:
        fn()
    return recorder.calls


def kernel_floor(fn: Callable[[], object], repeats: int = 3, sync: Callable[[], None] = lambda: None) -> dict:
    """Seconds the kernels of one call of ``fn`` take when each runs alone (fastest of ``repeats``), by kind."""
    calls = record_kernels(fn)
    best: dict[tuple, float] = {}
    seconds = {kind: 0.0 for kind in KERNELS}
    counts = {kind: 0 for kind in KERNELS}
    for name, func, args, kwargs in calls:
        key = (name, _key(args), _key(kwargs))
        if key not in best:
            real_args, real_kwargs = _thaw(args), _thaw(kwargs)
            func(*real_args, **real_kwargs)  # warm-up: oneDNN builds its primitive for this shape here
            times = []
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                func(*real_args, **real_kwargs)
                sync()
                times.append(time.perf_counter() - start)
            best[key] = min(times)
            del real_args, real_kwargs
        seconds[KIND[name]] += best[key]
        counts[KIND[name]] += 1
    return {"seconds": seconds, "calls": counts, "distinct": len(best), "total": sum(seconds.values())}


def run_one(preset: str, precision: str, batch: int, rounds: int, steps_per_round: int, quick: bool = False) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    peak_size = dict(n=256, seconds=0.05) if quick else {}  # --quick: a figure, not a measurement
    peak = matmul_peak(dtype, "cuda" if torch.cuda.is_available() else "cpu", **peak_size)  # first, on an idle process
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(preset, precision, batch, workdir)
        steps = {"resdiff": resdiff_step(trainer, batch), "diffusers": diffusers_step(trainer, batch)[1]}
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        times = interleaved({k: (lambda f=f: [f() for _ in range(steps_per_round)]) for k, f in steps.items()}, rounds,
                            sync)
        floors = {k: kernel_floor(f, repeats=1 if quick else 3, sync=sync) for k, f in steps.items()}
        flops = batch * flops_per_image(trainer)
    result = {"preset": preset, "precision": precision, "batch": batch, "gflop_per_step": round(flops / 1e9, 1),
              "matmul_peak_tflops": round(peak / 1e12, 3)}
    for who, ts in times.items():
        step = median(ts) / steps_per_round
        floor = floors[who]
        result[who] = {"step_s": round(step, 4), "floor_s": round(floor["total"], 4),
                       "floor_by_kind_s": {k: round(v, 4) for k, v in floor["seconds"].items()},
                       "calls_by_kind": floor["calls"], "distinct_calls": floor["distinct"],
                       "floor_share": round(floor["total"] / step, 4), "mfu": round(flops / step / peak, 4),
                       "floor_mfu": round(flops / floor["total"] / peak, 4)}
    return result


def main() -> None:
    p = parser(__doc__, "kernel_floor")
    p.add_argument("--presets", nargs="+", default=["ddpm-cifar10"])
    p.add_argument("--precisions", nargs="+", default=None, choices=["no", "bf16", "fp16"],
                   help="default: no and bf16, or no alone where bf16 is emulated")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="check the plumbing: a small matmul peak, each kernel replayed once")
    args = p.parse_args()
    if args.child:
        return child(run_one, args.child)
    rows = [in_child("bench.kernel_floor", dict(preset=preset, precision=precision, batch=args.batch_size,
                                                rounds=args.rounds, steps_per_round=args.steps_per_round,
                                                quick=args.quick))
            for preset in args.presets for precision in args.precisions or default_precisions()]
    flat = []
    for r in rows:
        for who in ("resdiff", "diffusers"):
            w = r[who]
            flat.append({"preset": r["preset"], "precision": r["precision"], "batch": r["batch"], "loop": who,
                         "step s": f"{w['step_s']:.3f}", "floor s": f"{w['floor_s']:.3f}",
                         **{f"{k} s": f"{v:.3f}" for k, v in w["floor_by_kind_s"].items()},
                         "rest s": f"{w['step_s'] - w['floor_s']:.3f}", "floor/step": f"{w['floor_share']:.1%}",
                         "MFU": f"{w['mfu']:.1%}", "floor MFU": f"{w['floor_mfu']:.1%}"})
    report("kernel_floor", {"rows": rows}, args.json, flat, list(flat[0]))


if __name__ == "__main__":
    main()
