#!/usr/bin/env bash
# What in-training evaluation costs the demo: the defaults trained twice from scratch, without and with
# train.eval_every (auto: at each checkpoint, 64 DPM++-20 samples against 64 training images, the reference
# extracted once per machine and then cached). Run on a quiet machine from the repository root:
#     bash bench/demo_eval_cost.sh
# Prints the wall time of each run and the evaluations' figures from the second run's log.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=$(mktemp -d)
export RESDIFF_CACHE=${RESDIFF_CACHE:-$OUT/cache}   # a fresh cache: the first reference extraction is counted
$PY -m resdiff.inception                           # converts the FID weights into the cache (not timed)
t0=$(date +%s.%N); $PY train.py --out "$OUT/no-eval" train.eval_every=0 >/dev/null; t1=$(date +%s.%N)
$PY train.py --out "$OUT/eval" >/dev/null; t2=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" "$OUT" <<'PY'
import json, sys
t0, t1, t2, out = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
plain, evaluated = t1 - t0, t2 - t1
print(f"demo without evaluation: {plain:.1f} s; with: {evaluated:.1f} s; evaluation share: {(evaluated - plain) / evaluated:.1%}")
for line in open(f"{out}/eval/log.jsonl"):
    r = json.loads(line)
    if any(k.startswith("fid@") for k in r):
        print({k: v for k, v in r.items() if k != "time"})
print(f"curve: {out}/eval/quality.png")
PY
