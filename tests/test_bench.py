"""The benchmark scripts in bench/ run end to end and write the results they promise (on the tiny preset,
one round: these check that the scripts work, never how fast anything is)."""

import json
import os
import subprocess
import sys

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


def test_train_step_times_both_loops_at_one_architecture(tmp_path):
    result = bench("train_step", "--presets", "tiny", "--precisions", "no", "--rounds", "1", "--steps-per-round", "1",
                   "--batch-size", "4", tmp_path=tmp_path)
    assert result["machine"] and result["date"]
    (row,) = result["rows"]
    assert row["preset"] == "tiny" and row["parameters"] > 0 and row["gflop_per_image"] > 0
    for who in ("resdiff", "diffusers"):
        assert row[who]["images_per_s"] > 0 and 0 < row[who]["mfu"] and len(row[who]["seconds"]) == 1
    assert row["ratio"] == pytest.approx(row["resdiff"]["images_per_s"] / row["diffusers"]["images_per_s"], rel=0.01)


def test_train_step_memory_measures_each_loop_in_its_own_process(tmp_path):
    result = bench("train_step", "--memory", "--presets", "tiny", "--precisions", "no", "--batch-size", "4", tmp_path=tmp_path)
    assert [r["which"] for r in result["rows"]] == ["resdiff", "diffusers"]
    assert all(r["peak_mb"] > 50 for r in result["rows"])  # a Python process with torch loaded


def test_sample_compares_with_the_diffusers_pipeline(tmp_path):
    result = bench("sample", "--preset", "tiny", "--num-images", "2", "--steps", "2", "--rounds", "1", "--precisions", "no",
                   tmp_path=tmp_path)
    (row,) = result["rows"]
    assert row["resdiff img/s"] > 0 and row["diffusers img/s"] > 0 and row["steps"] == 2


def test_train_e2e_compares_fit_with_the_bare_step(tmp_path):
    (row,) = bench("train_e2e", "--preset", "tiny", "--images", "64", "--batch-size", "8", "--steps", "4", tmp_path=tmp_path)["rows"]
    assert row["fit img/s"] > 0 and row["bare step img/s"] > 0
    assert row["fit / bare"] == pytest.approx(row["fit img/s"] / row["bare step img/s"], abs=0.01)


def test_blocks_counts_each_variant_against_the_plain_resblock(tmp_path):
    result = bench("blocks", "--preset", "tiny", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows and all(r["params"] > 0 and r["forward_backward_flops"] > r["forward_flops"] > 0 for r in rows.values())
