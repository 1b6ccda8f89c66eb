"""Latent diffusion end to end (train, sample, edit, evaluate, export) with a randomly initialised diffusers
AutoencoderTiny saved to a folder: the mechanics, without downloaded weights. 32x32 images, 8x: 4x4x4 latents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from PIL import Image

from resdiff.cli import evaluate as evaluate_cli
from resdiff.cli import export as export_cli
from resdiff.cli import sample as sample_cli
from resdiff.cli import train as train_cli
from resdiff.diffusion import LATENT_SCHEDULE_SHIFT, GaussianDiffusion
from resdiff.files import write_checksums
from resdiff.inception import FIDInceptionV3
from resdiff.testing import synthetic_weights
from resdiff.layout import LATENT
from tiny_models import tiny_autoencoder
from tiny_runs import ROOT, read_log, write_pngs

SMALL = ["model.channels=16", "model.norm_groups=8", "data.num_workers=0", "train.batch_size=8", "train.lr=1e-3",
         "train.warmup_steps=0", "train.preview_steps=2", "train.preview_images=2", "train.eval_every=0"]


@pytest.fixture(scope="module")
def ae(tmp_path_factory) -> Path:
    return tiny_autoencoder("tiny", tmp_path_factory.mktemp("ae") / "tiny")


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("data") / "pngs", 16, size=32)


@pytest.fixture(scope="module")
def run(tmp_path_factory, ae, pngs) -> Path:
    """Two steps of latent training on an image folder, through train.py's flags."""
    out = tmp_path_factory.mktemp("latent") / "run"
    assert train_cli.main(["--data", str(pngs), "--autoencoder", str(ae), "--steps", "2", "--out", str(out), *SMALL]) == 0
    return out


def run_cli(module, argv, capsys) -> tuple[int, str, str]:
    code = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_training_on_a_folder_encodes_it_once_and_the_model_records_its_autoencoder(run, ae, pngs, tmp_path, capsys):
    record = json.loads((run / "model" / LATENT).read_text())
    assert record["autoencoder"]["spec"] == str(ae) and record["autoencoder"]["kind"] == "AutoencoderTiny"
    assert record["norm"]["source"].startswith("AutoencoderTiny config: scaling_factor 1")
    unet = json.loads((run / "model" / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["sample_size"]) == (4, 4)  # the U-Net learns 4x4x4 latents of 32x32 images
    assert json.loads((run / "model" / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False
    with Image.open(run / "samples" / "step-0000002.png") as grid:  # previews are decoded: 32x32 images
        assert grid.size == (2 * 32 + 3 * 2, 32 + 2 * 2)
    identity = json.loads((run / "identity.json").read_text())
    assert identity["data.autoencoder"] == record["autoencoder"]["fingerprint"]
    # schedule_shift "auto": the run trains on the latent shift and records the number; the model's scheduler has it
    assert identity["diffusion.schedule_shift"] == LATENT_SCHEDULE_SHIFT
    assert yaml.safe_load((run / "config.yaml").read_text())["diffusion"]["schedule_shift"] == LATENT_SCHEDULE_SHIFT
    saved = DDPMScheduler.from_pretrained(run / "model", subfolder="scheduler")
    assert torch.allclose(saved.alphas_cumprod, GaussianDiffusion.from_config(latent=True).scheduler.alphas_cumprod)

    # The same command resumes (the cached latents are found, not encoded again), and says what it trains on.
    code, out, err = run_cli(train_cli, ["--data", pngs, "--autoencoder", ae, "--steps", "3", "--out", run, *SMALL], capsys)
    assert code == 0, err
    assert f"  latents:   4x4x4 of {ae} (AutoencoderTiny), normalised by AutoencoderTiny config" in out
    assert "encoding" not in err.lower() and [r["step"] for r in read_log(run) if "loss" in r][-1] == 3


def test_a_resume_knows_the_autoencoder_by_its_files_not_by_how_its_folder_is_named(ae, pngs, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--data", str(pngs), "--autoencoder", str(ae), "--steps", "2", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    moved = tmp_path / "elsewhere" / "tiny"  # the same files under another name, given as a relative path
    moved.parent.mkdir()
    moved.symlink_to(ae, target_is_directory=True)
    relative = os.path.relpath(moved)
    code, _, err = run_cli(train_cli, ["--data", pngs, "--autoencoder", relative, "--steps", "3", "--out", out, *SMALL],
                           capsys)
    assert code == 0, err
    assert [r["step"] for r in read_log(out) if "loss" in r][-1] == 3

    other = tiny_autoencoder("tiny", tmp_path / "other", seed=1)  # other weights: a change the identity names
    code, _, err = run_cli(train_cli, ["--data", pngs, "--autoencoder", other, "--steps", "4", "--out", out, *SMALL],
                           capsys)
    assert code == 2
    assert f"cannot resume {out}: it was trained with other data or settings (data.autoencoder: " in err


def test_a_latent_run_from_before_the_shift_resumes_only_with_the_schedule_it_had(run, ae, pngs, tmp_path, capsys):
    """A latent run recorded before diffusion.schedule_shift existed trained unshifted: resuming it with the default
    ("auto": the latent shift) would change its schedule mid-run, so it is refused naming the key; with
    diffusion.schedule_shift=1 it continues."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    identity = json.loads((old / "identity.json").read_text())
    del identity["diffusion.schedule_shift"]
    (old / "identity.json").write_text(json.dumps(identity))
    argv = ["--data", pngs, "--autoencoder", ae, "--steps", "3", "--out", old, *SMALL]
    code, _, err = run_cli(train_cli, argv, capsys)
    assert code == 2 and f"diffusion.schedule_shift: 1.0 -> {LATENT_SCHEDULE_SHIFT}" in err, err
    code, _, err = run_cli(train_cli, [*argv, "diffusion.schedule_shift=1"], capsys)
    assert code == 0, err


def test_fine_tuning_a_latent_model_keeps_its_autoencoder_and_its_normalisation(run, ae, pngs, tmp_path, capsys):
    source = tmp_path / "source"  # the run's model, its normalisation changed as another data set's would be
    shutil.copytree(run / "model", source)
    record = json.loads((source / LATENT).read_text())
    record["norm"] = {"shift": [0.25, 0, 0, -0.25], "scale": [0.5, 2, 1, 1], "source": "measured on other data"}
    (source / LATENT).write_text(json.dumps(record))
    (source / "SHA256SUMS").unlink()
    write_checksums(source)
    out = tmp_path / "tuned"
    code, _, err = run_cli(train_cli, ["--init-from", source, "--data", pngs, "--steps", "1", "--out", out, *SMALL],
                           capsys)  # no --autoencoder: the source's latent space comes with it
    assert code == 0, err
    tuned = json.loads((out / "model" / LATENT).read_text())
    assert tuned["autoencoder"] == record["autoencoder"] and tuned["norm"] == record["norm"]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["autoencoder"] == str(ae)

    other = tiny_autoencoder("tiny", tmp_path / "other", seed=1)
    code, _, err = run_cli(train_cli, ["--init-from", source, "--data", pngs, "--autoencoder", other, "--steps", "1",
                                       "--out", tmp_path / "refused", *SMALL], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--init-from {source}: the model was trained in the latents of {ae}, but " in err

    pixels = tmp_path / "pixels"  # a model of images is not fine-tuned on latents
    assert train_cli.main(["--data", str(pngs), "--steps", "1", "--out", str(pixels), *SMALL]) == 0
    capsys.readouterr()
    code, _, err = run_cli(train_cli, ["--init-from", pixels, "--data", pngs, "--autoencoder", ae, "--steps", "1",
                                       "--out", tmp_path / "refused2", *SMALL], capsys)
    assert code == 2 and "it is a model of images, but the run trains on an autoencoder's latents" in err
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused2").exists()


def test_sampling_decodes_and_refuses_another_autoencoder(run, tmp_path, capsys):
    code, out, err = run_cli(sample_cli, ["--model", run, "-n", "3", "--steps", "3", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "s" / "00002.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    other = tiny_autoencoder("tiny", tmp_path / "other", seed=1)
    code, out, err = run_cli(sample_cli, ["--model", run, "-n", "1", "--autoencoder", other, "--out", tmp_path / "x"],
                             capsys)
    assert code == 2 and err.count("\n") == 1 and "the model was trained in the latent space of" in err, err
    assert "its SHA-256 differs" in err and not (tmp_path / "x").exists()


def test_edits_work_in_latent_space(run, ae, tmp_path):
    """Image to image from the image's own latents (strength 0 gives back its decoded latents), interpolation between
    two seeds' latent noise (its ends are those seeds' samples) and inpainting with the mask on the latent grid."""
    from resdiff.autoencoder import load_autoencoder
    from resdiff.data import to_model_range, to_uint8
    from resdiff.editing import img2img, inpaint, interpolate
    from resdiff.sampling import generate

    photo = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    kept = img2img(run, photo, 2, strength=0.0, progress=False)
    autoencoder = load_autoencoder(ae)
    roundtrip = to_uint8(autoencoder.decode(autoencoder.encode(to_model_range(photo)[None])))
    assert kept.shape == (2, 3, 32, 32) and (kept.int() - roundtrip.int()).abs().max() <= 1
    frames = interpolate(run, 3, 7, frames=3, steps=3, progress=False)
    ends = [generate(run, 1, sampler="ddim", steps=3, seed=s, progress=False)[0] for s in (3, 7)]
    assert torch.equal(frames[0], ends[0]) and torch.equal(frames[-1], ends[1])
    mask = torch.zeros(32, 32, dtype=torch.uint8)
    mask[:, :16] = 255  # keep the left half
    filled = inpaint(run, photo, mask, 2, steps=3, resample=1, progress=False)
    assert filled.shape == (2, 3, 32, 32)


def test_evaluate_scores_decoded_samples_against_the_image_folder(run, pngs, tmp_path, capsys):
    weights = tmp_path / "inception.pth"
    torch.save(synthetic_weights(FIDInceptionV3(), seed=0), weights)
    code, out, err = run_cli(evaluate_cli, ["--model", run, "--ref", pngs, "-n", "4", "--steps", "2", "--inception",
                                            weights, "--inception-unverified", "--kid-subsets", "2",
                                            "--out", tmp_path / "eval"], capsys)
    assert code == 0, err
    result = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    assert np.isfinite(result["fid"]) and result["reference_images"] == 16


def test_a_prepared_latent_dataset_needs_no_flag(ae, pngs, tmp_path, capsys):
    from resdiff.prepare import main as prepare_main

    prepare_main([str(pngs), str(tmp_path / "latents"), "--image-size", "32", "--autoencoder", str(ae)])
    code, out, err = run_cli(train_cli, ["--data", tmp_path / "latents", "--steps", "1", "--out", tmp_path / "run",
                                         "data.image_size=32", *SMALL], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "model" / LATENT).read_text())["autoencoder"]["spec"] == str(ae)
    assert json.loads((tmp_path / "run" / "identity.json").read_text())["diffusion.schedule_shift"] == LATENT_SCHEDULE_SHIFT
    code, out, err = run_cli(train_cli, ["--data", pngs, "--autoencoder", ROOT / "nowhere", "--steps", "1",
                                         "--out", tmp_path / "bad", *SMALL], capsys)
    assert code == 2 and err.startswith("error: autoencoder") and not (tmp_path / "bad").exists(), err


@pytest.mark.slow
def test_the_diffusers_export_is_an_ldm_pipeline_that_loads_without_resdiff(run, tmp_path, capsys):
    code, out, err = run_cli(export_cli, [run, tmp_path / "ldm", "--diffusers"], capsys)
    assert code == 0, err
    index = json.loads((tmp_path / "ldm" / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"] == ["diffusers", "AutoencoderTiny"]
    code = ("import sys\n"
            "from diffusers import LDMPipeline\n"
            f"pipe = LDMPipeline.from_pretrained({str(tmp_path / 'ldm')!r})\n"
            "images = pipe(batch_size=2, num_inference_steps=3, output_type='np').images\n"
            "assert images.shape == (2, 32, 32, 3), images.shape\n"
            "assert 'resdiff' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
