"""Does a 2-process run end? The README's torchrun line, N times in a row, each under a watchdog.

The hang this guards against was a race (about half of all runs hung after "done" before the fix,
see Trainer._end_distributed), so a single passing run proves little: repetition does.

    python bench/multiprocess_exit.py                 # 20 runs of train.py, without and with --standalone
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench.common import machine, table, write_json  # noqa: E402
from launch import Hang, free_port, launch_env, launcher, run_watched  # noqa: E402
from tiny_runs import write_pngs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="runs per launch form")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--timeout", type=float, default=120, help="seconds before a run counts as hung")
    p.add_argument("--json", help="where to write results (default bench/results/multiprocess_exit.json)")
    p.add_argument("--forms", nargs="+", default=["torchrun", "torchrun --standalone"], help="launcher forms to repeat")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pngs(Path(tmp) / "data", 24)
        for form in args.forms:
            hung, failed, times = 0, 0, []
            for k in range(args.runs):
                cmd = [launcher("torchrun"), *form.split()[1:], "--nproc_per_node", "2", "train.py",
                       "--data", str(data), "--steps", str(args.steps),
                       "--batch-size", "8", "--out", f"{tmp}/run-{len(rows)}-{k}"]
                start = time.perf_counter()
                try:
                    done = run_watched(cmd, timeout=args.timeout, env=launch_env(free_port()))
                    failed += done.returncode != 0
                    times.append(time.perf_counter() - start)
                    if done.returncode:
                        print(done.stderr[-2000:], file=sys.stderr)
                except Hang as err:
                    hung += 1
                    print(str(err)[:4000], file=sys.stderr)
                print(f"{form}: run {k + 1}/{args.runs}: {'hung' if len(times) + failed < k + 1 else 'ended'}", flush=True)
            rows.append({"launch": form, "runs": args.runs, "ended": args.runs - hung - failed, "failed": failed,
                         "hung": hung, "median s": round(sorted(times)[len(times) // 2], 1) if times else "-"})
    print(f"machine: {machine()}")
    print(table(rows, list(rows[0])))
    print(f"wrote {write_json('multiprocess_exit', {'rows': rows}, args.json)}")
    if any(r["hung"] or r["failed"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
