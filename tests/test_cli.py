"""The command-line programs (resdiff.cli): the defaults they run, their flags, and the installed commands."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from resdiff.cli import train as train_cli
from resdiff.config import Config, load_config
from tiny_runs import ROOT, write_pngs


def resolved(*argv: str) -> Config:
    return train_cli.resolve_config(train_cli.parse_args(list(argv)))


def test_train_without_a_config_runs_exactly_the_dataclass_defaults():
    """`train.py` with no --config trains Config(): compared field by field, so a default cannot live anywhere else
    (a YAML the program reads, a flag default) without this failing. Only the run directory is filled in."""
    cfg, defaults = resolved(), Config()
    for section in ("data", "diffusion", "train"):
        ours, theirs = getattr(cfg, section), getattr(defaults, section)
        for field in dataclasses.fields(theirs):
            assert getattr(ours, field.name) == getattr(theirs, field.name), f"{section}.{field.name}"
    assert cfg.model == defaults.model == {"preset": "auto"}
    assert cfg.out == str(Path("runs") / "demo") and defaults.out is None


def test_print_config_prints_the_resolved_yaml_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = train_cli.main(["--config", "folder64", "--steps", "7", "--resolution", "48", "train.lr=3e-4", "--print-config"])
    out = capsys.readouterr().out
    assert code == 0 and list(tmp_path.iterdir()) == []  # no run directory, nothing trained
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 7 and printed["train"]["lr"] == 3e-4 and printed["data"]["image_size"] == 48
    (tmp_path / "again.yaml").write_text(out)
    assert load_config(tmp_path / "again.yaml") == resolved("--config", "folder64", "--steps", "7", "--resolution", "48",
                                                            "train.lr=3e-4")


@pytest.mark.parametrize("flag", ["--image-size", "--resolution"])
def test_image_size_flag_and_its_diffusers_alias(flag):
    assert resolved(flag, "64").data.image_size == 64
    assert resolved(flag, "64x128").data.image_size == (64, 128)
    assert resolved(flag, "48", "data.image_size=40").data.image_size == 40  # a later override wins, as for every flag


def test_a_bad_image_size_is_one_line(capsys):
    assert train_cli.main(["--image-size", "big", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data.image_size must be") and "'big'" in err


# --------------------------------------------------------------------------- flags under the launchers


def _parser(name: str):
    import importlib

    return importlib.import_module(f"resdiff.cli.{name}").build_parser()


@pytest.mark.parametrize("name", ["train", "sample", "evaluate"])
def test_no_flag_is_a_prefix_of_a_launcher_option(name):
    """torchrun and accelerate launch parse abbreviations of their own options even after the script name
    (`--num` would be ambiguous with torchrun's --numa-binding): every flag of every command, editing's included,
    must reach the program untouched under both."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    flags = [s for action in _parser(name)._actions for s in action.option_strings if s not in ("-h", "--help")]
    assert len(flags) >= 3
    for flag in flags:
        args = get_args_parser().parse_args(["--nproc_per_node", "2", f"{name}.py", flag, "1"])
        assert args.training_script_args == [flag, "1"], flag
        args = launch_command_parser().parse_args([f"{name}.py", flag, "1"])
        assert args.training_script_args == [flag, "1"], flag


# --------------------------------------------------------------------------- the installed commands


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with resdiff installed from a wheel built from this checkout (pip, as a user would). Its
    dependencies (torch, diffusers, ...) are read from this test environment's site-packages through a .pth line,
    so the test takes seconds instead of installing torch again; resdiff itself comes from the wheel only."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "resdiff", source / "resdiff", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, text=True)
    (wheel,) = (root / "dist").glob("resdiff-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True, capture_output=True,
                   text=True)
    deps = Path(sysconfig.get_paths()["purelib"])
    (_site_packages(python) / "test-deps.pth").write_text(f"{deps}\n")
    return venv


def run_command(venv: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_wheel_gives_the_commands_with_their_configs_from_an_empty_directory(installed, tmp_path):
    """pip install of a wheel built from the checkout: resdiff-train/-sample/-evaluate/-prepare on PATH, working from
    an empty directory (no clone around): the shipped configs are package data, found by name."""
    work = tmp_path / "empty"
    work.mkdir()
    data = write_pngs(tmp_path / "pictures", 16, size=32)
    where = run_command(installed, work, "python", "-c", "import resdiff.cli; print(resdiff.cli.__file__)")
    assert where.returncode == 0 and where.stdout.startswith(str(installed)), where.stdout + where.stderr  # the wheel's copy

    trained = run_command(installed, work, "resdiff-train", "--data", str(data), "--steps", "5", "--out", "run",
                          "train.preview_steps=2", "train.preview_images=4")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (work / "run" / "model" / "model_index.json").is_file() and "done: 5 steps" in trained.stdout

    sampled = run_command(installed, work, "resdiff-sample", "--model", "run", "-n", "4", "--steps", "3", "--out", "s")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sorted(p.name for p in (work / "s").iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                                                "grid.png"]

    for command in ("resdiff-evaluate", "resdiff-prepare", "resdiff-train", "resdiff-sample"):
        helped = run_command(installed, work, command, "--help")
        assert helped.returncode == 0 and helped.stdout.startswith("usage: "), (command, helped.stderr[-2000:])
    config = run_command(installed, work, "resdiff-train", "--config", "cifar10", "--print-config")
    assert config.returncode == 0 and yaml.safe_load(config.stdout)["model"]["preset"] == "ddpm-cifar10"
    wrong = run_command(installed, work, "resdiff-train", "--stepz", "5")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert wrong.stderr.startswith("error: unrecognized arguments: --stepz") and "(see resdiff-train --help)" in wrong.stderr
    assert sorted(p.name for p in work.iterdir()) == ["run", "s"]
