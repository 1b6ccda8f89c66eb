"""Fine-tuning (resdiff.pretrained, train.py --init-from): a run starts from another model's weights
and architecture, converted exactly; its first loss is the source model's; its identity records the source; every
bad source is one error line, exit code 2, and no run directory."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from diffusers import UNet2DModel

from resdiff.build import build_trainer, build_unet
from resdiff.pretrained import load_init_source
from resdiff.cli.train import main as train_main, parse_args, resolve_config
from resdiff.data import to_model_range
from tiny_models import diffusers_unet, pickle_file, pickle_only_pipeline, save_pipeline
from tiny_runs import TINY, config, fit, read_log, write_pngs


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("data") / "pngs", 16)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small UNet2DModel pipeline saved with diffusers, random weights (dropout 0, so train mode changes nothing)."""
    return save_pipeline(diffusers_unet(1), tmp_path_factory.mktemp("sources") / "ddpm")


def train_cli(argv, capsys) -> tuple[int, str, str]:
    code = train_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def same_weights(model, weights: dict) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_the_first_loss_is_the_source_models_loss_on_the_same_batch(source, pngs, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--data", pngs, "--out", run, "--steps", 1, *TINY, "train.log_every=1"]
    code, out, err = train_cli(["--init-from", source, *argv], capsys)
    assert code == 0, err
    first = read_log(run)[0]["loss"]
    # The trainer's first step again (build_trainer seeds every process the same way): its first batch, then the
    # loss's timesteps and noise from the RNG as they are, for the source itself (diffusers' own class, unconverted)
    # and for the model a run from scratch would start with.
    cfg = resolve_config(parse_args([str(a) for a in argv]))  # as resdiff-train reads it
    cfg.out = str(tmp_path / "replay")
    trainer = build_trainer(cfg, init_from=source, echo=lambda _: None)
    try:
        images, _ = next(iter(trainer.batches))
        x0 = to_model_range(images)
        rng = torch.get_rng_state()
        theirs = UNet2DModel.from_pretrained(source / "unet").train()
        expected = trainer.diffusion.loss(theirs, x0).item()
        set_seed(0)
        fresh = build_unet(cfg, None).train()
        torch.set_rng_state(rng)
        scratch = trainer.diffusion.loss(fresh, x0).item()
    finally:
        trainer.close()
    assert first == pytest.approx(expected, abs=2e-6)  # log.jsonl rounds to 6 decimals
    assert abs(scratch - first) > 1e-2, (scratch, first)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pngs) -> Path:
    run = tmp_path_factory.mktemp("runs") / "pets"
    fit(run, f"data.path={pngs}", "train.steps=1")
    return run


@pytest.mark.parametrize("kind", ["diffusers pipeline", "UNet2DModel folder", "resdiff run", "resdiff model folder"])
def test_every_kind_of_source_gives_its_exact_weights_and_architecture(kind, source, trained, tmp_path):
    from resdiff.convert import from_diffusers
    from resdiff.model_folder import load_model

    path = {"diffusers pipeline": source, "UNet2DModel folder": source / "unet", "resdiff run": trained,
            "resdiff model folder": trained / "model"}[kind]
    if kind.startswith("resdiff"):
        expected, _ = load_model(trained, device="cpu")
    else:
        expected = from_diffusers(UNet2DModel.from_pretrained(source / "unet"))
    cfg = config(tmp_path / "run", "model.dropout=0.1", "model.preset=auto")
    got = load_init_source(cfg, path)
    assert got.path == path.resolve() and same_weights(expected, got.weights)
    arch = {k: v for k, v in expected.config.items() if not k.startswith("_")}
    assert cfg.model["channel_mult"] == list(arch["channel_mult"]) and cfg.model["dropout"] == 0.1  # dropout may change
    assert "sample_size" not in cfg.model and "in_channels" not in cfg.model  # the data decides them, as ever
    model = build_unet(cfg, None)
    model.load_state_dict(got.weights)  # the config's architecture holds the source's weights, every key


def test_the_run_records_its_source_and_a_resume_with_another_is_refused(source, pngs, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--data", pngs, "--out", run, *TINY]
    code, out, err = train_cli(["--init-from", source, "--steps", 1, *argv], capsys)
    assert code == 0, err
    identity = json.loads((run / "identity.json").read_text())
    assert identity["init.source"] == str(source.resolve())
    assert identity["init.sha256"] == hashlib.sha256(
        (source / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert "fine-tuned from | `ddpm`" in (run / "model" / "README.md").read_text()
    other = save_pipeline(diffusers_unet(2), tmp_path / "other")
    for flags in (["--init-from", other], []):  # another source, or none
        code, out, err = train_cli([*flags, "--steps", 2, *argv], capsys)
        assert code == 2 and "cannot resume" in err and "started from another model" in err and "init." in err, err
        assert err.count("\n") == 1
    code, out, err = train_cli(["--init-from", source, "--steps", 2, *argv], capsys)
    assert code == 0 and "resumed from" in out, err
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2]


def test_a_run_from_scratch_refuses_a_source_on_resume(pngs, tmp_path, capsys, source):
    run = tmp_path / "run"
    code, _, err = train_cli(["--data", pngs, "--out", run, "--steps", 1, *TINY], capsys)
    assert code == 0, err
    code, _, err = train_cli(["--init-from", source, "--data", pngs, "--out", run, "--steps", 2, *TINY], capsys)
    assert code == 2 and "started from another model (init.source: None ->" in err, err


BAD_SOURCES = {
    # case: (make the source in tmp_path, extra arguments, the file the error names, what it says)
    "not a model": (lambda t: write_pngs(t / "pictures", 2), [], "pictures", "is not a model"),
    "channels unlike the data's": (lambda t: save_pipeline(diffusers_unet(0, in_channels=1, out_channels=1), t / "gray"),
                                   [], "gray/unet/config.json", "in_channels=1, but the data is read with data.image_channels=3"),
    "size unlike the data's": (lambda t: save_pipeline(diffusers_unet(0, sample_size=32), t / "big"), [],
                               "big/unet/config.json", "set data.image_size=32"),
    "pickle-only": (lambda t: pickle_only_pipeline(t / "old"), [], "old/unet", "diffusion_pytorch_model.bin: pickle files"),
    "pickle file": (lambda t: pickle_file(t / "model.ckpt"), [], "model.ckpt",
                    "is not a folder (a pickle file"),
    "architecture resdiff cannot hold": (
        lambda t: save_pipeline(diffusers_unet(0, time_embedding_type="fourier"), t / "fourier"), [],
        "fourier/unet/config.json", "cannot convert: time_embedding_type='fourier'"),
    "model keys that conflict": (lambda t: save_pipeline(diffusers_unet(0), t / "ddpm"), ["model.num_res_blocks=2"],
                                 "ddpm/unet/config.json", "model.num_res_blocks=2 (the source has 1)"),
    "a named preset": (lambda t: save_pipeline(diffusers_unet(0), t / "ddpm"), ["model.preset=small"],
                       "ddpm/unet/config.json", "model.channel_mult=[1, 2, 2, 2] (the source has [1, 2])"),
    "classes unlike the data's": (lambda t: save_pipeline(diffusers_unet(0, num_class_embeds=3), t / "labels"), [],
                                  "labels/unet/config.json", "has 2 classes, but the data has no classes"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_a_bad_source_is_one_line_exit_2_and_no_run_directory(case, pngs, tmp_path, capsys):
    make, extra, named, message = BAD_SOURCES[case]
    code, out, err = train_cli(["--init-from", make(tmp_path), "--data", pngs, "--out", tmp_path / "run", "--steps", 1,
                                *TINY, *extra], capsys)
    assert code == 2 and err.startswith("error: --init-from ") and err.count("\n") == 1, err
    assert str(tmp_path / named) in err and message in err, err
    assert "Traceback" not in out + err and not (tmp_path / "run").exists()


def test_print_config_shows_the_sources_architecture_and_writes_nothing(source, tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    code, out, err = train_cli(["--init-from", source, "--print-config", *TINY], capsys)
    assert code == 0 and list(tmp_path.iterdir()) == [], err
    model = yaml.safe_load(out)["model"]
    assert model["channel_mult"] == [1, 2] and model["num_res_blocks"] == 1 and model["attention_resolutions"] == [8]
