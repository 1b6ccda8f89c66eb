"""The benchmark scripts in bench/ run end to end and write the results they promise (on the tiny preset,
one round: these check that the scripts work, never how fast anything is)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_runs import ROOT

pytestmark = pytest.mark.slow


def bench(script: str, *args: str, tmp_path) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *args, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


def check_train_step(result: dict) -> None:
    """bench/train_step.py times both loops at one architecture (run by gpu_check.sh's CPU smoke below)."""
    assert result["machine"] and result["date"]
    (row,) = result["rows"]
    assert row["preset"] == "tiny" and row["parameters"] > 0 and row["gflop_per_image"] > 0
    for who in ("resdiff", "diffusers"):
        assert row[who]["images_per_s"] > 0 and 0 < row[who]["mfu"] and len(row[who]["seconds"]) == 1
    assert row["ratio"] == pytest.approx(row["resdiff"]["images_per_s"] / row["diffusers"]["images_per_s"], rel=0.01)


def check_sample(result: dict) -> None:
    """bench/sample.py compares with the diffusers pipeline (run by gpu_check.sh's CPU smoke below)."""
    (row,) = result["rows"]
    assert row["resdiff img/s"] > 0 and row["diffusers img/s"] > 0 and row["steps"] == 2


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
    assert [r["which"] for r in result["rows"]] == ["resdiff", "diffusers"]
    assert all(r["peak_mb"] > 50 for r in result["rows"])  # a Python process with torch loaded


def test_allocator_times_each_loop_and_malloc_setting_in_its_own_process(tmp_path):
    result = bench("allocator", "--preset", "tiny", "--batch", "2", "--steps", "2", "--runs", "1", "--precision", "no",
                   tmp_path=tmp_path)
    assert [(r["loop"], r["malloc"]) for r in result["rows"]] == [
        ("resdiff", "default"), ("resdiff", "reuse"), ("diffusers", "default"), ("diffusers", "reuse")]
    runs = result["runs"]
    assert [r["applied"] for r in runs["resdiff/default"] + runs["resdiff/reuse"]] == [False, True]  # the setting took
    assert all(len(r["seconds"]) == 2 and r["step_s"] > 0 and r["peak_rss_mb"] > 50 for rs in runs.values() for r in rs)


def test_train_e2e_compares_train_py_with_the_bare_step(tmp_path):
    (row,) = bench("train_e2e", "--config", "defaults", "--override", "model.channels=16", "data.image_size=16",
                   "--batch-size", "8", "--rounds", "1", "--steps", "2", "--images", "64", "--precisions", "no", tmp_path=tmp_path)["rows"]
    assert row["train.py step s"] > 0 and row["bare step s"] > 0 and row["steps timed"] == 2
    ratio = statistics.median(row["e2e_times"]) / statistics.median(row["bare_times"])
    assert row["train.py / bare"] == pytest.approx(ratio, abs=0.001)


def test_evaluate_times_sampling_features_and_the_whole_evaluation(tmp_path):
    result = bench("evaluate", "--preset", "tiny", "--num-images", "4", "--steps", "2", "--batch-size", "4",
                   "--ref-images", "6", tmp_path=tmp_path)
    assert [r["part"].split(" (")[0] for r in result["rows"]] == ["sampling", "Inception features", "evaluate() end to end"]
    assert all(float(r["images/s"]) > 0 for r in result["rows"]) and result["fid"] >= 0


def test_data_pipeline_measures_memory_and_speed_of_each_source(tmp_path):
    result = bench("data_pipeline", "--images", "32", "--size", "16", "--source-size", "24", "--batch-size", "8", "--batches", "1",
                   "--rounds", "1", "--presets", "tiny", "--sources", "prepared", "folder, read per batch",
                   "--workdir", str(tmp_path / "w"), tmp_path=tmp_path)
    assert result["decoded_mib"] == 2 * result["cache_limit_mib"]  # a dataset twice the cache limit
    memory = {m["source"]: m["raw"] for m in result["memory"]}
    assert {"prepared", "folder, read per batch"} == set(memory)  # the sources asked for (each a 2-process torchrun)
    for runs in memory.values():  # two processes, each read its half of one epoch
        assert [r["images"] for r in runs] == [16, 16] and all(r["after"]["VmHWM"] > 0 for r in runs)
    assert "memory-mapped" in memory["prepared"][0]["mode"] and "per batch" in memory["folder, read per batch"][0]["mode"]
    speed = {s["what"]: float(s["images/s"]) for s in result["speed"]}
    assert speed["prepared (memory-mapped)"] > 0 and len(speed) >= 2


def test_blocks_counts_each_variant_against_the_plain_resblock(tmp_path):
    result = bench("blocks", "--preset", "tiny", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows and all(r["params"] > 0 and r["forward_backward_flops"] > r["forward_flops"] > 0 for r in rows.values())


def test_gpu_check_cpu_smoke_runs_every_part_and_writes_the_summary(tmp_path):
    """bench/gpu_check.sh, the script for a borrowed GPU machine, runs its whole plumbing on the CPU with --cpu-smoke.

    Its parts run bench/train_step.py and bench/sample.py at the tiniest settings, so their results are checked
    here too, rather than paying for those runs again in tests of their own."""
    import torch

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHON": sys.executable,
           "OUT": str(out), "TMPDIR": str(tmp_path)}
    script = str(ROOT / "bench" / "gpu_check.sh")
    proc = subprocess.run(["bash", script, "--cpu-smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    (row,) = [line for line in summary.splitlines() if line.startswith("| train-step tiny")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "no" and float(cells[2]) > 0 and float(cells[3]) > 0, row  # resdiff and diffusers img/s
    assert "problems: none" in summary
    assert (out / "e2e" / "log.jsonl").is_file() and (out / "e2e" / "grid.png").is_file()
    check_train_step(json.loads((out / "train_step-no.json").read_text()))  # bench/train_step.py --quick, tiny, 1 step
    check_sample(json.loads((out / "sample-no-n4.json").read_text()))  # bench/sample.py, tiny, DDIM-2

    if not torch.cuda.is_available():  # without --cpu-smoke, a CUDA-less machine is refused at once
        env["OUT"] = str(tmp_path / "out-gpu")
        proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert "no CUDA device: run with --cpu-smoke to check the script's plumbing" in proc.stdout


def test_multiprocess_exit_counts_runs_that_end(tmp_path):
    (row,) = bench("multiprocess_exit", "--runs", "1", "--steps", "2", "--forms", "torchrun", tmp_path=tmp_path)["rows"]
    assert row == {**row, "launch": "torchrun", "runs": 1, "ended": 1, "failed": 0, "hung": 0}


def test_learning_measure_ranks_real_below_blurred_below_noise():
    """The time-to-quality benchmark's measure must tell good samples from bad ones (its own check, run small)."""
    sys.path.insert(0, str(ROOT))
    from bench.learning import FeatureDistance, check_measure, digits

    images, labels = digits(1024, seed=10)
    reference = digits(512, seed=11)[0]
    score = FeatureDistance(images, labels, reference, epochs=1)
    ranks = check_measure(score, digits(256, seed=12)[0], seed=0)  # raises unless real < blurred < noise
    assert list(ranks) == ["real held-out", "blurred (0.6 px)", "uniform noise"]


def test_kernel_floor_replays_each_kernel_of_both_steps(tmp_path):
    (row,) = bench("kernel_floor", "--presets", "tiny", "--precisions", "no", "--rounds", "1", "--batch-size", "2", "--quick",
                   tmp_path=tmp_path)["rows"]
    for who in ("resdiff", "diffusers"):
        w = row[who]
        # tiny has convolutions, linears and one attention level; each is recorded forward and backward
        assert w["calls_by_kind"]["convolution"] > 0 and w["calls_by_kind"]["matmul"] > 0 and w["calls_by_kind"]["attention"] >= 2
        assert 0 < w["distinct_calls"] <= sum(w["calls_by_kind"].values())
        assert w["floor_s"] == pytest.approx(sum(w["floor_by_kind_s"].values()), abs=1e-3)
        assert w["floor_share"] == pytest.approx(w["floor_s"] / w["step_s"], rel=0.01)
        assert w["floor_mfu"] == pytest.approx(w["mfu"] / w["floor_share"], rel=0.02)
    # the same architecture does the same convolutions in both loops
    assert row["resdiff"]["calls_by_kind"]["convolution"] == row["diffusers"]["calls_by_kind"]["convolution"]


def test_contenders_resume_skips_scored_budgets_and_counts_nfe_as_model_evaluations():
    """bench/contenders.py (issue #25): a restarted run trains only the budgets without a result, and the sampler
    sweep gives a second-order sampler fewer steps for the same number of model evaluations."""
    sys.path.insert(0, str(ROOT))
    from bench.contenders import budget_key, pending, steps_for_nfe

    results = {"budgets": {budget_key("ddpm", 5): {}, budget_key("ddpm", 20): {}, budget_key("defaults", 10): {}}}
    assert pending(results, "ddpm", [20, 10, 5, 40]) == [10, 40]
    assert pending({}, "defaults", [0.6, 0.3]) == [0.3, 0.6]
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
    assert steps_for_nfe("ddim", 20, config) == (20, 20)
    assert steps_for_nfe("dpm++", 10, config) == (10, 10)
    assert steps_for_nfe("heun", 20, config) == (10, 19)  # 2 * steps - 1 evaluations


def test_contenders_refuses_an_unknown_contender_or_sweep_sampler_before_any_work(tmp_path, capsys):
    """bench/contenders.py: a misspelt contender or --samplers name is a usage error (exit 2) naming the choices,
    before a model is built or a folder written."""
    sys.path.insert(0, str(ROOT))
    from bench.contenders import main

    cases = ((["--contenders", "defualts"], "defualts", "defaults"), (["--samplers", "ddim", "dpm"], "dpm", "dpm++"))
    for flags, wrong, choice in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), *flags])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert repr(wrong) in err and choice in err
    assert not (tmp_path / "out").exists()


def test_contenders_variants_and_tuning_runs_keep_the_base_then_one_change():
    """bench/contenders.py --variant adds resdiff contenders (never under a taken name), and each bench/tuning.py
    run passes the settings before tuning first and its one change last, so the change is what wins."""
    import argparse

    sys.path.insert(0, str(ROOT))
    from bench.contenders import recipes
    from bench.tuning import BASE, command

    assert recipes([["lr2e-3", "train.lr=2e-3"]])["lr2e-3"] == ["train.lr=2e-3"]
    assert recipes(None)["defaults"] == [] and "ddpm" in recipes(None)
    for taken in ("diffusers", "ddpm", "defaults"):
        with pytest.raises(SystemExit, match="taken"):
            recipes([[taken, "train.lr=1"]])
    args = argparse.Namespace(data=Path("d"), out=Path("o"), minutes=8.0, fid_images=1000, sampler="dpm++", steps=20)
    cmd = command(args, "lr2e-3")
    variant = cmd[cmd.index("--variant") + 1:]
    assert variant == ["lr2e-3", *BASE, "train.lr=2e-3"] and "train.lr=1e-3" in BASE
    assert cmd[cmd.index("--budgets") + 1] == "8" and cmd[cmd.index("--threads") + 1] == "1"


def test_contenders_report_draws_the_curves_and_the_grids_of_the_largest_common_budget(tmp_path):
    """bench/contenders.py's pictures: FID against minutes per contender and FID against NFE per sampler
    (resdiff.charts, log x ticked at the budgets and the NFE), and one grid per contender at the largest budget
    every contender reached (not a budget only one of them has)."""
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from bench.contenders import fid_chart, grids_picture, sweep_chart

    grids = {}
    for name, minutes, colour in (("diffusers", 10, "red"), ("defaults", 10, "green"), ("defaults", 20, "blue")):
        grids[name, minutes] = tmp_path / f"{name}@{minutes}.png"
        Image.new("RGB", (50, 40), colour).save(grids[name, minutes])
    results = {"fid_images": 1000, "data": "/x/openmoji", "budgets": {
        f"{n}@{m}min": {"contender": n, "budget_min": m, "fid": 100.0 + m, "grid": str(g)} for (n, m), g in grids.items()},
        "sweep": {f"defaults@20min/{s}@{nfe}": {"contender": "defaults", "budget_min": 20, "sampler": s, "nfe": e,
                                                "fid": fid}
                  for s, nfe, e, fid in (("ddim", 10, 10, 90.0), ("ddim", 20, 20, 60.0), ("heun", 10, 9, 70.0),
                                         ("heun", 20, 19, 55.0))}}
    picture = grids_picture(results, ["diffusers", "defaults"], tmp_path / "grids.png")
    image = Image.open(picture).convert("RGB")
    assert image.size == (50 + 12 + 50, 36 + 40)
    assert image.getpixel((25, 60)) == (255, 0, 0) and image.getpixel((62 + 25, 60)) == (0, 128, 0)  # both at 10 min
    assert grids_picture(results, ["diffusers", "ddpm"], tmp_path / "none.png") is None  # ddpm has no budget

    (minutes,) = fid_chart(results).axes
    assert minutes.get_xscale() == "log" and list(minutes.get_xticks()) == [10, 20]
    assert [t.get_text() for t in minutes.get_legend().get_texts()] == ["diffusers", "defaults"]
    assert list(minutes.lines[1].get_xdata()) == [10, 20] and list(minutes.lines[1].get_ydata()) == [110.0, 120.0]
    assert "openmoji" in minutes.get_title() and "FID@1000" in minutes.get_ylabel()
    (nfe,) = sweep_chart(results).axes
    assert nfe.get_xscale() == "log" and list(nfe.get_xticks()) == [10, 20]  # Heun's 9 and 19 sit by 10 and 20
    assert [t.get_text() for t in nfe.get_legend().get_texts()] == ["ddim", "heun (9, 19 NFE)"]
    assert sweep_chart({"sweep": {}}) is None


def test_contenders_report_only_redraws_the_docs_charts_from_their_results_file(tmp_path, capsys):
    """docs/bench/contenders-openmoji.json holds the figures of the README's OpenMoji run; --report-only draws its
    charts beside a copy, named after it, and prints its tables, with no --data and nothing trained."""
    import shutil

    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from bench.contenders import main

    copy = tmp_path / "contenders-openmoji.json"
    shutil.copy(ROOT / "docs" / "bench" / copy.name, copy)
    main(["--report-only", str(copy)])
    out = capsys.readouterr().out
    assert "| 40 | 252.43 | 131.74 | 76.28 |" in out and "heun" in out
    charts = ["contenders-openmoji-fid.png", "contenders-openmoji-nfe.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([copy.name, *charts])
    for name in charts:  # the committed pictures are these, where the same matplotlib draws them
        drawn, committed = Image.open(tmp_path / name), Image.open(ROOT / "docs" / "bench" / name)
        assert drawn.size == committed.size
        if drawn.info["Software"] == committed.info["Software"]:
            assert (tmp_path / name).read_bytes() == (ROOT / "docs" / "bench" / name).read_bytes()


# ------------------------------------------------------- the peers (issue #37): bench/peers.py and its runner

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def test_peers_exchange_uint8_image_arrays_and_one_result_line(tmp_path):
    """bench/peers.py's format, shared by both environments: images as a uint8 (N, 3, H, W) .npy written whole,
    anything else refused in one line naming the file; a command's result is its last `peer-result` line."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from bench.peers import parse_result, read_images, result_line, write_images

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    path = write_images(tmp_path / "a" / "images.npy", images)
    assert np.array_equal(read_images(path), images) and [p.name for p in path.parent.iterdir()] == ["images.npy"]
    for wrong in (images.astype(np.float32), images[0], images[:, :2], images[:0]):
        with pytest.raises(SystemExit, match="uint8 images of shape"):
            write_images(tmp_path / "wrong.npy", wrong)
    (tmp_path / "cut.npy").write_bytes(path.read_bytes()[:100])
    with pytest.raises(SystemExit, match="cut.npy"):
        read_images(tmp_path / "cut.npy")

    out = f"training\n{result_line({'steps': 1})}\nsampling\n{result_line({'steps': 2, 'nfe': 49})}\n"
    assert parse_result(out) == {"steps": 2, "nfe": 49} and parse_result("no result\n") is None


def test_peers_count_the_model_evaluations_of_their_samplers():
    """Each peer samples at most 50 model evaluations: lucidrains' DDIM one a step, EDM's Heun two a step but one
    at the last (sigma 0), so its default 32 steps would be 63."""
    sys.path.insert(0, str(ROOT))
    from bench.peers import PEERS, ddim_nfe, heun_nfe, nfe

    assert ddim_nfe(50) == 50 and ddim_nfe(1000) == 1000  # sampling_timesteps == timesteps: its ancestral loop
    assert heun_nfe(25) == 49 and heun_nfe(32) == 63 and heun_nfe(1) == 1
    assert {peer: nfe(peer) for peer in PEERS} == {"lucidrains": 50, "edm": 49}


def test_contenders_runs_the_peers_by_default_and_asks_for_their_environment(tmp_path):
    """bench/contenders.py knows the peers as contenders (run unless --contenders picks others); without the peers'
    python it stops in one line saying how to make it, before any work."""
    sys.path.insert(0, str(ROOT))
    from bench.contenders import CONTENDERS, check_peers_python, main

    assert CONTENDERS == ("diffusers", "ddpm", "defaults", "lucidrains", "edm")
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--contenders", "ddpm", "edm",
              "--peers-python", str(missing)])
    assert str(exit_.value) == (f"error: {missing} is missing: run make bench-peers (the peers' own environment; "
                                f"or pass --peers-python)")
    assert not (tmp_path / "out").exists()
    check_peers_python(Path(sys.executable))  # an existing python passes


def test_contenders_child_runner_passes_output_through_and_reads_the_result_line(capsys):
    """The runner of the peers' processes: their output streams through as it comes, the last result line is
    returned, and a failed child or one without a result line stops the benchmark in one line."""
    sys.path.insert(0, str(ROOT))
    from bench.contenders import run_child
    from bench.peers import result_line

    line = result_line({"steps": 3})
    fields = run_child([sys.executable, "-c", f"print('bar\\r50%\\r100% \\u2588'); print({line!r})"], "child")
    assert fields == {"steps": 3} and "bar\r50%\r100% \u2588\n" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: child failed with exit code 3 \(its output is above\)$"):
        run_child([sys.executable, "-c", f"print({line!r}); raise SystemExit(3)"], "child")
    with pytest.raises(SystemExit, match="^error: child ended without its result line$"):
        run_child([sys.executable, "-c", "print('done')"], "child")


def test_contenders_rows_of_a_peer_have_the_layout_of_every_row(tmp_path):
    """A peer's budget gives results.json the row every contender gets, its grid saved beside, and the report
    names each contender's sampler: resdiff's --sampler/--steps, or a peer's own with its NFE (the chart too)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.contenders import Progress, Results, budget_row, fid_chart, put_row, samplers_note

    results = Results(tmp_path, {"data": "d", "fid_images": 4, "sampler": "ddim", "steps": 50})
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    put_row(results, budget_row("edm", 0.5, 123.456, Progress(30.04, 10, 160), images, tmp_path))
    results.put("contenders", "edm", {"sampler": "EDM Heun (stochastic), 25 steps", "nfe": 49, "parameters": 1})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["budgets"]["edm@0.5min"] == {
        "contender": "edm", "budget_min": 0.5, "fid": 123.46, "train_s": 30.0, "steps": 10, "images": 160,
        "images_per_s": 5.3, "grid": str(tmp_path / "grids" / "edm@0.5min.png")}
    assert Path(saved["budgets"]["edm@0.5min"]["grid"]).is_file()
    assert samplers_note(saved, ["defaults", "edm"]) == (
        "Samplers: defaults: resdiff's ddim, 50 steps; edm: EDM Heun (stochastic), 25 steps (49 NFE)")
    assert "DDIM-50 samples (peers: their own)" in fid_chart(saved).axes[0].get_title()


@pytest.mark.skipif(not PEERS_PYTHON.is_file(), reason=".venv-peers is absent (make bench-peers: 5.7 GB)")
@pytest.mark.parametrize("peer", ["lucidrains", "edm"])
def test_peer_trains_to_its_clock_resumes_and_samples_with_its_own_sampler(peer, tmp_path):
    """bench/peers.py in the peers' environment: a U-Net within 10% of tiny's 1,192,387 parameters, training that
    continues from its checkpoint, and seeded samples drawn at the model evaluations nfe() promises (the script
    counts them while sampling)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from bench.peers import nfe, parse_result, read_images, write_images

    images = write_images(tmp_path / "images.npy", np.full((32, 3, 32, 32), 255, dtype=np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def peers(*args: str) -> dict:
        proc = subprocess.run([str(PEERS_PYTHON), str(ROOT / "bench" / "peers.py"), *args, peer, "--run-dir",
                               str(tmp_path / "run"), "--threads", "1"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return parse_result(proc.stdout)

    first = peers("train", "--images", str(images), "--seconds", "0.5")
    assert first["steps"] >= 1 and first["images"] == 16 * first["steps"] and first["train_s"] >= 0.5
    assert abs(first["parameters"] / 1_192_387 - 1) <= 0.10 and first["nfe"] == nfe(peer) <= 50
    again = peers("train", "--images", str(images), "--seconds", str(first["train_s"]))  # its clock is there already
    assert (again["steps"], again["train_s"]) == (first["steps"], first["train_s"])
    more = peers("train", "--images", str(images), "--seconds", str(first["train_s"] + 0.1))
    assert more["steps"] > first["steps"] and more["train_s"] > first["train_s"]
    for name in ("a.npy", "b.npy"):
        done = peers("sample", "--n", "3", "--batch-size", "2", "--seed", "7", "--out", str(tmp_path / name))
        assert done["steps"] == more["steps"] and done["nfe"] == nfe(peer)
    a, b = read_images(tmp_path / "a.npy"), read_images(tmp_path / "b.npy")
    assert a.shape == (3, 3, 32, 32) and np.array_equal(a, b)  # seeded
