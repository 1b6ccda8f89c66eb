"""The benchmarks in bench/ run as users run them (`python -m bench.NAME` from the repository root, on tiny inputs) and
write the figures they promise: each test checks their names, units and the relations between them, never how fast
anything is. Nothing here imports bench/: the tests read what the commands print and write."""

import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resdiff.data import write_demo_folder
from tiny_runs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.bench]  # make test-bench runs these; make test leaves them
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
# The benchmarks run here never wait for a hold (tools/hold.sh): a suite run under a hold would otherwise wait for
# itself. No hold file can exist in a folder that does not.
NEVER_HELD = ROOT / "tests" / "no-such-folder" / "bench-hold"


def cli(module: str, *args, code: int = 0, python: Path | str = sys.executable, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m bench.MODULE ARGS`` from the repository root, which must end with exit code ``code``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "BENCH_HOLD": str(NEVER_HELD), **(env or {})}
    proc = subprocess.run([str(python), "-m", f"bench.{module}", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == code, proc.stdout[-4000:] + proc.stderr[-3000:]
    return proc


def bench(module: str, *args, tmp_path: Path) -> dict:
    """The results file a benchmark writes (--json), with the machine and the date it was measured on."""
    out = tmp_path / f"{module}.json"
    assert f"wrote {out}" in cli(module, *args, "--json", out).stdout
    result = json.loads(out.read_text())
    assert result["machine"] and result["date"]
    return result


def result_line(output: str) -> dict:
    """The fields of the last `RESULT {json}` line of a child's output (bench.runner's protocol)."""
    return json.loads([line for line in output.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])


# --------------------------------------------------------------------------- the speed of a training step


def check_train_step(result: dict, precision: str, batch: int) -> None:
    """bench.train_step (one round of one step): both loops timed at one architecture; images/s from the timed
    seconds, MFU from images/s, the FLOPs of an image and the measured matmul peak, the ratio from images/s."""
    (row,) = result["rows"]
    assert (row["preset"], row["precision"], row["batch"]) == ("tiny", precision, batch)
    for who in ("resdiff", "diffusers"):
        w = row[who]
        assert w["images_per_s"] == pytest.approx(batch / statistics.median(w["seconds"]), rel=0.02)
        flops_per_s = w["images_per_s"] * row["gflop_per_image"] * 1e9
        assert w["mfu"] == pytest.approx(flops_per_s / (row["matmul_peak_tflops"] * 1e12), rel=0.02)
        assert len(w["seconds"]) == 1 and w["ops_per_step"]["aten::copy_"] > 0  # the profiler saw the step
    assert row["ratio"] == pytest.approx(row["resdiff"]["images_per_s"] / row["diffusers"]["images_per_s"], rel=0.01)


def check_sample(result: dict, n: int, steps: int) -> None:
    """bench.sample: resdiff and diffusers' pipeline on the same weights; img/s from the timed seconds."""
    (row,) = result["rows"]
    assert (row["images"], row["steps"]) == (n, steps)
    for who in ("resdiff", "diffusers"):
        assert n / row[f"{who} img/s"] == pytest.approx(statistics.median(row["seconds"][who]), abs=0.006)
    assert row["ratio"] == pytest.approx(row["resdiff img/s"] / row["diffusers img/s"], rel=0.01)


def test_a_bf16_step_casts_and_copies_no_more_than_diffusers(tmp_path):
    """Which ops a bf16 step runs, and in which dtype, does not depend on the CPU: counted on any machine."""
    (row,) = bench("train_step", "--presets", "tiny", "--precisions", "bf16", "--rounds", "1", "--steps-per-round", "1",
                   "--batch-size", "2", "--quick", tmp_path=tmp_path)["rows"]
    ours, theirs = row["resdiff"]["ops_per_step"], row["diffusers"]["ops_per_step"]
    assert ours["aten::copy_"] > 0 and ours["aten::_to_copy"] > 0  # the profiler saw the step
    for op in ("aten::copy_", "aten::_to_copy"):
        assert ours[op] <= theirs[op], (op, ours, theirs)


def test_train_step_memory_measures_each_loop_in_its_own_process(tmp_path):
    result = bench("train_step", "--memory", "--presets", "tiny", "--precisions", "no", "--batch-size", "4", "--quick",
                   tmp_path=tmp_path)
    assert [(r["which"], r["preset"], r["precision"], r["batch"]) for r in result["rows"]] == [
        ("resdiff", "tiny", "no", 4), ("diffusers", "tiny", "no", 4)]
    for row in result["rows"]:  # MB of a whole Python process with torch loaded (on a CPU), not bytes or GB
        assert row["kind"] == "peak RSS (includes the Python process)" and 50 < row["peak_mb"] < 50_000


def test_allocator_times_each_loop_and_malloc_setting_in_its_own_process(tmp_path):
    result = bench("allocator", "--preset", "tiny", "--batch", "2", "--steps", "2", "--runs", "1", "--precision", "no",
                   tmp_path=tmp_path)
    rows, runs = result["rows"], result["runs"]
    assert [(r["loop"], r["malloc"]) for r in rows] == [
        ("resdiff", "default"), ("resdiff", "reuse"), ("diffusers", "default"), ("diffusers", "reuse")]
    for loop in ("resdiff", "diffusers"):  # the setting took in the processes that asked for it, and only there
        assert [r["applied"] for r in runs[f"{loop}/default"] + runs[f"{loop}/reuse"]] == [False, True]
    for row in rows:
        (run,) = runs[f"{row['loop']}/{row['malloc']}"]
        assert len(run["seconds"]) == 2 and run["step_s"] == pytest.approx(statistics.median(run["seconds"]), abs=1e-3)
        assert float(row["s/step"]) == pytest.approx(run["step_s"], abs=1e-3)
        assert float(row["images/s"]) == pytest.approx(2 / run["step_s"], rel=0.02)  # --batch 2
        assert 50 < run["peak_rss_mb"] < 50_000
    assert [r["vs default"] for r in rows[::2]] == ["1.000x", "1.000x"]


def test_train_e2e_compares_train_py_with_the_bare_step(tmp_path):
    (row,) = bench("train_e2e", "--config", "defaults", "--override", "model.channels=16", "data.image_size=16",
                   "--batch-size", "8", "--rounds", "1", "--steps", "2", "--images", "64", "--precisions", "no",
                   tmp_path=tmp_path)["rows"]
    assert (row["config"], row["precision"], row["batch"]) == ("defaults", "no", 8)
    assert row["steps timed"] == len(row["e2e_times"]) == len(row["bare_times"]) == 2  # the steps after the first two
    assert row["bare step s"] == pytest.approx(statistics.median(row["bare_times"]), abs=1e-3)
    assert row["train.py step s"] == pytest.approx(statistics.median(row["e2e_times"]), abs=1e-3)
    ratio = statistics.median(row["e2e_times"]) / statistics.median(row["bare_times"])
    assert row["train.py / bare"] == pytest.approx(ratio, abs=0.001)
    assert row["train.py img/s"] == pytest.approx(8 / statistics.median(row["e2e_times"]), abs=0.01)


def test_kernel_floor_replays_each_kernel_of_both_steps(tmp_path):
    (row,) = bench("kernel_floor", "--presets", "tiny", "--precisions", "no", "--rounds", "1", "--batch-size", "2",
                   "--quick", tmp_path=tmp_path)["rows"]
    for who in ("resdiff", "diffusers"):
        w = row[who]
        # tiny has convolutions, linears and one attention level; each is recorded forward and backward
        assert w["calls_by_kind"]["convolution"] > 0 and w["calls_by_kind"]["matmul"] > 0
        assert w["calls_by_kind"]["attention"] >= 2
        assert 0 < w["distinct_calls"] <= sum(w["calls_by_kind"].values())
        assert w["floor_s"] == pytest.approx(sum(w["floor_by_kind_s"].values()), abs=1e-3)
        assert w["floor_share"] == pytest.approx(w["floor_s"] / w["step_s"], rel=0.01)
        assert w["floor_mfu"] == pytest.approx(w["mfu"] / w["floor_share"], rel=0.02)
    # the same architecture does the same convolutions in both loops
    assert row["resdiff"]["calls_by_kind"]["convolution"] == row["diffusers"]["calls_by_kind"]["convolution"]


def test_blocks_counts_each_variant_against_the_plain_resblock(tmp_path):
    result = bench("blocks", "--preset", "tiny", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in result["variants"]}
    assert result["variants"][0]["overrides"] == {"block": "basic"}  # the row the others are compared with
    for r in rows.values():  # a backward pass costs at most twice its forward (input and weight gradients)
        assert 2 * r["forward_flops"] < r["forward_backward_flops"] <= 3 * r["forward_flops"]
    assert rows["bottleneck"]["params"] < rows["basic"]["params"]  # 1x1 convs around a narrow 3x3
    assert rows["resnext (c=8)"]["params"] < rows["basic"]["params"]  # grouped 3x3 convs
    for block in ("basic", "bottleneck"):  # squeeze-excite adds its two small linears
        assert rows[f"{block}+SE"]["params"] > rows[block]["params"]


# ---------------------------------------------------------------------------------- sampling and evaluation


def test_evaluate_times_sampling_features_and_the_whole_evaluation(tmp_path):
    result = bench("evaluate", "--preset", "tiny", "--num-images", "4", "--steps", "2", "--batch-size", "4",
                   "--ref-images", "6", tmp_path=tmp_path)
    assert [r["part"] for r in result["rows"]] == [
        "sampling (tiny, DDIM-2)", "Inception features (channels_last, float32)",
        "evaluate() end to end (reference cached)"]
    assert all(re.fullmatch(r"\d+\.\d\d", r["images/s"]) for r in result["rows"]) and math.isfinite(result["fid"])


def test_autoencoder_scores_reconstructions_and_times_both_spaces(tmp_path):
    """bench.autoencoder on a random diffusers AutoencoderTiny (8x): the reconstruction FID of n images against the
    folder, their PSNR, encoding and decoding rates (and the set's encoding time from them), sampling rates of
    both spaces at full size, and a grid of the originals over their reconstructions."""
    from PIL import Image

    from tiny_models import tiny_autoencoder
    from tiny_runs import write_pngs

    ae, pngs = tiny_autoencoder("tiny", tmp_path / "ae"), write_pngs(tmp_path / "pngs", 6, size=32)
    result = bench("autoencoder", "--data", pngs, "--autoencoder", ae, "--image-size", 32, "-n", 4, "--steps", 2,
                   "--sample-images", 2, "--batch-size", 4, "--out", tmp_path / "out", tmp_path=tmp_path)
    row = result["result"]
    assert (row["size"], row["n"], result["set_images"]) == (32, 4, 6) and math.isfinite(row["fid"])
    assert 0 < row["psnr_db"] < 100  # a random decoder reconstructs nothing exactly
    assert row["encode_set_min"] == round(6 / row["encode_img_s"] / 60, 1)
    assert min(row["encode_img_s"], row["decode_img_s"], row["latent_sample_img_s"], row["pixel_sample_img_s"]) > 0
    assert Image.open(result["grid"]).size == (8 * 34 + 2, 34 + 2)  # 4 originals, then their 4 reconstructions
    assert np.load(tmp_path / "out" / "reconstructions.npz")["arr_0"].shape == (4, 32, 32, 3)


def test_evaluate_parts_splits_evaluate_into_its_parts(tmp_path):
    result = bench("evaluate_parts", "--num-images", "6", "--steps", "2", "--batch-size", "6", tmp_path=tmp_path)
    assert [(r["n"], r["part"]) for r in result["rows"]] == [(6, part) for part in (
        "reference features (first time)", "generation (tiny, ddim-2)", "Inception features",
        "metrics (FID, KID, PR, memorisation)", "evaluate() end to end, reference cached")]
    assert all(re.fullmatch(r"\d+\.\d", r["seconds"]) for r in result["rows"])


def test_gpu_check_cpu_smoke_runs_every_part_and_writes_the_summary(tmp_path):
    """bench/gpu_check.sh, the script for a borrowed GPU machine, runs its whole plumbing on the CPU with --cpu-smoke.

    Its parts run bench.train_step and bench.sample at the tiniest settings, so their results are checked here too,
    rather than paying for those runs again in tests of their own."""
    import torch

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "BENCH_HOLD": str(NEVER_HELD),
           "PYTHON": sys.executable, "OUT": str(out), "TMPDIR": str(tmp_path)}
    script = str(ROOT / "bench" / "gpu_check.sh")
    proc = subprocess.run(["bash", script, "--cpu-smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [name for name, *_ in steps] == ["machine", "dependencies", "import resdiff", "matmul peak", "train-step no",
                                            "sample no n=4", "e2e data", "e2e train", "e2e sample", "two processes"]
    assert all(status.startswith(("ok", "skipped")) for _, _, status, *_ in steps) and "problems: none" in summary
    train_step = json.loads((out / "train_step-no.json").read_text())
    check_train_step(train_step, "no", 4)  # bench.train_step --quick, tiny, 1 step
    check_sample(json.loads((out / "sample-no-n4.json").read_text()), 4, 2)  # bench.sample, tiny, DDIM-2
    (row,) = [line for line in summary.splitlines() if line.startswith("| train-step tiny")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, theirs = train_step["rows"][0]["resdiff"], train_step["rows"][0]["diffusers"]
    assert cells[1:4] == ["no", f"{ours['images_per_s']:.1f}", f"{theirs['images_per_s']:.1f}"], row
    machine = json.loads((out / "machine.json").read_text())
    assert machine["torch"] == torch.__version__ and machine["gpu_count"] == torch.cuda.device_count()
    assert (out / "e2e" / "log.jsonl").is_file() and (out / "e2e" / "grid.png").is_file()

    if not torch.cuda.is_available():  # without --cpu-smoke, a CUDA-less machine is refused at once
        env["OUT"] = str(tmp_path / "out-gpu")
        proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert "no CUDA device: run with --cpu-smoke to check the script's plumbing" in proc.stdout


# -------------------------------------------------------------------------------- data, processes, learning


def test_data_pipeline_measures_memory_and_speed_of_each_source(tmp_path):
    result = bench("data_pipeline", "--images", "32", "--size", "16", "--source-size", "24", "--batch-size", "8",
                   "--batches", "1", "--rounds", "1", "--presets", "tiny", "--sources", "prepared",
                   "folder, read per batch", "--workdir", str(tmp_path / "w"), tmp_path=tmp_path)
    assert result["decoded_mib"] == 2 * result["cache_limit_mib"]  # a dataset twice the cache limit
    memory = {m["source"]: m["raw"] for m in result["memory"]}
    assert {"prepared", "folder, read per batch"} == set(memory)  # the sources asked for (each a 2-process torchrun)
    for runs in memory.values():  # two processes, each read its half of one epoch
        assert [r["images"] for r in runs] == [16, 16] and all(r["after"]["VmHWM"] > 0 for r in runs)
    assert "memory-mapped" in memory["prepared"][0]["mode"] and "per batch" in memory["folder, read per batch"][0]["mode"]
    speed = {s["what"]: s for s in result["speed"]}
    assert set(speed) == {"prepared (memory-mapped)", "folder, cached in memory", "folder, read per batch, 0 workers",
                          "folder, read per batch, 1 worker", "training step, tiny preset"}
    for what, s in speed.items():  # images/s of one call: a batch for the training step, --batches 1 for a source
        assert float(s["images/s"]) == pytest.approx(8 / statistics.median(s["seconds"]), rel=0.05, abs=1), what


def test_multiprocess_exit_counts_runs_that_end(tmp_path):
    (row,) = bench("multiprocess_exit", "--runs", "1", "--steps", "2", "--forms", "torchrun", tmp_path=tmp_path)["rows"]
    assert row == {**row, "launch": "torchrun", "runs": 1, "ended": 1, "failed": 0, "hung": 0}


def test_learning_measure_ranks_real_below_blurred_below_noise(tmp_path):
    """The time-to-quality benchmark's measure must tell good samples from bad ones (its own check, run small: with no
    contender, the benchmark stops after it)."""
    result = bench("learning", "--images", "512", "--samples", "256", "--contenders", tmp_path=tmp_path)
    measure = result["measure"]
    assert list(measure) == ["accuracy", "real held-out", "blurred (0.6 px)", "uniform noise"]
    assert 0 <= measure["accuracy"] <= 1 and result["rows"] == []
    assert measure["real held-out"] < measure["blurred (0.6 px)"] < measure["uniform noise"]


def test_two_holders_at_once_do_not_release_each_other(tmp_path):
    """tools/hold.sh: each holder makes its own file, and bench.runner's clocks wait while any is there; a holder
    that ends removes only its own, so a second one still running keeps the clocks held."""
    hold = tmp_path / "bench-hold"
    other = tmp_path / "bench-hold.other"  # another holder, still running
    other.touch()
    count = "from bench.runner import holders; print(len(holders()))"
    env = {**os.environ, "BENCH_HOLD": str(hold)}
    inside = subprocess.run(["bash", "tools/hold.sh", sys.executable, "-c", count], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.split() == ["2"]  # its own file and the other holder's
    assert other.exists() and [p.name for p in tmp_path.iterdir()] == [other.name]
    wait = "from bench.runner import wait_while_held; wait_while_held(); print('went on')"
    waiter = subprocess.Popen([sys.executable, "-c", wait], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=3)  # held while the other holder's file exists
        other.unlink()
        out, _ = waiter.communicate(timeout=30)
    finally:
        waiter.kill()
    assert out.splitlines()[-1] == "went on"


# ------------------------------------------------------------- real images against diffusers and the peers


def test_contenders_score_every_budget_resume_and_sweep_the_samplers(tmp_path):
    """bench.contenders: a row per contender and budget (trained until its clock passed the budget, FID finite, its
    grid saved), the sampler sweep at equal model evaluations; run again with more budgets, it trains only those, from
    the checkpoint, and a peer whose process fails stops the run in one line naming it."""
    images, out = write_demo_folder(tmp_path / "images", 16, 32), tmp_path / "out"  # a batch of both recipes
    common = ["--data", images, "--out", out, "--fid-images", 8, "--batch-size", 8, "--sampler", "ddim", "--steps", 4,
              "--threads", 1, "--sweep", "ddpm", "--samplers", "ddim", "heun", "--nfe", 4]
    cli("contenders", *common, "--budgets", 0.005, "--contenders", "diffusers", "ddpm")
    first = json.loads((out / "results.json").read_text())
    assert sorted(first["budgets"]) == ["ddpm@0.005min", "diffusers@0.005min"]
    ddim, heun = first["sweep"]["ddpm@0.005min/ddim@4"], first["sweep"]["ddpm@0.005min/heun@4"]
    assert ddim["nfe"] == ddim["steps"] == 4  # one model evaluation a step
    assert ddim["fid"] == first["budgets"]["ddpm@0.005min"]["fid"]  # DDIM-4 is the budget's own sampler: its score
    assert heun["nfe"] == 2 * heun["steps"] - 1 <= 4 < 2 * (heun["steps"] + 1) - 1  # the most Heun steps within 4
    for name in ("table.md", "fid_vs_time.png", "fid_vs_nfe.png", "grids.png"):
        assert (out / name).is_file()

    again = cli("contenders", *common, "--budgets", 0.005, 0.02, "--contenders", "diffusers", "edm", "--peers-python",
                sys.executable, code=1)  # resdiff's python lacks the peers' packages
    assert again.stderr.strip().splitlines()[-1] == "error: bench.peers train edm failed with exit code 1 (its output is above)"
    assert "ModuleNotFoundError: No module named" in again.stdout  # the child's own error, shown above that line
    second = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in second["budgets"].items() if k in first["budgets"]} == first["budgets"]
    assert sorted(second["budgets"]) == ["ddpm@0.005min", "diffusers@0.005min", "diffusers@0.02min"]
    for key, budget in (("ddpm@0.005min", 0.005), ("diffusers@0.005min", 0.005), ("diffusers@0.02min", 0.02)):
        row = second["budgets"][key]
        assert row["train_s"] >= budget * 60 - 0.05 and math.isfinite(row["fid"]) and Path(row["grid"]).is_file()
        assert row["images"] == row["steps"] * second["contenders"][row["contender"]]["batch"]
        # images/s of the training clock (both are rounded to one decimal)
        low, high = row["images"] / (row["train_s"] + 0.05), row["images"] / (row["train_s"] - 0.05)
        assert low - 0.05 <= row["images_per_s"] <= high + 0.05
    before, after = second["budgets"]["diffusers@0.005min"], second["budgets"]["diffusers@0.02min"]
    # the clock went on from there: diffusers resumed its 0.005-minute checkpoint (on a slow machine one step can
    # outlast the whole second budget, so the step count need not grow)
    assert f"diffusers: resumed from its checkpoint at step {before['steps']} " in again.stdout
    assert after["steps"] >= before["steps"] and after["train_s"] >= before["train_s"]
    pixels = np.load(out / "images.npy")  # what the peers train on: the folder as every contender sees it
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 3, 32, 32)

    # One contender, all its scores already there: nothing trained, and the report holds every contender of the folder.
    cli("contenders", *common, "--budgets", 0.005, "--contenders", "ddpm")
    head = (out / "table.md").read_text().splitlines()[0]
    assert "FID diffusers" in head and "FID ddpm" in head


def test_contenders_report_only_redraws_the_docs_charts_from_their_results_file(tmp_path):
    """docs/bench/contenders-openmoji.json holds the figures of the README's OpenMoji run; --report-only draws its
    charts beside a copy, named after it, and prints its tables, with no --data and nothing trained."""
    from PIL import Image

    copy = tmp_path / "contenders-openmoji.json"
    shutil.copy(ROOT / "docs" / "bench" / copy.name, copy)
    printed = set(cli("contenders", "--report-only", copy).stdout.replace("|", " ").split())
    results = json.loads(copy.read_text())
    for row in [*results["budgets"].values(), *results["sweep"].values()]:  # every figure of the file is in a table
        assert str(row["fid"]) in printed
    charts = ["contenders-openmoji-fid.png", "contenders-openmoji-nfe.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([copy.name, *charts])
    for name in charts:  # the committed pictures are these, where the same matplotlib draws them
        drawn, committed = Image.open(tmp_path / name), Image.open(ROOT / "docs" / "bench" / name)
        assert drawn.size == committed.size
        if drawn.info["Software"] == committed.info["Software"]:
            assert (tmp_path / name).read_bytes() == (ROOT / "docs" / "bench" / name).read_bytes()


def test_a_sweep_of_a_longer_run_is_reported_beside_the_first_one():
    """A model swept at 10 minutes and again after 40 (results keyed by budget): the table says each row's minutes
    and the NFE chart draws one line per sampler and model, not one line through both models' points."""
    from bench.contenders import sweep_chart, sweep_table

    rows = {f"defaults@{m}min/{s}@{n}": {"contender": "defaults", "budget_min": m, "sampler": s, "nfe": n, "steps": n,
                                        "fid": f}
            for m, s, n, f in [(10, "ddpm", 10, 103.9), (10, "ddpm", 50, 99.2), (40, "ddpm", 10, 88.1),
                               (40, "ddpm", 50, 61.5), (40, "dpm++sde", 10, 80.3)]}
    results = {"sweep": rows, "fid_images": 1000, "data": "data/openmoji"}
    lines = sweep_table(results).splitlines()
    assert lines[0].split() == ["contender", "budget_min", "sampler", "nfe", "steps", "fid"]
    assert [line.split()[1:3] for line in lines[2:]] == [["10", "ddpm"]] * 2 + [["40", "ddpm"]] * 2 + [["40", "dpm++sde"]]
    axes = sweep_chart(results).axes[0]
    drawn = {line.get_label(): list(zip(*line.get_data())) for line in axes.get_lines() if not line.get_label().startswith("_")}
    assert drawn == {"ddpm, defaults 10 min": [(10, 103.9), (50, 99.2)], "ddpm, defaults 40 min": [(10, 88.1), (50, 61.5)],
                     "dpm++sde, defaults 40 min": [(10, 80.3)]}
    assert "defaults after 10 min, defaults after 40 min, openmoji" in axes.get_title()


@pytest.mark.parametrize("flags, code, message", [
    (["--contenders", "defualts"], 2, "unknown contender 'defualts'; choose from diffusers, ddpm, defaults, lucidrains, edm"),
    (["--samplers", "ddim", "dpm"], 2, "unknown sampler 'dpm'; choose from ddpm, ddim, dpm++, euler, heun, unipc, dpm++3m, dpm++sde"),
    (["--variant", "ddpm", "train.lr=1"], 1, "--variant ddpm: the name is taken; choose another"),
    (["--contenders", "ddpm", "edm", "--peers-python", "/no/venv/bin/python"], 1,
     "error: /no/venv/bin/python is missing: run make bench-peers (the peers' own environment; or pass --peers-python)"),
])
def test_contenders_refuse_a_wrong_name_in_one_line_before_any_work(tmp_path, flags, code, message):
    done = cli("contenders", "--data", tmp_path, "--out", tmp_path / "out", *flags, code=code)
    assert done.stderr.strip().splitlines()[-1].endswith(message)
    assert not (tmp_path / "out").exists()


def test_tuning_runs_each_variant_as_the_base_then_its_one_change(tmp_path):
    """bench.tuning: a variant is a bench.contenders run of the settings before tuning with its one change last (so
    the change is what wins), at one budget, one thread, without a sampler sweep (--dry-run prints the commands)."""
    done = cli("tuning", "--data", tmp_path, "--out", tmp_path / "t", "--only", "base", "lr2e-3", "--minutes", 7,
               "--dry-run")
    base, change = (shlex.split(line) for line in done.stdout.splitlines())
    for cmd, name in ((base, "base"), (change, "lr2e-3")):
        assert cmd[1:3] == ["-m", "bench.contenders"] and cmd[cmd.index("--contenders") + 1] == name
        assert cmd[cmd.index("--budgets") + 1] == "7" and cmd[cmd.index("--threads") + 1] == "1"
        assert cmd[cmd.index("--nfe") + 1].startswith("--")  # no model evaluations: no sweep
    variant = lambda cmd: cmd[cmd.index("--variant") + 1:]  # noqa: E731
    assert variant(base)[0] == "base" and "train.lr=1e-3" in variant(base)  # the settings before tuning
    assert variant(change) == ["lr2e-3", *variant(base)[1:], "train.lr=2e-3"]
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(not PEERS_PYTHON.is_file(), reason=".venv-peers is absent (make bench-peers: 5.7 GB)")
@pytest.mark.parametrize("peer", ["lucidrains", "edm"])
def test_peer_trains_to_its_clock_resumes_and_samples_with_its_own_sampler(peer, tmp_path):
    """bench.peers in the peers' environment: a U-Net within 10% of the tiny preset's parameters, training that
    continues from its checkpoint, and seeded uint8 samples drawn at the model evaluations it promises (at most 50;
    the script counts them while sampling)."""
    from resdiff import UNet

    tiny = sum(p.numel() for p in UNet.from_preset("tiny").parameters())
    images = tmp_path / "images.npy"
    np.save(images, np.full((32, 3, 32, 32), 255, dtype=np.uint8))

    def peers(*args) -> dict:
        return result_line(cli("peers", *args, peer, "--run-dir", tmp_path / "run", "--threads", 1,
                               python=PEERS_PYTHON).stdout)

    first = peers("train", "--images", images, "--seconds", 0.5)
    assert first["steps"] >= 1 and first["images"] == 16 * first["steps"] and first["train_s"] >= 0.5
    assert abs(first["parameters"] / tiny - 1) <= 0.10 and first["nfe"] <= 50
    again = peers("train", "--images", images, "--seconds", first["train_s"])  # its clock is there already
    assert (again["steps"], again["train_s"]) == (first["steps"], first["train_s"])
    more = peers("train", "--images", images, "--seconds", first["train_s"] + 0.1)
    assert more["steps"] > first["steps"] and more["train_s"] > first["train_s"]
    for name in ("a.npy", "b.npy"):
        done = peers("sample", "--n", 3, "--batch-size", 2, "--seed", 7, "--out", tmp_path / name)
        assert done["steps"] == more["steps"] and done["nfe"] == first["nfe"]
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.dtype == np.uint8 and a.shape == (3, 3, 32, 32) and np.array_equal(a, b)  # seeded
