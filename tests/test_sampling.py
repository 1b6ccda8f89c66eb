"""Sampling: sample.py on pipeline folders and run directories, every sampler, seeds, two processes, errors.

Tiny random U-Nets (16x16) with a 100-step training schedule keep every run to a fraction of a second;
the CLI is driven in-process through sample.main where a subprocess would only add interpreter start-up
(several seconds of imports each), and for real where the process boundary is the point: the exit code
and stderr of a mistake, and two processes under torchrun.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from resdiff import UNet, UNetOutput, UsageError
from resdiff.choices import SAMPLERS
from resdiff.images import make_grid, read_images, to_pil
from resdiff.model_folder import load_model
from resdiff.sampling import ImageGenerator, SamplingSettings, generate

from launch import free_port, launch_env, launcher, run_watched
from tiny_models import FEW, save_pipeline, small_unet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sample.py"

from resdiff.cli import sample as cli  # noqa: E402  (sample.py in a clone is this module's main)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they lose a lot to them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def script_run_with_a_mistake(tmp_path_factory):
    """python sample.py for real, on a missing folder. Started with the module's first test so that its
    seconds of imports overlap the single-threaded in-process tests; checked by the last test."""
    missing = tmp_path_factory.mktemp("empty") / "missing"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--model", str(missing), "-n", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    yield proc, missing
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Pipeline folders: gray (1 channel), rgb, class-conditional, and a diffusers UNet2DModel."""
    root = tmp_path_factory.mktemp("models")
    gray = save_pipeline(small_unet(1, in_channels=1), root / "gray")
    rgb = save_pipeline(small_unet(2), root / "rgb")
    cond = save_pipeline(small_unet(3, num_classes=3, zero_init_last=False), root / "cond")  # labels must matter
    torch.manual_seed(4)
    theirs = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )
    diffusers_folder = save_pipeline(theirs, root / "diffusers")
    return dict(gray=gray, rgb=rgb, cond=cond, diffusers=diffusers_folder)


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "euler", "heun"])
def test_each_sampler_writes_pngs_and_a_grid(models, tmp_path, capsys, sampler):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        ["--model", models["gray"], "-n", 5, "--sampler", sampler, "--steps", FEW[sampler], "--batch-size", 3, "--out", out],
        capsys,
    )
    assert code == 0, err
    assert pngs(out) == [f"{i:05d}.png" for i in range(5)]
    for name in pngs(out):
        with Image.open(out / name) as im:
            assert im.mode == "L" and im.size == (16, 16)
    with Image.open(out / "grid.png") as im:
        assert im.mode == "L" and im.size == (3 * 18 + 2, 2 * 18 + 2)  # 5 images: 3 columns, 2 rows, 2 px padding
    assert f"wrote 5 images to {out}" in stdout and "processes: 1" in stdout


def test_npz_and_a_new_folder_next_to_the_model(models, capsys):
    code, stdout, err = run_cli(["--model", models["gray"], "--num-images", 3, "--sampler", "dpm++", "--npz"], capsys)
    assert code == 0, err
    out = models["gray"].parent / "samples-dpm++-20-seed0"  # dpm++'s own 20 steps
    assert f"wrote 3 images to {out}" in stdout
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 16, 16, 1)  # what FID tools read
    assert np.array_equal(arr, read_images(out, range(3)).permute(0, 2, 3, 1).numpy())
    shutil.rmtree(out)


def test_the_default_is_ancestral_ddpm_at_50_steps_capped_at_the_trained_timesteps():
    """sample.py with no --sampler: ddpm (the lowest FID at 20 and 50 model evaluations in bench/contenders.py)
    at its own 50 steps, never more steps than the model was trained with."""
    assert SamplingSettings().sampler == "ddpm" and SAMPLERS["ddpm"][1] == 50
    assert cli.build_parser().parse_args(["--model", "m"]).sampler is None  # unset: each mode picks its default
    for trained, steps in ((1000, 50), (20, 20)):
        config = dict(DDPMScheduler(num_train_timesteps=trained).config)
        assert ImageGenerator(Elementwise(), SamplingSettings(), config).steps == steps
    assert len(generate(Elementwise(), 2, progress=False, scheduler_config=config)) == 2


def test_with_few_steps_and_no_sampler_named_the_default_is_the_few_step_sampler(models, capsys):
    """--steps 20 or fewer without --sampler: dpm++sde (best or near it at 10 and 20 evaluations on both sets), in
    sample.py, evaluate.py's flags and generate() alike; more steps, a named sampler or an edit keep their own."""
    from resdiff.settings import FEW_STEP_SAMPLER, FEW_STEPS, default_sampler

    assert (FEW_STEPS, FEW_STEP_SAMPLER) == (20, "dpm++sde")
    code, stdout, err = run_cli(["--model", models["rgb"], "-n", 2, "--steps", 4, "--no-grid"], capsys)
    assert code == 0, err
    out = models["rgb"].parent / "samples-dpm++sde-4-seed0"
    assert "sampler: dpm++sde, steps: 4" in stdout and pngs(out) == ["00000.png", "00001.png"]
    named = generate(models["rgb"], 2, steps=4, sampler="dpm++sde", progress=False)
    assert torch.equal(read_images(out, range(2)), named)  # the same images as naming it
    assert torch.equal(generate(models["rgb"], 2, steps=4, progress=False), named)  # the Python API picks it too
    shutil.rmtree(out)
    assert [default_sampler(steps) for steps in (None, 1, 20, 21, 50)] == ["ddpm", "dpm++sde", "dpm++sde", "ddpm", "ddpm"]
    from resdiff.editing import Img2Img, Inpaint, Interpolate

    picture = torch.zeros(3, 16, 16, dtype=torch.uint8)
    edits = (Inpaint(picture, torch.full((16, 16), 255, dtype=torch.uint8)), Img2Img(picture), Interpolate(1, 2))
    assert [default_sampler(4, edit) for edit in edits] == ["ddpm", "ddpm", "ddim"]  # inpainting takes ddpm or ddim
    parser = cli.build_parser()
    assert SamplingSettings.from_args(parser.parse_args(["--model", "m", "--steps", "10", "--sampler", "ddim"])).sampler == "ddim"
    assert SamplingSettings.from_args(parser.parse_args(["--model", "m", "--steps", "10"])).sampler == "dpm++sde"
    assert SamplingSettings.from_args(parser.parse_args(["--model", "m", "--steps", "20"])).sampler == "dpm++sde"
    assert SamplingSettings.from_args(parser.parse_args(["--model", "m", "--steps", "21"])).sampler == "ddpm"
    from resdiff.cli import evaluate

    flags = evaluate.build_parser().parse_args(["--model", "m", "--ref", "r", "--steps", "10"])
    assert SamplingSettings.from_args(flags).sampler == "dpm++sde"  # evaluate.py scores what sample.py draws


def test_default_output_folder_is_never_reused(models, capsys):
    argv = ["--model", models["rgb"], "-n", 2, "--sampler", "ddpm", "--steps", 2, "--seed", 7, "--no-grid"]
    assert run_cli(argv, capsys)[0] == 0
    assert run_cli(argv, capsys)[0] == 0
    first, second = (models["rgb"].parent / name for name in ("samples-ddpm-2-seed7", "samples-ddpm-2-seed7-1"))
    assert pngs(first) == pngs(second) == ["00000.png", "00001.png"]
    assert not (first / "grid.png").exists()
    assert torch.equal(read_images(first, range(2)), read_images(second, range(2)))  # the same seed: the same images
    assert read_images(first, range(2)).shape == (2, 3, 16, 16)  # RGB
    shutil.rmtree(first)
    shutil.rmtree(second)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{tmp}/nowhere"], "does not exist"),
        (["--model", "{tmp}"], "is not a model"),
        (["--model", "{gray}", "--sampler", "plms"], "unknown sampler 'plms'; choose one of ddpm, ddim, dpm++, euler, heun, unipc, dpm++3m, dpm++sde"),
        (["--model", "{gray}", "--num-images", "0"], "number of images (--num-images) must be a positive integer"),
        (["--model", "{gray}", "--steps", "0"], "steps (--steps) must be a positive integer"),
        (["--model", "{gray}", "--batch-size", "-1"], "batch size (--batch-size) must be a positive integer"),
        (["--model", "{gray}", "--steps", "101"], "more than the 100 timesteps"),
        (["--model", "{gray}", "--sampler", "euler", "--eta", "1"], "eta applies to the ddim sampler only"),
        (["--model", "{gray}", "--class-label", "1"], "is unconditional; drop --class-label"),
        (["--model", "{gray}", "--guidance-scale", "3"], "classifier-free guidance needs a class-conditional model"),
        (["--model", "{cond}", "--class-label", "3"], "class label 3 is out of range"),
        (["--model", "{gray}", "--mixed-precision", "fp8"], "unknown mixed precision 'fp8'"),
        (["--model", "{gray}", "--device", "gpu0"], "unknown device 'gpu0'"),
        (["--model", "{gray}", "--seed", "-1"], "seed (--seed) must be a non-negative integer"),
        (["--model", "{gray}", "--num", "4"], "unrecognized arguments: --num"),
        (["--num-images", "4"], "the following arguments are required: --model"),
    ],
)
def test_mistakes_are_one_line_errors_with_exit_code_2(models, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, **models) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err + out
    assert list(tmp_path.iterdir()) == [] and not list(models["gray"].parent.glob("samples-*"))  # nothing written


# ----------------------------------------------------------------------------- seeds and processes


class Elementwise(ModelMixin, ConfigMixin):
    """A stand-in network whose per-image arithmetic cannot depend on the batch: eps = scale * x."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 3):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, sample, timestep, class_labels=None):
        return UNetOutput(sample=self.scale * sample)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0), ("euler", 0.0), ("dpm++", 0.0)])
def test_same_seed_same_images_whatever_the_batch_size(sampler, eta):
    """Exact: each image's initial and per-step noise come from (seed, index) alone (ddpm and ddim eta=1 draw per step)."""
    config = dict(DDPMScheduler(num_train_timesteps=100).config)
    kw = dict(sampler=sampler, steps=FEW[sampler], eta=eta, seed=3, progress=False, scheduler_config=config)
    whole = generate(Elementwise(), 7, batch_size=7, **kw)
    assert torch.equal(whole, generate(Elementwise(), 7, batch_size=3, **kw))
    assert torch.equal(whole[[6, 1, 2]], generate(Elementwise(), 7, batch_size=2, indices=[6, 1, 2], **kw))
    assert len({bytes(img.numpy()) for img in whole}) == 7  # every image its own noise
    other = generate(Elementwise(), 7, batch_size=7, **{**kw, "seed": 4})
    assert all(not torch.equal(a, b) for a, b in zip(whole, other))


def test_same_seed_same_images_from_a_real_unet_up_to_float_rounding(models):
    """A real network's kernels differ with the batch size in the last float bit (about 1e-7), which can move
    a rare pixel across a rounding boundary: at most one level, in a tiny fraction of the pixels."""
    kw = dict(sampler="ddpm", steps=FEW["ddpm"], seed=3, progress=False)
    whole = generate(models["gray"], 5, batch_size=5, **kw)
    for batch_size in (1, 2):
        diff = (whole.int() - generate(models["gray"], 5, batch_size=batch_size, **kw).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    other = generate(models["gray"], 5, batch_size=5, **{**kw, "seed": 4})
    assert all((a.float() - b.float()).abs().mean() > 10 for a, b in zip(whole, other))


@pytest.mark.slow
def test_two_processes_split_the_images_and_match_one_process(models, tmp_path):
    out = tmp_path / "out"
    proc = run_watched(  # the README's line, with the test's own free port
        [launcher("torchrun"), "--nproc_per_node", "2", "sample.py", "--model", str(models["gray"]),
         "-n", "5", "--sampler", "ddpm", "--steps", "10", "--seed", "5", "--batch-size", "1", "--npz", "--out", str(out)],
        timeout=120, env=launch_env(free_port()),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("processes: 2") == 1  # a world of two, reported once by the main process
    assert proc.stdout.count("wrote 5 images") == 1
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(5)] + ["grid.png", "samples.npz"]
    # Batch size 1 on both sides: the same arithmetic per image, so the comparison can be exact.
    expected = generate(models["gray"], 5, sampler="ddpm", steps=10, seed=5, batch_size=1, progress=False)
    assert torch.equal(read_images(out, range(5)), expected)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], expected.permute(0, 2, 3, 1).numpy())


# ----------------------------------------------------------------------------- model folders


def test_loads_run_directories_and_pipeline_folders(models, tmp_path):
    kw = dict(steps=2, progress=False)
    run = tmp_path / "run"
    shutil.copytree(models["rgb"], run / "model")
    assert torch.equal(generate(run, 2, **kw), generate(models["rgb"], 2, **kw))

    only_checkpoints = tmp_path / "run2"  # no model/ yet: the newest checkpoint's EMA weights
    save_pipeline(small_unet(9), only_checkpoints / "checkpoints" / "step-0000005" / "ema")
    save_pipeline(small_unet(10), only_checkpoints / "checkpoints" / "step-0000010" / "ema")
    (only_checkpoints / "checkpoints" / "step-0000020.tmp").mkdir()  # an unfinished one is not a checkpoint
    newest = generate(only_checkpoints / "checkpoints" / "step-0000010" / "ema", 2, **kw)
    assert torch.equal(generate(only_checkpoints, 2, **kw), newest)
    assert not torch.equal(generate(only_checkpoints / "checkpoints" / "step-0000005" / "ema", 2, **kw), newest)


def test_loads_a_diffusers_unet2dmodel_pipeline(models):
    model, scheduler_config = load_model(models["diffusers"])
    assert isinstance(model, UNet) and not model.training  # converted: same outputs, one code path
    assert scheduler_config["num_train_timesteps"] == 100
    theirs = UNet2DModel.from_pretrained(models["diffusers"] / "unet", use_safetensors=True)
    images = generate(models["diffusers"], 2, steps=3, progress=False)
    assert images.shape == (2, 3, 16, 16)
    direct = generate(theirs, 2, steps=3, progress=False, scheduler_config=scheduler_config)  # usable unconverted too
    assert (images.int() - direct.int()).abs().max() <= 1


def test_class_labels_and_guidance(models, capsys):
    kw = dict(steps=3, progress=False)
    zeros, twos = (generate(models["cond"], 4, class_labels=c, **kw) for c in (0, 2))
    assert not torch.equal(zeros, twos)
    cycled = generate(models["cond"], 4, class_labels=[0, 2], **kw)  # image i gets labels[i % 2]
    assert torch.equal(cycled[0::2], zeros[0::2]) and torch.equal(cycled[1::2], twos[1::2])
    guided = generate(models["cond"], 4, class_labels=0, guidance_scale=3.0, **kw)
    assert guided.shape == zeros.shape and not torch.equal(guided, zeros)
    default = generate(models["cond"], 3, **kw)  # no labels: every class in turn
    assert torch.equal(default[0], zeros[0]) and torch.equal(default[2], twos[2])
    out = models["cond"].parent / "cond-out"
    argv = ["--model", models["cond"], "-n", 4, "--steps", 3, "--class-label", 1, 2, "--guidance-scale", 2, "--out", out]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert pngs(out) == [f"{i:05d}.png" for i in range(4)]


# ----------------------------------------------------------------------------- the Python API


def test_generate_from_python_returns_uint8_nchw(models):
    model, scheduler_config = load_model(models["rgb"])
    model.train()
    images = generate(model, 3, sampler="dpm++", steps=3, batch_size=2, progress=False, scheduler_config=scheduler_config,
                      mixed_precision="bf16")
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16) and images.device.type == "cpu"
    assert model.training  # the caller's mode is restored
    assert [im.mode for im in to_pil(images)] == ["RGB"] * 3
    assert make_grid(images).size == (2 * 18 + 2, 2 * 18 + 2)
    with pytest.raises(ValueError, match="scheduler_config"):
        generate(model, 1, progress=False)


def test_settings_whole_or_as_keywords_give_the_same_images(models):
    settings = SamplingSettings(sampler="ddpm", steps=3, seed=2, batch_size=2)
    whole = generate(models["gray"], 3, settings, progress=False)
    assert torch.equal(whole, generate(models["gray"], 3, sampler="ddpm", steps=3, seed=2, batch_size=2, progress=False))
    assert torch.equal(whole, generate(models["gray"], 3, SamplingSettings(sampler="ddpm"), steps=3, seed=2, progress=False))
    with pytest.raises(TypeError, match="unknown sampling setting"):
        generate(models["gray"], 3, stpes=3)


def test_the_flags_defaults_are_the_settings_defaults():
    """sample.py and evaluate.py take their sampling flags and defaults from SamplingSettings alone."""
    assert SamplingSettings.from_args(cli.build_parser().parse_args(["--model", "m"])) == SamplingSettings()
    from resdiff.cli import evaluate as evaluate_cli

    args = evaluate_cli.build_parser().parse_args(["--model", "m", "--ref", "r"])
    assert SamplingSettings.from_args(args) == SamplingSettings()


def test_a_generator_prepares_the_model_once_and_gives_it_back(models):
    """Eval mode and channels_last once for a whole block of batches (evaluation asks batch by batch); an
    in-memory model gets its mode and standard layout back after the block, a model it loaded stays ready."""
    model, scheduler_config = load_model(models["rgb"])
    model.train()
    conv = next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] == 3)
    settings = SamplingSettings(steps=2, batch_size=2)
    gen = ImageGenerator(model, settings, scheduler_config)
    with gen.ready():
        first = gen.images([0, 1, 2])
        assert not model.training and conv.is_contiguous(memory_format=torch.channels_last)  # not undone in between
        second = gen.images([3])
    assert model.training and conv.is_contiguous()
    expected = generate(model, 4, settings, progress=False, scheduler_config=scheduler_config)
    assert torch.equal(torch.cat([first, second]), expected)
    loaded = ImageGenerator(models["rgb"], settings)
    assert torch.equal(loaded.images([0, 1, 2, 3]), expected) and loaded.steps == 2 and loaded.shape == (3, 16, 16)
    weight = next(p for p in loaded.model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] == 3)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not loaded.model.training


def test_the_script_as_a_process_reports_a_mistake_in_one_line(script_run_with_a_mistake):
    """Exit code 2 and exactly one line on stderr: no traceback, no warnings."""
    proc, missing = script_run_with_a_mistake
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err == f"error: {missing} does not exist; pass a run directory or a pipeline folder (with model_index.json)\n"


def test_a_pipeline_saved_with_the_old_block_key_names_is_refused_by_the_folder_check(tmp_path):
    """Models saved before 2026-11-27, when the blocks' layers were renamed (time_norm.proj -> time_proj,
    time_norm.norm -> norm2), no longer load: the folder check names the file and a tensor it lacks."""
    from safetensors.torch import load_file, save_file

    unet = small_unet(3)
    folder = save_pipeline(unet, tmp_path / "old")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    old = {k.replace(".time_proj.", ".time_norm.proj.").replace(".norm2.", ".time_norm.norm."): v
           for k, v in load_file(weights).items()}
    assert any(".time_norm.proj." in k for k in old)
    save_file(old, weights)
    with pytest.raises(UsageError, match=r"diffusion_pytorch_model.safetensors does not match .*config.json: \d+ tensor\(s\) "
                                         r"missing \(e.g. .*\.(time_proj|norm2)\..*unexpected tensor\(s\) \(e.g. .*time_norm"):
        load_model(folder, device="cpu")
