"""What in-training evaluation costs the demo: the defaults trained twice from scratch, without and with
train.eval_every (auto: at each checkpoint, 64 DPM++-20 samples against 64 training images, the reference
extracted once per machine and then cached). Run on a quiet machine:

    python -m bench.demo_eval_cost

Prints the wall time of each run, the evaluation's share, and the evaluations' figures from the second run's log.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench.common import parser, write_json
from bench.runner import ROOT, run


def main() -> None:
    args = parser(__doc__, "demo_eval_cost").parse_args()
    out = Path(tempfile.mkdtemp())
    # A fresh cache (unless RESDIFF_CACHE names one): the first reference extraction is counted. The FID weights are
    # converted into it first, untimed.
    env = {**os.environ, "RESDIFF_CACHE": os.environ.get("RESDIFF_CACHE", str(out / "cache"))}
    run([sys.executable, "-m", "resdiff.inception"], env=env)
    seconds = {}
    for name, extra in (("no-eval", ["train.eval_every=0"]), ("eval", [])):
        done = run([sys.executable, str(ROOT / "train.py"), "--out", str(out / name), *extra], echo=False, env=env)
        if done.code:
            raise SystemExit(f"train.py failed:\n{done.output[-3000:]}")
        seconds[name] = done.seconds
    share = (seconds["eval"] - seconds["no-eval"]) / seconds["eval"]
    print(f"demo without evaluation: {seconds['no-eval']:.1f} s; with: {seconds['eval']:.1f} s; evaluation share: "
          f"{share:.1%}")
    evaluations = [{k: v for k, v in r.items() if k != "time"} for r in map(json.loads, (out / "eval" / "log.jsonl")
                   .read_text().splitlines()) if any(k.startswith("fid@") for k in r)]
    print("\n".join(map(str, evaluations)) + f"\ncurve: {out / 'eval' / 'quality.png'}")
    path = write_json("demo_eval_cost", {"seconds": seconds, "evaluation_share": share, "evaluations": evaluations},
                      args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
