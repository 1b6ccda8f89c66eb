"""resdiff-export (resdiff/export.py, resdiff/cli/export.py): a trained model as a folder to share, end to end on a
tiny run: train, export to diffusers' own classes, load and sample in a fresh process that never imports resdiff.
Every bad input is one error line, exit code 2, and no output folder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from resdiff.cli.export import main as export_main
from resdiff.convert import to_diffusers
from resdiff.export import export_folder
from resdiff.files import checksum_problem, read_checksums
from resdiff.model_folder import load_model
from tiny_models import pickle_file, pickle_only_pipeline, save_pipeline, small_unet
from tiny_runs import ROOT, fit, load_script, write_pngs

sample_script = load_script("sample_cli_export", "sample.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    pngs = write_pngs(root / "pngs", 16)
    fit(root / "shapes", f"data.path={pngs}", "train.steps=2")
    return root / "shapes"


def export_cli(argv, capsys) -> tuple[int, str, str]:
    code = export_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_export_to_diffusers_holds_the_runs_weights_converted_exactly(run, tmp_path, capsys):
    out = tmp_path / "shapes-ddpm"
    code, printed, err = export_cli([run, out, "--diffusers"], capsys)
    assert code == 0, err
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert sorted(read_checksums(out)[0]) == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                              "unet/diffusion_pytorch_model.safetensors"]
    assert checksum_problem(out) is None and not list(out.rglob("*.bin"))
    # The weights are the run's, converted exactly.
    ours, _ = load_model(run, device="cpu")
    theirs = UNet2DModel.from_pretrained(out / "unet")
    expected = to_diffusers(ours).state_dict()
    assert theirs.state_dict().keys() == expected.keys()
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in expected.items())
    # resdiff's own sampler reads the exported folder too (it converts the UNet2DModel back).
    code = sample_script.main(["--model", str(out), "-n", "2", "--steps", "2", "--out", str(tmp_path / "samples")])
    assert code == 0 and (tmp_path / "samples" / "00001.png").is_file()


@pytest.mark.slow  # a new interpreter importing torch and diffusers: several seconds, and the point of the test
def test_the_exported_cards_code_loads_and_samples_in_a_process_that_never_imports_resdiff(run, tmp_path):
    out = export_folder(run, tmp_path / "shapes-ddpm", diffusers=True)
    # The card's own code, run by a plain python with diffusers alone.
    card = (out / "README.md").read_text()
    code_text = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace('"USER/shapes-ddpm"', repr(str(out)))
    probe = code_text + "\nimport sys\nassert 'resdiff' not in sys.modules, 'resdiff was imported'\nprint(len(images), images[0].size)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["4", "(16,", "16)"] and (tmp_path / "sample.png").is_file()


def test_an_export_in_resdiffs_format_keeps_the_model_and_its_card(run, tmp_path, capsys):
    code, printed, err = export_cli([run / "model", tmp_path / "out"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["unet"] == ["resdiff.unet", "UNet"]
    ours, _ = load_model(run, device="cpu")
    again, _ = load_model(tmp_path / "out", device="cpu")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert "| steps | 2 |" in (tmp_path / "out" / "README.md").read_text()


def test_the_installed_command_answers_help():
    command = Path(sys.executable).parent / "resdiff-export"
    done = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: resdiff-export [-h] [--diffusers] RUN OUT" in done.stdout
    script = subprocess.run([sys.executable, ROOT / "export.py", "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert script.returncode == 0  # the same program, named as it was started
    assert script.stdout == done.stdout.replace("usage: resdiff-export", "usage: python export.py")


BAD = {
    # case: (make the source in tmp_path, the flags, the file the error names, what it says)
    "architecture that does not convert": (
        lambda t: save_pipeline(small_unet(0, block="bottleneck"), t / "bottleneck"), ["--diffusers"],
        "bottleneck/unet/config.json", "cannot convert: diffusers has no bottleneck"),
    "folder that is not a model": (lambda t: write_pngs(t / "pictures", 2), [], "pictures", "is not a model"),
    "pickle-only pipeline": (lambda t: pickle_only_pipeline(t / "old"), ["--diffusers"], "old/unet",
                             "has no .safetensors weights (it has diffusion_pytorch_model.bin: pickle files"),
    "pickle file": (lambda t: pickle_file(t / "model.ckpt"), [], "model.ckpt", "is not a folder (a pickle file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    make, flags, named, message = BAD[case]
    code, out, err = export_cli([make(tmp_path), tmp_path / "out", *flags], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(tmp_path / named) in err and message in err, err
    assert "Traceback" not in out + err and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_an_export_never_replaces_a_folder(run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    code, out, err = export_cli([run, tmp_path / "out"], capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
