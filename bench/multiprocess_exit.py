"""Does a 2-process run end? The README's torchrun line, N times in a row, each under a watchdog.

The hang this guards against was a race (about half of all runs hung after "done" before the fix,
see Trainer._end_distributed), so a single passing run proves little: repetition does. A run that
has not ended at --timeout counts as hung; its processes' Python stacks are printed (bench.runner).

    python -m bench.multiprocess_exit                 # 20 runs of train.py, without and with --standalone
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import parser, report
from bench.runner import ROOT, run, torchrun, torchrun_env


def main() -> None:
    p = parser(__doc__, "multiprocess_exit")
    p.add_argument("--runs", type=int, default=20, help="runs per launch form")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--timeout", type=float, default=120, help="seconds before a run counts as hung")
    p.add_argument("--forms", nargs="+", default=["torchrun", "torchrun --standalone"], help="launcher forms to repeat")
    args = p.parse_args()

    from resdiff.data import write_demo_folder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_folder(Path(tmp) / "data", 24, 16)
        for form in args.forms:
            runs = []
            for k in range(args.runs):
                runs.append(run(torchrun(*form.split()[1:], "--nproc_per_node", "2", "train.py", "--data", str(data),
                                         "--steps", str(args.steps), "--batch-size", "8", "--out",
                                         f"{tmp}/run-{len(rows)}-{k}"), echo=False, timeout=args.timeout,
                                env=torchrun_env(), cwd=ROOT))
                if runs[-1].code:
                    print(runs[-1].output[-4000:], file=sys.stderr)
                print(f"{form}: run {k + 1}/{args.runs}: {'hung' if runs[-1].timed_out else 'ended'}", flush=True)
            times = sorted(r.seconds for r in runs if not r.timed_out)
            hung = sum(r.timed_out for r in runs)
            failed = sum(bool(r.code) for r in runs) - hung
            rows.append({"launch": form, "runs": args.runs, "ended": args.runs - hung - failed, "failed": failed,
                         "hung": hung, "median s": round(times[len(times) // 2], 1) if times else "-"})
    report("multiprocess_exit", {"rows": rows}, args.json, rows, list(rows[0]))
    if any(r["hung"] or r["failed"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
