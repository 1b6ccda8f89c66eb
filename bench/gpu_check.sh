#!/usr/bin/env bash
# bench/gpu_check.sh: everything worth measuring on a borrowed GPU machine, in one run of under 8 minutes.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from anywhere; results in $OUT
#   bash bench/gpu_check.sh --cpu-smoke     # on any CPU machine: the same plumbing with the tiniest settings
#
# On a borrowed machine: `make gpu-wheels` here first, then run `bash bench/gpu_check.sh` there with bench/wheels
# carried along (it is git-ignored) and a wall-clock limit of about 9 minutes; the parts stop at GPU_CHECK_BUDGET.
#
# What it does, each part with a time limit (a part that fails or hangs is recorded, and the rest still runs; at the
# limit every process of the part, torchrun's workers included, gets SIGABRT so Python prints its stacks, then SIGKILL):
#   1. the machine: nvidia-smi -L, python, torch, CUDA, GPU count (exit 2 without a CUDA device, unless --cpu-smoke)
#   2. makes diffusers (and pyyaml, tqdm) importable: installs them from bench/wheels with pip --no-index when
#      missing (no network there). Prepare the wheels on a machine with PyPI access with `make gpu-wheels`,
#      then carry bench/wheels (it is git-ignored). Without them the parts that need diffusers are skipped.
#   3. PYTHONPATH=<repo root>, so `import resdiff` works from the tree (it is not pip-installed there)
#   4. the measured dense matmul peak of each dtype (needs torch only)
#   5. bench/train_step.py at ddpm-cifar10, batch 128: resdiff's Trainer step vs diffusers' training loop,
#      bf16 and fp16 (each precision in its own run, so one failing keeps the other's numbers)
#   6. bench/sample.py at ddpm-cifar10 in bf16, DDIM-50, 16 and 128 images
#   7. end to end: 512 generated PNGs, train.py (the cifar10 config, 50 steps, batch 128, bf16), sample.py -n 64;
#      img/s from the run's log.jsonl
#   8. with 2 or more GPUs: 30 steps of torchrun and of accelerate launch with 2 processes, checking that
#      log.jsonl records world_size 2 (a timeout is reported as a hang, with every process's Python stack)
#   9. bench/train_step.py in fp32 ("no"), if the time budget still allows it
#  10. one summary table, printed last and written to $OUT/summary.md
#
# Results go to $OUT (default: a new temporary folder): summary.md, steps.tsv (name, exit code, status, seconds),
# machine.json, train_step-*.json, sample-*.json, e2e/ (log.jsonl, the preview grid, the samples grid),
# ddp-*/log.jsonl, logs/<part>.log. Runs and checkpoints are written to a temporary folder, never to $OUT.
#
# Environment: OUT (results folder), PYTHON (interpreter; default python, else python3), GPU_CHECK_WHEELS
# (the wheel folder, default bench/wheels),
# GPU_CHECK_BUDGET (seconds for all parts, default 420: each part's timeout is cut to what is left),
# GPU_CHECK_KEEP=1 (keep the temporary run folder), GPU_CHECK_CPU_MULTI=1 (with --cpu-smoke: also try the
# 2-process torchrun part on CPU processes over gloo).
# Exit code: 0 when every part that ran passed, 1 when one failed or hung, 2 without a CUDA device (GPU mode).

set -u
ulimit -c 0 2>/dev/null  # SIGABRT (used to get stacks out of a hung process) must not write GPU-sized core files

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/bench/wheels}

install_wheels() {  # pip install PKG... from bench/wheels only, trying the flags an unwritable or managed Python needs
  local flags rc=1
  for flags in "" "--break-system-packages" "--user" "--user --break-system-packages"; do
    echo "+ $PY -m pip install --no-index --find-links $WHEELS $flags $*"
    # shellcheck disable=SC2086  # $flags is a list of words
    "$PY" -m pip install --disable-pip-version-check --no-input --no-index --find-links "$WHEELS" $flags "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then return 0; fi
  done
  return "$rc"
}

MODE=gpu
case "${1:-}" in
  --internal)  # `gpu_check.sh --internal install-wheels PKG...`: the install as a part of its own, under timeout
    shift
    if [ "${1:-}" = install-wheels ]; then shift; install_wheels "$@"; exit $?; fi
    echo "unknown internal command ${1:-}" >&2; exit 2 ;;
  --cpu-smoke) MODE=cpu ;;
  "") ;;
  -h|--help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac

OUT=${OUT:-}
if [ -z "$OUT" ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX"); fi
mkdir -p "$OUT/logs" || { echo "cannot create $OUT" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")
if [ "${GPU_CHECK_KEEP:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi
STEPS=$OUT/steps.tsv
printf 'name\trc\tstatus\tseconds\tartifact\n' > "$STEPS"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export RESDIFF_CACHE="$WORK/cache"  # the built-in demo data that bench/train_step.py builds
if [ "$MODE" = cpu ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

T0=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-420}  # all parts together; the summary and the kill grace come on top
MIN_PART=20                       # a part with less time than this left is skipped
N=0
FAILED=0

header() {
  N=$((N + 1))
  printf '\n===== [%d] %s (%s; %ds elapsed) =====\n' "$N" "$1" "$2" "$((SECONDS - T0))"
}

record() {  # record NAME RC STATUS SECONDS ARTIFACT
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STEPS"
}

skip() {  # skip NAME REASON
  header "$1" "skipped"
  echo "skipped: $2"
  record "$1" "-" "skipped: $2" 0 ""
}

part_pids() {  # the processes of the part with this token: they inherit GPU_CHECK_PART, even in a new session
  grep -lxzs "GPU_CHECK_PART=$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$"
}

# run NAME LIMIT_S ARTIFACT CMD...: CMD with a time limit, its output shown and kept in logs/NAME.log, its exit code
# and status recorded. At the limit every process of the part (torchrun's workers too, which run in sessions of their
# own) gets SIGABRT, so that Python prints each thread's stack (PYTHONFAULTHANDLER), and SIGKILL 10 s later.
run() {
  local name=$1 limit=$2 artifact=$3 left start rc status log token pid tail_pid deadline pids
  shift 3
  left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt "$MIN_PART" ]; then
    skip "$name" "out of time (${left}s of the ${BUDGET}s budget left)"
    return 1
  fi
  header "$name" "limit ${limit}s"
  local arg shown=()
  for arg in "$@"; do case "$arg" in *$'\n'*) shown+=("'<code>'") ;; *) shown+=("$arg") ;; esac; done
  echo "+ ${shown[*]}"
  log=$OUT/logs/${name//[^A-Za-z0-9._-]/_}.log
  token="$$.$N.$RANDOM"
  start=$SECONDS
  deadline=$((SECONDS + limit))
  : > "$log"  # before tail follows it
  GPU_CHECK_PART=$token "$@" >> "$log" 2>&1 < /dev/null &
  pid=$!
  tail -n +1 -s 0.2 -f --pid="$pid" "$log" &
  tail_pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    pids=$(part_pids "$token")
    echo ">>> ${limit}s limit reached: SIGABRT to $(echo "$pids" | wc -w) process(es) for their stacks" >> "$log"
    # shellcheck disable=SC2086  # a list of pids
    kill -ABRT $pids 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    pids=$(part_pids "$token")
    # shellcheck disable=SC2086
    if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null; fi
    wait "$pid" 2>/dev/null
    rc=124
  else
    wait "$pid"
    rc=$?
  fi
  pids=$(part_pids "$token")  # leftovers of a finished part (orphaned workers) would skew the next part
  if [ -n "$pids" ]; then
    echo ">>> killing leftover processes of this part: ${pids//$'\n'/ }" >> "$log"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
  fi
  wait "$tail_pid" 2>/dev/null
  case "$rc" in
    0) status=ok ;;
    124) status="HANG or too slow: no exit within ${limit}s (Python stacks in logs/$(basename "$log"))"; FAILED=1 ;;
    137) status="KILLED (SIGKILL: out of memory?)"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  echo "----- $name: $status in $((SECONDS - start))s"
  record "$name" "$rc" "$status" "$((SECONDS - start))" "$artifact"
  return "$rc"
}

# ------------------------------------------------------------------------------------------------ 1 machine
MACHINE_PY='
import json, platform, sys, warnings
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cuda_available=torch.cuda.is_available(), gpu_count=torch.cuda.device_count())
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["gpu_count"])]
        if info["gpu_count"]:
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cpu_threads"] = torch.get_num_threads()
    except Exception as err:
        info["torch_error"] = repr(err)
        info["gpu_count"] = 0
info["warnings"] = [str(w.message) for w in caught]
for k, v in info.items():
    print(f"{k:>15}: {v}")
json.dump(info, open(sys.argv[1], "w"), indent=1)
open(sys.argv[2], "w").write(str(info["gpu_count"]))
'

echo "gpu_check: mode $MODE, results in $OUT, runs in $WORK, python $PY, budget ${BUDGET}s"
printf '\n===== nvidia-smi =====\n'
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 30 nvidia-smi -L || echo "nvidia-smi -L failed"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv 2>/dev/null
else
  echo "no GPU (no nvidia-smi)"
fi
echo "CPU cores: $(nproc --all 2>/dev/null)  $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null)"
echo "0" > "$WORK/ngpu"
run machine 60 machine.json "$PY" -c "$MACHINE_PY" "$OUT/machine.json" "$WORK/ngpu"
NGPU=$(cat "$WORK/ngpu")
echo "GPU count seen by torch: $NGPU"
if [ "$MODE" = gpu ] && [ "$NGPU" -lt 1 ]; then
  echo "no CUDA device: run with --cpu-smoke to check the script's plumbing"
  exit 2
fi

# ------------------------------------------------------------------------------------------- 2 dependencies
DEPS_PY='
import importlib, sys
pip_names = {"diffusers": "diffusers", "yaml": "pyyaml", "tqdm": "tqdm", "accelerate": "accelerate", "einops": "einops",
             "safetensors": "safetensors", "PIL": "pillow", "numpy": "numpy", "torch": "torch"}
missing = []
for module, pip_name in pip_names.items():
    try:
        version = getattr(importlib.import_module(module), "__version__", "?")
        print(f"{module:>12}: {version}")
    except Exception as err:
        print(f"{module:>12}: MISSING ({type(err).__name__}: {err})")
        missing.append(pip_name)
open(sys.argv[1], "w").write(" ".join(missing))
'
echo "diffusers" > "$WORK/missing"
run dependencies 60 "" "$PY" -c "$DEPS_PY" "$WORK/missing"
MISSING=$(cat "$WORK/missing")
HAVE_DIFFUSERS=1
if [ -n "$MISSING" ]; then
  echo "missing: $MISSING"
  INSTALL=()
  for pkg in $MISSING; do  # only what bench/wheels has (torch, accelerate and the like are the machine's own)
    if compgen -G "$WHEELS/${pkg}-*.whl" >/dev/null || compgen -G "$WHEELS/${pkg^}-*.whl" >/dev/null \
       || { [ "$pkg" = pyyaml ] && compgen -G "$WHEELS/PyYAML-*.whl" >/dev/null; }; then
      INSTALL+=("$pkg")
    else
      echo "no wheel for $pkg in $WHEELS"
    fi
  done
  if [ "${#INSTALL[@]}" -gt 0 ]; then
    run install-wheels 180 "" bash "$ROOT/bench/gpu_check.sh" --internal install-wheels "${INSTALL[@]}"
  else
    header install-wheels "from $WHEELS"
    echo "FAILED: nothing to install from $WHEELS"
    record install-wheels - "FAILED: no wheels for $MISSING in $WHEELS" 0 ""
    FAILED=1
  fi
  if ! timeout 60 "$PY" -c "import diffusers, yaml, tqdm" 2>/dev/null; then
    HAVE_DIFFUSERS=0
    echo "diffusers (or pyyaml/tqdm) is not importable and could not be installed here: run \`make gpu-wheels\`" \
         "on a machine with PyPI access, then carry bench/wheels (carry: [\"bench/wheels\"]); skipping the parts that need diffusers"
  fi
fi
if [ "$HAVE_DIFFUSERS" = 1 ]; then
  run "import resdiff" 60 "" "$PY" -c "import resdiff, diffusers, accelerate; print('resdiff from', resdiff.__file__); print('diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" \
    || HAVE_DIFFUSERS=0
fi
need() {  # need NAME: true when the parts that need diffusers can run; else records the skip
  if [ "$HAVE_DIFFUSERS" = 1 ]; then return 0; fi
  skip "$1" "diffusers/resdiff not importable (make gpu-wheels, then carry bench/wheels)"
  return 1
}

# ----------------------------------------------------------------------------------------- 3 matmul peak
if [ "$MODE" = gpu ]; then
  PEAK_ARGS=(cuda 4096 1.0 bf16 fp16 fp32)
else
  PEAK_ARGS=(cpu 256 0.3 fp32)
fi
run "matmul peak" 60 matmul_peak.json "$PY" -c '
import json, sys, torch
from bench.common import matmul_peak
device, n, seconds, *names = sys.argv[2:]
dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
res = {name: round(matmul_peak(dtypes[name], device, n=int(n), seconds=float(seconds)) / 1e12, 3) for name in names}
res["tf32_matmul_allowed"] = torch.backends.cuda.matmul.allow_tf32
res["n"] = int(n)
print(res)
json.dump(res, open(sys.argv[1], "w"))
' "$OUT/matmul_peak.json" "${PEAK_ARGS[@]}"

# -------------------------------------------------------------------------------------- 4 train-step bench
train_step() {  # train_step PRECISION LIMIT
  local json=$OUT/train_step-$1.json
  if [ "$MODE" = gpu ]; then
    run "train-step $1" "$2" "$(basename "$json")" "$PY" bench/train_step.py --presets ddpm-cifar10 --precisions "$1" \
      --batch-size 128 --rounds 5 --steps-per-round 5 --json "$json"
  else
    run "train-step $1" "$2" "$(basename "$json")" "$PY" bench/train_step.py --presets tiny --precisions "$1" \
      --batch-size 4 --rounds 1 --steps-per-round 1 --quick --json "$json"
  fi
}
if [ "$MODE" = gpu ]; then
  need "train-step bf16" && train_step bf16 150
  need "train-step fp16" && train_step fp16 150
else
  need "train-step no" && train_step no 150
fi

# ---------------------------------------------------------------------------------------- 5 sampling bench
if [ "$MODE" = gpu ]; then
  for n in 16 128; do
    need "sample bf16 n=$n" && run "sample bf16 n=$n" 120 "sample-bf16-n$n.json" "$PY" bench/sample.py --preset ddpm-cifar10 \
      --precisions bf16 --num-images "$n" --steps 50 --rounds 3 --json "$OUT/sample-bf16-n$n.json"
  done
else
  need "sample no n=4" && run "sample no n=4" 120 "sample-no-n4.json" "$PY" bench/sample.py --preset tiny \
    --precisions no --num-images 4 --steps 2 --rounds 1 --json "$OUT/sample-no-n4.json"
fi

# -------------------------------------------------------------------------------------------- 6 end to end
DATA=$WORK/data
if [ "$MODE" = gpu ]; then
  N_IMAGES=512; SIZE=32; E2E_PRECISION=bf16
  TRAIN_ARGS=(--config cifar10 --steps 50 --batch-size 128 --mixed-precision bf16
              train.log_every=10 train.preview_steps=10 train.preview_images=16)
  SAMPLE_ARGS=(-n 64)
else
  N_IMAGES=16; SIZE=16; E2E_PRECISION=no
  TRAIN_ARGS=(--steps 2 --batch-size 4 --mixed-precision no
              model.channels=16 model.norm_groups=8 data.image_size=16 data.num_workers=0
              train.log_every=1 train.preview_steps=2 train.preview_images=4)
  SAMPLE_ARGS=(-n 4 --steps 2)
fi
HAVE_DATA=0
if need "e2e data"; then
  run "e2e data" 60 "" "$PY" -c 'import sys; from resdiff.data import write_demo_folder
print(write_demo_folder(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))' "$DATA" "$N_IMAGES" "$SIZE" && HAVE_DATA=1
fi
if [ "$HAVE_DATA" = 1 ]; then
  RUN_DIR=$WORK/run
  if run "e2e train" 180 e2e/log.jsonl "$PY" train.py --data "$DATA" --out "$RUN_DIR" --resume never "${TRAIN_ARGS[@]}"; then
    run "e2e sample" 90 e2e/grid.png "$PY" sample.py --model "$RUN_DIR" "${SAMPLE_ARGS[@]}" --out "$RUN_DIR/samples-check"
  else
    skip "e2e sample" "the e2e training failed"
  fi
  mkdir -p "$OUT/e2e"
  cp "$RUN_DIR/log.jsonl" "$OUT/e2e/" 2>/dev/null
  for PREVIEW in "$RUN_DIR"/samples/step-*.png; do :; done  # the last in name order: the newest step
  if [ -f "$PREVIEW" ]; then cp "$PREVIEW" "$OUT/e2e/preview-$(basename "$PREVIEW")"; fi
  cp "$RUN_DIR/samples-check/grid.png" "$OUT/e2e/grid.png" 2>/dev/null
  ls -la "$OUT/e2e"
elif [ "$HAVE_DIFFUSERS" = 1 ]; then
  skip "e2e train" "no image folder (the e2e data part failed)"
fi

# ------------------------------------------------------------------------------------- 7 two processes
world_check() {  # world_check NAME RUN_DIR: log.jsonl exists and every record says world_size 2
  "$PY" -c '
import json, sys
lines = open(sys.argv[1]).read().splitlines()
sizes = sorted({json.loads(l)["world_size"] for l in lines})
print(f"{len(lines)} log records, world_size {sizes}")
sys.exit(0 if lines and sizes == [2] else 1)' "$2/log.jsonl"
}
two_processes() {  # two_processes NAME LAUNCHER...: 30 steps of train.py under the launcher, then the world check
  local name=$1 dir=$WORK/$1
  shift
  if run "$name" 150 "$name/log.jsonl" "$@" train.py --data "$DATA" --out "$dir" --resume never "${DDP_ARGS[@]}"; then
    header "$name world_size" "log.jsonl"
    if world_check "$name" "$dir"; then
      record "$name world_size" 0 "ok: world_size 2" 0 ""
    else
      record "$name world_size" 1 "FAILED: log.jsonl does not say world_size 2" 0 ""
      FAILED=1
    fi
  fi
  mkdir -p "$OUT/$name"
  cp "$dir/log.jsonl" "$OUT/$name/" 2>/dev/null
}
if [ "$MODE" = gpu ] && [ "$NGPU" -ge 2 ] && [ "$HAVE_DATA" = 1 ]; then
  DDP_ARGS=(--config cifar10 --steps 30 --batch-size 64 --mixed-precision bf16
            train.log_every=10 train.preview_steps=10 train.preview_images=8)
  two_processes ddp-torchrun "$PY" -m torch.distributed.run --standalone --nproc_per_node 2
  two_processes ddp-accelerate "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision bf16 --dynamo_backend no --main_process_port 29517
elif [ "$MODE" = cpu ] && [ "${GPU_CHECK_CPU_MULTI:-0}" = 1 ] && [ "$HAVE_DATA" = 1 ]; then
  DDP_ARGS=("${TRAIN_ARGS[@]}")
  two_processes ddp-torchrun "$PY" -m torch.distributed.run --standalone --nproc_per_node 2
else
  skip "two processes" "needs 2 GPUs (torch sees ${NGPU}) and the e2e image folder"
fi

# ------------------------------------------------------------------------------------------ 8 fp32 last
if [ "$MODE" = gpu ]; then
  need "train-step no" && train_step no 150
fi

# -------------------------------------------------------------------------------------------- 9 summary
for log in "$OUT"/logs/*.log; do  # the end of each failed part's log, before the table
  name=$(basename "$log" .log)
  if awk -F'\t' -v n="$name" 'NR > 1 { gsub(/[^A-Za-z0-9._-]/, "_", $1) } NR > 1 && $1 == n && $2 != "0" && $2 != "-" { f = 1 } END { exit !f }' "$STEPS"; then
    printf '\n----- last lines of logs/%s.log -----\n' "$name"
    tail -n 15 "$log"
  fi
done

printf '\n===== summary (%ds) =====\n' "$((SECONDS - T0))"
if timeout 60 "$PY" - "$OUT" "$MODE" "$E2E_PRECISION" <<'EOF'
import csv, json, re, statistics, sys
from pathlib import Path

out, mode, e2e_precision = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


machine = load("machine.json") or {}
gpu = (machine.get("gpus") or ["no GPU"])[0]
# Nominal dense bf16/fp16 tensor-core peak (TFLOP/s), a second reference beside the measured matmul peak.
nominal = 756.0 if "H100" in gpu and "PCIe" in gpu else 835.0 if "H100 NVL" in gpu else 989.0 if ("H100" in gpu or "H200" in gpu) else None
peaks = load("matmul_peak.json") or {}


def num(x, fmt="{:.1f}"):
    return "" if x is None else fmt.format(x)


def pct(x):
    return "" if x is None else f"{x:.1%}"


cols = ["part", "precision", "resdiff img/s", "diffusers img/s", "ratio", "resdiff MFU", "diffusers MFU",
        "measured peak TFLOP/s", f"MFU vs nominal {nominal:.0f}" if nominal else "MFU vs nominal", "status", "note"]
rows, problems, skipped = [], [], []
with open(out / "steps.tsv") as f:
    steps = list(csv.DictReader(f, delimiter="\t"))
for step in steps:
    name, status, art = step["name"], step["status"], step["artifact"]
    status_cell = status if status.startswith("skipped") else f"{status} {step['seconds']}s"
    if status.startswith("skipped"):
        skipped.append(f"{name} ({status[len('skipped: '):]})")
    elif not status.startswith("ok"):
        problems.append(f"{name}: {status}")
    base = {"part": name, "status": status_cell}
    if name.startswith(("train-step ", "sample ")):
        base["precision"] = name.split()[1]
    if not status.startswith(("ok", "skipped")):  # the error line of a failed part's log, where there is one
        try:
            tail = (out / "logs" / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".log")).read_text(errors="replace").splitlines()
        except OSError:
            tail = []
        errors = [l.strip() for l in tail if re.search(r"Error|error:|failed|Aborted", l)]
        base["note"] = (errors[-1] if errors else "")[:160]
    data = load(art) if art.endswith(".json") else None
    if name.startswith("train-step") and data:
        for r in data["rows"]:
            ours, theirs, peak = r["resdiff"], r["diffusers"], r["matmul_peak_tflops"]
            vs_nominal = ""
            if nominal and r["precision"] in ("bf16", "fp16"):
                vs_nominal = f"{ours['mfu'] * peak / nominal:.1%} / {theirs['mfu'] * peak / nominal:.1%}"
            rows.append({**base, "part": f"train-step {r['preset']} b{r['batch']}", "precision": r["precision"],
                         "resdiff img/s": num(ours["images_per_s"]), "diffusers img/s": num(theirs["images_per_s"]),
                         "ratio": num(r["ratio"], "{:.3f}"), "resdiff MFU": pct(ours["mfu"]), "diffusers MFU": pct(theirs["mfu"]),
                         "measured peak TFLOP/s": f"{peak:.4g}", cols[8]: vs_nominal,
                         "note": f"{r['parameters'] / 1e6:.1f}M params, {r['gflop_per_image']} GFLOP/img fwd+bwd"})
    elif name.startswith("sample") and data:
        for r in data["rows"]:
            rows.append({**base, "part": f"sample {r['preset']} n={r['images']}", "precision": r["precision"],
                         "resdiff img/s": num(r["resdiff img/s"], "{:.2f}"), "diffusers img/s": num(r["diffusers img/s"], "{:.2f}"),
                         "ratio": num(r["ratio"], "{:.3f}"), "note": f"DDIM-{r['steps']}"})
    elif art.endswith("log.jsonl") and (out / art).is_file():  # e2e and the two-process runs: train.py's own log
        log = [json.loads(l) for l in (out / art).read_text().splitlines() if l.strip()]
        rates, logged = [r["images_per_s"] for r in log], [r["step"] for r in log]
        steady = rates[1:] or rates  # the first interval holds the warm-up
        rows.append({**base, "part": "e2e train.py" if name == "e2e train" else f"{name} train.py", "precision": e2e_precision,
                     "resdiff img/s": num(statistics.median(steady) if steady else None),
                     "note": f"median over logged steps {logged[1:] or logged}; first interval {rates[0] if rates else '-'} img/s; "
                             f"world_size {sorted({r['world_size'] for r in log})}"})
    elif name == "matmul peak" and peaks:
        rows.append({**base, "measured peak TFLOP/s": ", ".join(f"{k} {v}" for k, v in peaks.items() if k in ("bf16", "fp16", "fp32")),
                     "note": f"{peaks.get('n')}^3 matmul; TF32 matmul {'on' if peaks.get('tf32_matmul_allowed') else 'off'}"})
    else:
        rows.append(base)

lines = [f"gpu_check ({mode}): {gpu}; torch {machine.get('torch')}, CUDA {machine.get('cuda')}, python {machine.get('python')}, "
         f"{machine.get('gpu_count', 0)} GPU(s)", ""]
lines.append("| " + " | ".join(cols) + " |")
lines.append("|" + "|".join("---" for _ in cols) + "|")
lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |" for r in rows]
lines.append("")
lines.append("MFU: images/s x the model's fwd+bwd FLOPs (torch's flop counter) / the measured matmul peak of that dtype "
             "(bench/train_step.py, a 2048^3 matmul)" + (f"; 'MFU vs nominal': against {nominal:.0f} TFLOP/s, the dense "
             f"bf16/fp16 tensor-core peak of the {gpu}" if nominal else ""))
lines.append("problems: " + ("; ".join(problems) if problems else "none"))
lines.append("skipped: " + ("; ".join(skipped) if skipped else "none"))
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
then :; else echo "(the summary script failed; the parts as recorded:)"; cat "$STEPS"; fi
echo "results: $OUT (summary.md, steps.tsv, logs/)"
exit "$FAILED"
