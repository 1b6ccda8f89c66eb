"""What the SHA256SUMS of a checkpoint cost, next to writing the checkpoint itself (ddpm-cifar10 by default).

A checkpoint of a 35.7M-parameter model is ~570 MB (weights, EMA pipeline, Adam's two moments). The run
hashes every file once, right after writing it (from the page cache), and again when it resumes. This
times, alternating round by round: the whole ``RunDir.save_checkpoint`` (write, SHA256SUMS, fsync, rename,
export of model/, rotation) and ``write_checksums`` alone on the folder just written, and reports the
medians and the share of the checkpoint the sums take.

    python bench/checksum_cost.py                       # ddpm-cifar10, 5 rounds, in a temporary folder
    python bench/checksum_cost.py --dir /scratch/x      # on the disk the runs use
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402

from bench.common import interleaved, median, table, write_json  # noqa: E402
from resdiff import UNet  # noqa: E402
from resdiff.files import write_checksums  # noqa: E402
from resdiff.rundir import EMA, RunDir, TrainState  # noqa: E402


def state_of(model: torch.nn.Module, step: int) -> TrainState:
    """A real training state: weights, and AdamW after one step (so both moments exist)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return TrainState(step=step, epoch=0, batch=step, ema_updates=step, world_size=1, model=model.state_dict(),
                      optimizer=optimizer.state_dict(), lr_schedule={}, rng={"cpu": torch.get_rng_state()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", help="where to write the checkpoints (default: a temporary folder)")
    p.add_argument("--json", help="where to write results (default bench/results/checksum_cost.json)")
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
        shutil.rmtree(run.path)
    row = {
        "preset": args.preset, "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "checkpoint_MB": round(size / 1e6, 1), "checkpoint_s": round(median(times["checkpoint"]), 3),
        "checksums_s": round(median(times["checksums"]), 3),
        "checksum_share": round(median(times["checksums"]) / median(times["checkpoint"]), 3),
        "hash_MB_per_s": round(size / 1e6 / median(times["checksums"]), 1),
    }
    print(table([row], list(row)))
    out = write_json("checksum_cost", {"rows": [row], "seconds": times}, args.json)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
