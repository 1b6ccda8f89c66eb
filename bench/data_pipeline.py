"""The data pipeline on a dataset bigger than the cache: memory per process, and speed against the step it feeds.

    python -m bench.data_pipeline                     # 8192 PNGs (96x96) trained at 64x64: 96 MiB decoded, cache limit 48 MiB
    python -m bench.data_pipeline --images 512 --rounds 1   # a quick check of the plumbing

Memory: 2 processes under torchrun each read one epoch of their share (as training does), then hold at a barrier
while their memory is read from /proc: peak RSS (VmHWM), private memory (RssAnon), file pages mapped (RssFile)
and the proportional set size (Pss: shared pages split between the processes that map them). Contenders: the
prepared dataset (memory-mapped), the folder over its cache limit (read per batch), and the folder cached anyway
(data.cache=true: each process decodes its own private copy of everything).

Speed: images/s of one process drawing batches from each source (no model), against images/s of the training
step of the tiny and small presets at that image size, alternating round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import interleaved, machine, median, parser, report, table
from bench.runner import run, torchrun, torchrun_env

MODES = ("prepared", "folder, read per batch", "folder, cached (data.cache=true)")


def _memory() -> dict[str, float]:
    """This process's memory in MiB: peak RSS, and RSS split into private and file-backed pages, and Pss."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "RssAnon:", "RssFile:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) / 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) / 1024
    return out


def worker(args) -> None:
    """Under torchrun: one epoch of this rank's batches from one source, then its memory."""
    import torch
    import torch.distributed as dist

    from resdiff.batches import ShardedBatches
    from resdiff.data import ImageFolder
    from resdiff.prepare import PreparedImages

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    limit = int(args.cache_limit_mb * 2**20)
    if args.worker == "prepared":
        data = PreparedImages(args.prepared, args.size, 3)
    else:
        cache = True if "cached" in args.worker else "auto"
        data = ImageFolder(args.folder, args.size, 3, cache=cache, cache_limit=limit, warn=lambda _m: None)
    before = _memory()
    batches = ShardedBatches(data, args.batch_size, rank, world, seed=0, loader_kwargs={"num_workers": 0})
    start, seen = time.perf_counter(), 0
    for _, (images, _) in zip(range(batches.per_epoch), batches):
        seen += len(images)
    seconds = time.perf_counter() - start
    dist.barrier()  # every process has read its share: measure while all are alive
    mem = _memory()
    dist.barrier()
    Path(args.out, f"{rank}.json").write_text(json.dumps({"before": before, "after": mem, "images": seen, "seconds": seconds,
                                                          "mode": getattr(data, "mode", "")}))
    dist.destroy_process_group()
    del torch


def make_data(args) -> None:
    """The folder of PNGs and its prepared dataset, kept between runs."""
    import numpy as np
    from PIL import Image

    from resdiff.prepare import prepare

    folder = Path(args.folder)
    if len(list(folder.glob("*.png"))) != args.images:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(args.images):  # smooth random images: PNG sizes like photos', not like noise
            small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(small).resize((args.source_size, args.source_size), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.png")
    if not Path(args.prepared, "index.json").is_file():
        prepare(folder, args.prepared, args.size, 3, warn=lambda _m: None)


def memory_rows(args) -> list[dict]:
    rows = []
    for mode in args.sources:
        out = Path(args.workdir) / "memory" / mode.split(",")[0].split()[0] / ("cached" if "cached" in mode else "plain")
        out.mkdir(parents=True, exist_ok=True)
        cmd = torchrun("--nproc_per_node", "2", "-m", "bench.data_pipeline", "--worker", mode, "--out", str(out),
                       *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in _SHARED])
        done = run(cmd, echo=False, timeout=args.timeout, env=torchrun_env())
        if done.code:
            raise SystemExit(f"{mode}: exit code {done.code}:\n{done.output[-3000:]}")
        ranks = [json.loads((out / f"{r}.json").read_text()) for r in (0, 1)]
        rows.append({
            "source": mode,
            "peak RSS MiB (per process)": " / ".join(f"{r['after']['VmHWM']:.0f}" for r in ranks),
            "private MiB (RssAnon)": " / ".join(f"{r['after']['RssAnon']:.0f}" for r in ranks),
            "file pages MiB (RssFile)": " / ".join(f"{r['after']['RssFile']:.0f}" for r in ranks),
            "Pss MiB": " / ".join(f"{r['after']['Pss']:.0f}" for r in ranks),
            "raw": ranks,
        })
    return rows


_SHARED = ("folder", "prepared", "size", "cache_limit_mb", "batch_size")


def speed_rows(args) -> list[dict]:
    import torch

    from resdiff.build import build_trainer, model_keys
    from resdiff.config import load_config
    from resdiff.batches import ShardedBatches
    from resdiff.data import ImageFolder
    from resdiff.prepare import PreparedImages

    limit = int(args.cache_limit_mb * 2**20)
    sources = {
        "prepared (memory-mapped)": (PreparedImages(args.prepared, args.size, 3), 0),
        "folder, cached in memory": (ImageFolder(args.folder, args.size, 3, cache=True, warn=lambda _m: None), 0),
        "folder, read per batch, 0 workers": (ImageFolder(args.folder, args.size, 3, cache_limit=limit), 0),
        "folder, read per batch, 1 worker": (ImageFolder(args.folder, args.size, 3, cache_limit=limit), 1),
    }
    iterators = {}
    for name, (data, workers) in sources.items():
        kwargs = {"num_workers": workers, "persistent_workers": bool(workers), "prefetch_factor": 4 if workers else None}
        iterators[name] = iter(ShardedBatches(data, args.batch_size, 0, 1, seed=0, loader_kwargs=kwargs, flip=True))
    contenders = {name: (lambda it=it: [next(it) for _ in range(args.batches)]) for name, it in iterators.items()}
    for preset in args.presets:
        cfg = load_config(None, [f"model.preset={preset}", "model.attention_resolutions=[16]", f"data.image_size={args.size}", f"data.path={args.prepared}",
                                 f"train.batch_size={args.batch_size}", f"out={tempfile.mkdtemp(prefix='run-', dir=args.workdir)}",
                                 "train.eval_every=0", "train.warmup_steps=0"], model_keys=model_keys())
        trainer = build_trainer(cfg, resume="never", echo=lambda _m: None)
        images = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8)
        labels = torch.zeros(args.batch_size, dtype=torch.long)
        contenders[f"training step, {preset} preset"] = lambda t=trainer: t.train_step(images, labels)
    times = interleaved(contenders, args.rounds)
    rows = []
    for name, ts in times.items():
        per_call = args.batch_size * (1 if name.startswith("training") else args.batches)
        rows.append({"what": name, "images/s": f"{per_call / median(ts):.0f}", "seconds": ts})
    return rows


def main() -> None:
    p = parser(__doc__, "data_pipeline")
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--size", type=int, default=64, help="training image size")
    p.add_argument("--source-size", type=int, default=96, help="side of the PNG files")
    p.add_argument("--cache-limit-mb", type=float, default=None, help="default: half the decoded dataset")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="batches drawn per timed round of a data source")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--presets", nargs="*", default=["tiny", "small"])
    p.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "resdiff-bench-data"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--sources", nargs="+", choices=MODES, default=list(MODES), help="whose memory to measure (default: all)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    args.folder = args.folder or str(Path(args.workdir) / f"pngs-{args.images}-{args.source_size}px")
    args.prepared = args.prepared or str(Path(args.workdir) / f"prepared-{args.images}-{args.size}px")
    decoded = args.images * 3 * args.size**2
    args.cache_limit_mb = args.cache_limit_mb or decoded / 2 / 2**20
    make_data(args)
    result = {"images": args.images, "size": args.size, "decoded_mib": decoded / 2**20, "cache_limit_mib": args.cache_limit_mb,
              "cpus": len(os.sched_getaffinity(0)), "threads": os.environ.get("OMP_NUM_THREADS")}
    print(f"{args.images} images decoded at {args.size}x{args.size}: {decoded / 2**20:.0f} MiB; cache limit "
          f"{args.cache_limit_mb:.0f} MiB; {machine()}")
    if not args.skip_memory:
        result["memory"] = memory_rows(args)
        print(table(result["memory"], [c for c in result["memory"][0] if c != "raw"]))
    result["speed"] = speed_rows(args)
    report("data_pipeline", result, args.json, result["speed"], ["what", "images/s"])


if __name__ == "__main__":
    main()
