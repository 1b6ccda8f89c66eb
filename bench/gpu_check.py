"""Everything worth measuring on a borrowed GPU machine, in one run of under 8 minutes.

    bash bench/gpu_check.sh                 # on the GPU machine, from anywhere; results in $OUT
    bash bench/gpu_check.sh --cpu-smoke     # on any CPU machine: the same plumbing with the tiniest settings
    python -m bench.gpu_check [--cpu-smoke] # the same, from the repository root

On a borrowed machine: `make gpu-wheels` here first, then run it there with bench/wheels carried along (it is
git-ignored) and a wall-clock limit of about 9 minutes; the parts stop at GPU_CHECK_BUDGET.

Each part runs in its own processes with a time limit (bench.runner.run): a part that fails or hangs is recorded
and the rest still run; at the limit every process of the part, torchrun's workers included, gets SIGABRT so that
Python prints its stacks, then SIGKILL.
  1. the machine: nvidia-smi -L, python, torch, CUDA, GPU count (exit 2 without a CUDA device, unless --cpu-smoke)
  2. diffusers (and pyyaml, tqdm) importable: installed from bench/wheels with pip --no-index when missing (there
     is no network there; `make gpu-wheels` fetches them). Without them the parts that need diffusers are skipped
  3. the measured dense matmul peak of each dtype (needs torch only)
  4. bench.train_step at ddpm-cifar10, batch 128: resdiff's Trainer step vs diffusers' training loop, bf16 and
     fp16 (each precision in its own run, so one failing keeps the other's numbers)
  5. bench.sample at ddpm-cifar10 in bf16, DDIM-50, 16 and 128 images
  6. end to end: 512 generated PNGs, train.py (the cifar10 config, 50 steps, batch 128, bf16), sample.py -n 64;
     img/s from the run's log.jsonl
  7. with 2 or more GPUs: 30 steps of torchrun and of accelerate launch with 2 processes, checking that log.jsonl
     records world_size 2 (a timeout is reported as a hang, with every process's Python stack)
  8. bench.train_step in fp32 ("no"), if the time budget still allows it
  9. one summary table, printed last and written to OUT/summary.md

Results go to OUT (default: a new temporary folder): summary.md, steps.tsv (name, exit code, status, seconds),
machine.json, matmul_peak.json, train_step-*.json, sample-*.json, e2e/ (log.jsonl, the preview grid, the samples
grid), ddp-*/log.jsonl, logs/PART.log. Runs and checkpoints are written to a temporary folder, never to OUT.
Environment: OUT, GPU_CHECK_WHEELS (default bench/wheels), GPU_CHECK_BUDGET (seconds for all parts, default 420:
each part's limit is cut to what is left), GPU_CHECK_KEEP=1 (keep the temporary folder), GPU_CHECK_CPU_MULTI=1
(with --cpu-smoke: also the 2-process torchrun part, on CPU processes over gloo).
Exit code: 0 when every part that ran passed, 1 when one failed or hung, 2 without a CUDA device (GPU mode).

Only the parts import torch, diffusers or resdiff (this process needs the standard library alone).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.runner import ROOT, Finished, child, parse_result, run

PY = sys.executable
MIN_PART = 20  # seconds: a part with less time than this left is skipped
# The modules checked (and their pip names); only those bench/wheels holds are installed (torch, accelerate and the
# like are the machine's own).
MODULES = {"diffusers": "diffusers", "yaml": "pyyaml", "tqdm": "tqdm", "accelerate": "accelerate", "einops": "einops",
           "safetensors": "safetensors", "PIL": "pillow", "numpy": "numpy", "torch": "torch"}
NEEDS_DIFFUSERS = "diffusers/resdiff not importable (make gpu-wheels, then carry bench/wheels)"


# ------------------------------------------------------------ the parts that run in a child of their own


def machine(path: str) -> dict:
    """python, torch, CUDA and the GPUs, printed and written to ``path``."""
    import platform
    import warnings

    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cuda_available=torch.cuda.is_available(), gpu_count=torch.cuda.device_count())
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["gpu_count"])]
        if info["gpu_count"]:
            info.update(capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                        bf16_supported=torch.cuda.is_bf16_supported(),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        info["cpu_threads"] = torch.get_num_threads()
    info["warnings"] = [str(w.message) for w in caught]
    from bench.common import write_json

    write_json("machine", info, path)
    print("\n".join(f"{k:>15}: {v}" for k, v in info.items()))
    return {"gpu_count": info["gpu_count"]}


def importable() -> dict:
    """Which of MODULES import here (their versions printed), as the pip names of those that do not."""
    missing = []
    for module, pip_name in MODULES.items():
        try:
            print(f"{module:>12}: {getattr(importlib.import_module(module), '__version__', '?')}")
        except Exception as err:  # noqa: BLE001 (a broken install fails in any way)
            print(f"{module:>12}: MISSING ({type(err).__name__}: {err})")
            missing.append(pip_name)
    return {"missing": missing}


def install(packages: list[str], wheels: str) -> dict:
    """pip install ``packages`` from ``wheels`` only, trying the flags an unwritable or managed Python needs."""
    for flags in ([], ["--break-system-packages"], ["--user"], ["--user", "--break-system-packages"]):
        cmd = [PY, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-index", "--find-links",
               wheels, *flags, *packages]
        print(f"+ {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode == 0:
            return {"flags": flags}
    raise SystemExit(f"error: pip could not install {' '.join(packages)} from {wheels}")


def matmul_peaks(path: str, device: str, n: int, seconds: float, dtypes: list[str]) -> dict:
    """The measured dense matmul peak (TFLOP/s) of each dtype, written to ``path``."""
    import torch

    from bench.common import matmul_peak, write_json

    kinds = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    res = {name: round(matmul_peak(kinds[name], device, n=n, seconds=seconds) / 1e12, 3) for name in dtypes}
    res.update(tf32_matmul_allowed=torch.backends.cuda.matmul.allow_tf32, n=n)
    print(res)
    write_json("matmul_peak", res, path)
    return res


def demo_data(path: str, n: int, size: int) -> dict:
    from resdiff.data import write_demo_folder

    return {"folder": str(write_demo_folder(path, n, size))}


PARTS = {f.__name__: f for f in (machine, importable, install, matmul_peaks, demo_data)}


def part(name: str, **spec) -> list[str]:
    """The command of one of PARTS in a child process."""
    return [PY, "-m", "bench.gpu_check", "--child", json.dumps({"part": name, **spec})]


# ------------------------------------------------------------------------------- the run of the parts


def log_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class Parts:
    """The parts' time budget, their logs (OUT/logs/PART.log) and their record (OUT/steps.tsv, as they end)."""

    def __init__(self, out: Path, budget: int):
        self.out, self.budget, self.start, self.count, self.failed, self.rows = out, budget, time.monotonic(), 0, False, []
        (out / "steps.tsv").write_text("name\trc\tstatus\tseconds\tartifact\n")

    def elapsed(self) -> int:
        return int(time.monotonic() - self.start)

    def header(self, name: str, note: str) -> None:
        self.count += 1
        print(f"\n===== [{self.count}] {name} ({note}; {self.elapsed()}s elapsed) =====", flush=True)

    def record(self, name: str, rc: int | str, status: str, seconds: int, artifact: str = "") -> None:
        self.rows.append(dict(name=name, rc=str(rc), status=status, seconds=str(seconds), artifact=artifact))
        self.failed |= not status.startswith(("ok", "skipped"))
        with open(self.out / "steps.tsv", "a") as f:
            f.write("\t".join(self.rows[-1].values()) + "\n")

    def skip(self, name: str, reason: str) -> None:
        self.header(name, "skipped")
        print(f"skipped: {reason}")
        self.record(name, "-", f"skipped: {reason}", 0)

    def run(self, name: str, limit: int, command: list[str], artifact: str = "") -> Finished | None:
        """``command`` as part ``name``, within ``limit`` seconds and what is left of the budget; None if skipped."""
        left = self.budget - self.elapsed()
        if min(limit, left) < MIN_PART:
            self.skip(name, f"out of time ({left}s of the {self.budget}s budget left)")
            return None
        limit = min(limit, left)
        self.header(name, f"limit {limit}s")
        print(f"+ {shlex.join(command)}", flush=True)
        done = run(command, log=self.out / "logs" / f"{log_name(name)}.log", timeout=limit)
        status = {0: "ok", 137: "KILLED (SIGKILL: out of memory?)",
                  124: f"HANG or too slow: no exit within {limit}s (Python stacks in logs/{log_name(name)}.log)"}.get(
            done.code, f"FAILED (exit {done.code})")
        print(f"----- {name}: {status} in {done.seconds:.0f}s", flush=True)
        self.record(name, done.code, status, round(done.seconds), artifact)
        return done


def ok(done: Finished | None) -> bool:
    return done is not None and done.code == 0


def dependencies(parts: Parts, wheels: Path) -> bool:
    """Whether the parts that need diffusers and resdiff can run, after installing what is missing from ``wheels``."""
    done = parts.run("dependencies", 60, part("importable"))
    missing = (parse_result(done.output) or {}).get("missing", ["diffusers"]) if done else ["diffusers"]
    if missing:
        print(f"missing: {' '.join(missing)}")
        names = [f.name.lower() for f in wheels.glob("*.whl")]
        found = [pkg for pkg in missing if any(n.startswith(pkg + "-") for n in names)]
        for pkg in sorted(set(missing) - set(found)):
            print(f"no wheel for {pkg} in {wheels}")
        if found:
            parts.run("install-wheels", 180, part("install", packages=found, wheels=str(wheels)))
        else:
            parts.header("install-wheels", f"from {wheels}")
            print(f"FAILED: nothing to install from {wheels}")
            parts.record("install-wheels", "-", f"FAILED: no wheels for {' '.join(missing)} in {wheels}", 0)
        if run([PY, "-c", "import diffusers, yaml, tqdm"], echo=False, timeout=60).code:
            print("diffusers (or pyyaml/tqdm) is not importable and could not be installed here: run `make gpu-wheels` "
                  "on a machine with PyPI access, then carry bench/wheels (carry: [\"bench/wheels\"]); skipping the "
                  "parts that need diffusers")
            return False
    return ok(parts.run("import resdiff", 60, [PY, "-c", "import resdiff, diffusers, accelerate; print('resdiff from', "
                        "resdiff.__file__); print('diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)"]))


def world_size_check(parts: Parts, name: str, run_dir: Path) -> None:
    """The record of ``name``'s log.jsonl saying world_size 2 in every line."""
    parts.header(f"{name} world_size", "log.jsonl")
    log = run_dir / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    sizes = sorted({r["world_size"] for r in records})
    print(f"{len(records)} log records, world_size {sizes}")
    if records and sizes == [2]:
        parts.record(f"{name} world_size", 0, "ok: world_size 2", 0)
    else:
        parts.record(f"{name} world_size", 1, "FAILED: log.jsonl does not say world_size 2", 0)


def check(gpu: bool, out: Path, work: Path) -> int:
    parts = Parts(out, int(os.environ.get("GPU_CHECK_BUDGET", 420)))
    print(f"gpu_check: mode {'gpu' if gpu else 'cpu'}, results in {out}, runs in {work}, python {PY}, "
          f"budget {parts.budget}s\n\n===== nvidia-smi =====")
    if shutil.which("nvidia-smi"):
        for query in (["-L"], ["--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm", "--format=csv"]):
            run(["nvidia-smi", *query], timeout=30)
    else:
        print("no GPU (no nvidia-smi)")
    print(f"CPU cores: {os.cpu_count()}")
    done = parts.run("machine", 60, part("machine", path=str(out / "machine.json")), "machine.json")
    gpus = (parse_result(done.output) or {}).get("gpu_count", 0) if done else 0
    print(f"GPU count seen by torch: {gpus}")
    if gpu and gpus < 1:
        print("no CUDA device: run with --cpu-smoke to check the script's plumbing")
        return 2
    have = dependencies(parts, Path(os.environ.get("GPU_CHECK_WHEELS") or ROOT / "bench" / "wheels"))

    def needs_diffusers(name: str, limit: int, command: list[str], artifact: str = "") -> Finished | None:
        if have:
            return parts.run(name, limit, command, artifact)
        parts.skip(name, NEEDS_DIFFUSERS)
        return None

    peak = dict(device="cuda", n=4096, seconds=1.0, dtypes=["bf16", "fp16", "fp32"]) if gpu else dict(
        device="cpu", n=256, seconds=0.3, dtypes=["fp32"])
    parts.run("matmul peak", 60, part("matmul_peaks", path=str(out / "matmul_peak.json"), **peak), "matmul_peak.json")

    def train_step(precision: str) -> None:
        sizes = (["--presets", "ddpm-cifar10", "--batch-size", "128", "--rounds", "5", "--steps-per-round", "5"] if gpu
                 else ["--presets", "tiny", "--batch-size", "4", "--rounds", "1", "--steps-per-round", "1", "--quick"])
        path = out / f"train_step-{precision}.json"
        needs_diffusers(f"train-step {precision}", 150, [PY, "-m", "bench.train_step", *sizes, "--precisions", precision,
                                                         "--json", str(path)], path.name)

    for precision in ["bf16", "fp16"] if gpu else ["no"]:
        train_step(precision)
    precision = "bf16" if gpu else "no"
    for n in [16, 128] if gpu else [4]:
        path = out / f"sample-{precision}-n{n}.json"
        needs_diffusers(f"sample {precision} n={n}", 120, [
            PY, "-m", "bench.sample", "--preset", "ddpm-cifar10" if gpu else "tiny", "--precisions", precision,
            "--num-images", str(n), "--steps", "50" if gpu else "2", "--rounds", "3" if gpu else "1", "--json", str(path)],
            path.name)

    data, run_dir = work / "data", work / "run"
    if gpu:
        n_images, size = 512, 32
        train_args = ["--config", "cifar10", "--steps", "50", "--batch-size", "128", "--mixed-precision", "bf16",
                      "train.log_every=10", "train.preview_steps=10", "train.preview_images=16"]
        sample_args = ["-n", "64"]
    else:
        n_images, size = 16, 16
        train_args = ["--steps", "2", "--batch-size", "4", "--mixed-precision", "no", "model.channels=16",
                      "model.norm_groups=8", "data.image_size=16", "data.num_workers=0", "train.log_every=1",
                      "train.preview_steps=2", "train.preview_images=4"]
        sample_args = ["-n", "4", "--steps", "2"]
    have_data = ok(needs_diffusers("e2e data", 60, part("demo_data", path=str(data), n=n_images, size=size)))
    if have_data:
        if ok(parts.run("e2e train", 180, [PY, str(ROOT / "train.py"), "--data", str(data), "--out", str(run_dir),
                                           "--resume", "never", *train_args], "e2e/log.jsonl")):
            parts.run("e2e sample", 90, [PY, str(ROOT / "sample.py"), "--model", str(run_dir), *sample_args, "--out",
                                         str(run_dir / "samples-check")], "e2e/grid.png")
        else:
            parts.skip("e2e sample", "the e2e training failed")
        (out / "e2e").mkdir(exist_ok=True)
        previews = sorted(run_dir.glob("samples/step-*.png"))  # the last in name order: the newest step
        for source, name in [(run_dir / "log.jsonl", "log.jsonl"), (run_dir / "samples-check" / "grid.png", "grid.png"),
                             *[(p, f"preview-{p.name}") for p in previews[-1:]]]:
            if source.is_file():
                shutil.copy(source, out / "e2e" / name)
        print("\n".join(f"{f.stat().st_size:>10}  {f.name}" for f in sorted((out / "e2e").iterdir())))
    elif have:
        parts.skip("e2e train", "no image folder (the e2e data part failed)")

    def two_processes(name: str, launcher: list[str], args: list[str]) -> None:
        """30 steps of train.py under ``launcher``, then the world-size check of its log."""
        if ok(parts.run(name, 150, [*launcher, str(ROOT / "train.py"), "--data", str(data), "--out", str(work / name),
                                    "--resume", "never", *args], f"{name}/log.jsonl")):
            world_size_check(parts, name, work / name)
        (out / name).mkdir(exist_ok=True)
        if (work / name / "log.jsonl").is_file():
            shutil.copy(work / name / "log.jsonl", out / name / "log.jsonl")

    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if gpu and gpus >= 2 and have_data:
        ddp = ["--config", "cifar10", "--steps", "30", "--batch-size", "64", "--mixed-precision", "bf16",
               "train.log_every=10", "train.preview_steps=10", "train.preview_images=8"]
        two_processes("ddp-torchrun", torchrun, ddp)
        two_processes("ddp-accelerate", [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                         "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                                         "--main_process_port", "29517"], ddp)
    elif not gpu and os.environ.get("GPU_CHECK_CPU_MULTI") == "1" and have_data:
        two_processes("ddp-torchrun", torchrun, train_args)
    else:
        parts.skip("two processes", f"needs 2 GPUs (torch sees {gpus}) and the e2e image folder")
    if gpu:
        train_step("no")

    for row in parts.rows:  # the end of each failed part's log, before the table
        log = out / "logs" / f"{log_name(row['name'])}.log"
        if row["rc"] not in ("0", "-") and log.is_file():
            print(f"\n----- last lines of logs/{log.name} -----\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    print(f"\n===== summary ({parts.elapsed()}s) =====")
    text = summary(out, "gpu" if gpu else "cpu", "bf16" if gpu else "no", parts.rows)
    (out / "summary.md").write_text(text)
    print(f"{text}\nresults: {out} (summary.md, steps.tsv, logs/)")
    return 1 if parts.failed else 0


# ----------------------------------------------------------------------------------------------- summary


def summary(out: Path, mode: str, e2e_precision: str, steps: list[dict]) -> str:
    """summary.md: one row per part (per result row of the benchmarks), their problems and what was skipped."""

    def load(name: str) -> dict | None:
        try:
            return json.loads((out / name).read_text())
        except (OSError, ValueError):
            return None

    num = lambda x, fmt="{:.1f}": "" if x is None else fmt.format(x)  # noqa: E731
    pct = lambda x: "" if x is None else f"{x:.1%}"  # noqa: E731
    info = load("machine.json") or {}
    gpu = (info.get("gpus") or ["no GPU"])[0]
    # Nominal dense bf16/fp16 tensor-core peak (TFLOP/s), a second reference beside the measured matmul peak.
    nominal = 756.0 if "H100" in gpu and "PCIe" in gpu else 835.0 if "H100 NVL" in gpu else 989.0 if (
        "H100" in gpu or "H200" in gpu) else None
    versus = f"MFU vs nominal {nominal:.0f}" if nominal else "MFU vs nominal"
    cols = ["part", "precision", "resdiff img/s", "diffusers img/s", "ratio", "resdiff MFU", "diffusers MFU",
            "measured peak TFLOP/s", versus, "status", "note"]
    peaks, rows, problems, skipped = load("matmul_peak.json") or {}, [], [], []
    for step in steps:
        name, status, art = step["name"], step["status"], step["artifact"]
        if status.startswith("skipped"):
            skipped.append(f"{name} ({status[len('skipped: '):]})")
        elif not status.startswith("ok"):
            problems.append(f"{name}: {status}")
        base = {"part": name, "status": status if status.startswith("skipped") else f"{status} {step['seconds']}s"}
        if name.startswith(("train-step ", "sample ")):
            base["precision"] = name.split()[1]
        if not status.startswith(("ok", "skipped")):  # the error line of a failed part's log, where there is one
            log = out / "logs" / f"{log_name(name)}.log"
            tail = log.read_text(errors="replace").splitlines() if log.is_file() else []
            errors = [line.strip() for line in tail if re.search(r"Error|error:|failed|Aborted", line)]
            base["note"] = (errors[-1] if errors else "")[:160]
        data = load(art) if art.endswith(".json") else None
        if name.startswith("train-step") and data:
            for r in data["rows"]:
                ours, theirs, peak = r["resdiff"], r["diffusers"], r["matmul_peak_tflops"]
                vs = (f"{ours['mfu'] * peak / nominal:.1%} / {theirs['mfu'] * peak / nominal:.1%}"
                      if nominal and r["precision"] in ("bf16", "fp16") else "")
                rows.append({**base, "part": f"train-step {r['preset']} b{r['batch']}", "precision": r["precision"],
                             "resdiff img/s": num(ours["images_per_s"]), "diffusers img/s": num(theirs["images_per_s"]),
                             "ratio": num(r["ratio"], "{:.3f}"), "resdiff MFU": pct(ours["mfu"]),
                             "diffusers MFU": pct(theirs["mfu"]), "measured peak TFLOP/s": f"{peak:.4g}", versus: vs,
                             "note": f"{r['parameters'] / 1e6:.1f}M params, {r['gflop_per_image']} GFLOP/img fwd+bwd"})
        elif name.startswith("sample") and data:
            for r in data["rows"]:
                rows.append({**base, "part": f"sample {r['preset']} n={r['images']}", "precision": r["precision"],
                             "resdiff img/s": num(r["resdiff img/s"], "{:.2f}"), "ratio": num(r["ratio"], "{:.3f}"),
                             "diffusers img/s": num(r["diffusers img/s"], "{:.2f}"), "note": f"DDIM-{r['steps']}"})
        elif art.endswith("log.jsonl") and (out / art).is_file():  # e2e and the two-process runs: train.py's own log
            log = [json.loads(line) for line in (out / art).read_text().splitlines() if line.strip()]
            rates, logged = [r["images_per_s"] for r in log], [r["step"] for r in log]
            steady = rates[1:] or rates  # the first interval holds the warm-up
            rows.append({**base, "part": "e2e train.py" if name == "e2e train" else f"{name} train.py",
                         "precision": e2e_precision, "resdiff img/s": num(statistics.median(steady) if steady else None),
                         "note": f"median over logged steps {logged[1:] or logged}; first interval "
                                 f"{rates[0] if rates else '-'} img/s; world_size {sorted({r['world_size'] for r in log})}"})
        elif name == "matmul peak" and peaks:
            rows.append({**base, "measured peak TFLOP/s": ", ".join(f"{k} {v}" for k, v in peaks.items()
                                                                     if k in ("bf16", "fp16", "fp32")),
                         "note": f"{peaks.get('n')}^3 matmul; TF32 matmul "
                                 f"{'on' if peaks.get('tf32_matmul_allowed') else 'off'}"})
        else:
            rows.append(base)
    lines = [f"gpu_check ({mode}): {gpu}; torch {info.get('torch')}, CUDA {info.get('cuda')}, python "
             f"{info.get('python')}, {info.get('gpu_count', 0)} GPU(s)", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|",
             *("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |" for r in rows), "",
             "MFU: images/s x the model's fwd+bwd FLOPs (torch's flop counter) / the measured matmul peak of that dtype "
             "(bench/train_step.py, a 2048^3 matmul)" + (f"; 'MFU vs nominal': against {nominal:.0f} TFLOP/s, the dense "
                                                         f"bf16/fp16 tensor-core peak of the {gpu}" if nominal else ""),
             "problems: " + ("; ".join(problems) if problems else "none"),
             "skipped: " + ("; ".join(skipped) if skipped else "none")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the same plumbing on any CPU machine, tiniest settings")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(lambda part, **spec: PARTS[part](**spec), args.child)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGABRT (a hung part's stacks) must not write GPU-sized cores
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if args.cpu_smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_out.")).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work."))
    os.environ["RESDIFF_CACHE"] = str(work / "cache")  # the built-in demo data that bench.train_step builds
    try:
        return check(not args.cpu_smoke, out, work)
    finally:
        if os.environ.get("GPU_CHECK_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
