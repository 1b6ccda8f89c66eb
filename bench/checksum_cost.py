"""What the SHA256SUMS of a checkpoint cost, next to writing the checkpoint itself (ddpm-cifar10 by default).

A checkpoint of a 35.7M-parameter model is ~570 MB (weights, EMA pipeline, Adam's two moments). The run
hashes every file once, right after writing it (from the page cache), and again when it resumes. This
times, alternating round by round: the whole ``RunDir.save_checkpoint`` (write, SHA256SUMS, fsync, rename,
export of model/, rotation) and ``write_checksums`` alone on the folder just written, and reports the
medians and the share of the checkpoint the sums take.

Then what a resume pays to read it: ``RunDir.load_checkpoint`` (every file hashed against SHA256SUMS, then read
again by safetensors and torch.load) against reading each file once (its bytes hashed, then parsed from
memory), alternating. The second reads less but copies more; it measured slower, so resdiff reads twice. ``--cold`` evicts the checkpoint's files from the page cache
before every load (posix_fadvise DONTNEED, no root needed), as for a resume after a reboot or on another node.

    python -m bench.checksum_cost                       # ddpm-cifar10, 5 rounds, in a temporary folder
    python -m bench.checksum_cost --dir /scratch/x      # on the disk the runs use
    python -m bench.checksum_cost --cold                # loads from disk, not from the page cache
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from bench.common import interleaved, median, parser, report
from resdiff import UNet
from resdiff.checkpoint import TrainState
from resdiff.files import read_checksums, write_checksums
from resdiff.layout import CHECKSUMS, EMA, OPTIMIZER, STATE
from resdiff.rundir import RunDir


def state_of(model: torch.nn.Module, step: int) -> TrainState:
    """A real training state: weights, and AdamW after one step (so both moments exist)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return TrainState(step=step, epoch=0, batch=step, ema_updates=step, world_size=1, model=model.state_dict(),
                      optimizer=optimizer.state_dict(), lr_schedule={}, rng={"cpu": torch.get_rng_state()})


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (they are written back already: the checkpoint was fsynced)."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def load_read_once(path: Path) -> None:
    """The alternative a resume could take (tried, slower): read each file into memory once, hash those bytes
    against SHA256SUMS, then parse them from memory (safetensors.torch.load, torch.load of a BytesIO)."""
    import hashlib
    import io

    from safetensors.torch import load

    for folder in (path, path / EMA):
        sums, problem = read_checksums(folder)  # the one reader of SHA256SUMS
        assert problem is None and sums, f"{folder}: {problem or 'no ' + CHECKSUMS}"
        for name, digest in sums.items():
            data = (folder / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest
            if name.endswith(".safetensors"):
                load(data)
            elif name in (OPTIMIZER, "rng-0.pt"):
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            elif name == STATE:
                json.loads(data)


def main() -> None:
    p = parser(__doc__, "checksum_cost")
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", help="where to write the checkpoints (default: a temporary folder)")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each load")
    args = p.parse_args()

    torch.manual_seed(0)
    model = UNet.from_preset(args.preset)
    pipeline = DDPMPipeline(unet=UNet.from_preset(args.preset), scheduler=DDPMScheduler())
    state = state_of(model, 1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run = RunDir(Path(tmp) / "run")
        run.path.mkdir()
        saved: list[Path] = []

        def checkpoint() -> None:
            state.step += 1
            saved.append(run.save_checkpoint(state, pipeline, rank=0, agree=lambda ok: ok, keep=1))

        def sums() -> None:
            write_checksums(saved[-1] / EMA)
            write_checksums(saved[-1], skip=(EMA,))

        times = interleaved({"checkpoint": checkpoint, "checksums": sums}, args.rounds)
        size = sum(f.stat().st_size for f in saved[-1].rglob("*") if f.is_file())
        last, cpu = saved[-1], torch.device("cpu")

        def prepared(load):
            return lambda: (evict(last) if args.cold else None, load())

        times.update(interleaved({
            "load_checkpoint": prepared(lambda: run.load_checkpoint(last, rank=0, world=1, device=cpu)),
            "load_read_once": prepared(lambda: load_read_once(last)),
        }, args.rounds))
        shutil.rmtree(run.path)
    row = {
        "preset": args.preset, "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "checkpoint_MB": round(size / 1e6, 1), "checkpoint_s": round(median(times["checkpoint"]), 3),
        "checksums_s": round(median(times["checksums"]), 3),
        "checksum_share": round(median(times["checksums"]) / median(times["checkpoint"]), 3),
        "hash_MB_per_s": round(size / 1e6 / median(times["checksums"]), 1),
        "cold": args.cold, "load_checkpoint_s": round(median(times["load_checkpoint"]), 3),
        "load_read_once_s": round(median(times["load_read_once"]), 3),
    }
    report("checksum_cost", {"rows": [row], "seconds": times}, args.json, [row], list(row))


if __name__ == "__main__":
    main()
