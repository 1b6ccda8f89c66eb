"""Editing: inpainting (RePaint), image-to-image (SDEdit) and interpolation, from Python and from sample.py.

Tiny random U-Nets (16x16, a 100-step schedule) check what holds for any network: kept pixels, seeds, end frames,
equality with plain sampling, sharding. Where the check is about the model's behaviour (how far img2img moves an
image as the strength grows), the network is the exact denoiser of a Gaussian data distribution, whose samples
are known in closed form, so the check is deterministic and still fails when strength selects the wrong steps.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from resdiff import UNetOutput
from resdiff.data import _load_image
from resdiff.editing import (
    DETERMINISTIC_SAMPLERS, INPAINT_SAMPLERS, INTERPOLATE_SAMPLER, img2img, inpaint, interpolate, prepare_image,
    prepare_mask, slerp,
)
from resdiff.images import read_images
from resdiff.sampling import SamplingSettings, generate

from launch import free_port, launch_env, launcher, run_watched
from tiny_models import FEW, save_pipeline, small_unet
from tiny_runs import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sample.py"

cli = load_script("sample_cli_editing", "sample.py")


def png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return dict(rgb=save_pipeline(small_unet(2), root / "rgb"), gray=save_pipeline(small_unet(1, in_channels=1), root / "gray"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 24x20 RGB photo (prepared to 16x16: resize to cover, centre crop), masks of its size, the same photo with an
    alpha channel, and a mask of another size."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    left = np.zeros((20, 24), np.uint8)
    left[:, :12] = 255  # keep the left half
    rgba = np.concatenate([photo, left[:, :, None]], axis=2)
    return dict(
        photo=png(root / "photo.png", photo), left=png(root / "left.png", left),
        white=png(root / "white.png", np.full((20, 24), 255, np.uint8)), black=png(root / "black.png", np.zeros((20, 24), np.uint8)),
        rgba=png(root / "rgba.png", rgba, "RGBA"), small=png(root / "small.png", np.full((10, 12), 255, np.uint8)),
    )


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- inputs


def test_inputs_are_prepared_like_training_images(pictures, tmp_path):
    """For a square model, exactly ImageFolder's decoding, resize of the shorter side and centre crop; masks too."""
    def training(path, channels):  # ImageFolder: decode and resize the shorter side to 16, then the centre window
        x = _load_image(path, 16, channels)  # (C, 16, 19)
        left = (x.shape[2] - 16) // 2
        return x[:, :, left:left + 16]

    assert torch.equal(prepare_image(pictures["photo"], (3, 16, 16)), training(pictures["photo"], 3))
    assert torch.equal(prepare_image(pictures["photo"], (1, 16, 16)), training(pictures["photo"], 1))
    assert torch.equal(prepare_image(pictures["rgba"], (3, 16, 16)), training(pictures["rgba"], 3))
    keep = prepare_mask(pictures["left"], (3, 16, 16))  # 24x20 -> 19x16 -> columns 1..17 of the resized mask
    assert keep.shape == (1, 16, 16) and keep.dtype == torch.bool
    assert keep[:, :, :6].all() and not keep[:, :, 11:].any()
    tall = prepare_image(pictures["photo"], (3, 8, 16))  # a non-square model: cover 8x16, crop the centre rows
    assert tall.shape == (3, 8, 16)


# ----------------------------------------------------------------------------- inpainting


@pytest.mark.parametrize("sampler", INPAINT_SAMPLERS)
def test_inpainting_keeps_the_known_pixels_and_fills_the_rest_per_seed(models, pictures, sampler):
    kw = dict(sampler=sampler, steps=FEW[sampler], resample=2, progress=False)
    out = inpaint(models["rgb"], pictures["photo"], pictures["left"], 4, seed=0, **kw)
    image, keep = prepare_image(pictures["photo"], (3, 16, 16)), prepare_mask(pictures["left"], (3, 16, 16))
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 16, 16)
    kept, fill = keep.expand(3, -1, -1), ~keep.expand(3, -1, -1)
    assert all(torch.equal(o[kept], image[kept]) for o in out)  # exactly the input there
    other = inpaint(models["rgb"], pictures["photo"], pictures["left"], 4, seed=1, **kw)
    for a, b in zip(out, other):  # another seed, another fill
        assert (a[fill].float() - b[fill].float()).abs().mean() > 5
    assert (out[0][fill].float() - out[1][fill].float()).abs().mean() > 5  # another image index, another fill
    assert (out[0][fill].float() - image[fill].float()).abs().mean() > 5  # the fill is generated, not the input


def test_inpainting_with_an_all_keep_mask_returns_the_input(models, pictures):
    out = inpaint(models["rgb"], pictures["photo"], pictures["white"], 2, sampler="ddpm", steps=5, progress=False)
    assert torch.equal(out, prepare_image(pictures["photo"], (3, 16, 16)).expand(2, -1, -1, -1))


def test_the_alpha_channel_is_a_mask(models, pictures):
    """Opaque keeps, transparent is generated: the same as a white-keeps mask of the alpha values."""
    kw = dict(steps=3, progress=False)
    assert torch.equal(inpaint(models["rgb"], pictures["rgba"], None, 2, **kw),
                       inpaint(models["rgb"], pictures["rgba"], pictures["left"], 2, **kw))


def test_inpainting_is_the_same_whatever_the_batch_size(models, pictures):
    """Every random number of image i (start, known-region and jump-back noise, ddpm's step noise) is its own."""
    kw = dict(sampler="ddpm", steps=5, resample=2, seed=4, progress=False)
    whole = inpaint(models["gray"], pictures["photo"], pictures["left"], 3, batch_size=3, **kw)
    parts = inpaint(models["gray"], pictures["photo"], pictures["left"], 3, batch_size=1, **kw)
    diff = (whole.int() - parts.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2  # a kernel's last float bit may differ with the batch


def test_inpainting_a_non_square_model(pictures, tmp_path):
    """A 16x8 (H x W) model: the 24x20 photo is resized to cover 16x8 and centre-cropped, the mask with it."""
    folder = save_pipeline(small_unet(5, sample_size=(16, 8)), tmp_path / "tall")
    out = inpaint(folder, pictures["photo"], pictures["left"], 2, steps=3, resample=2, progress=False)
    image, keep = prepare_image(pictures["photo"], (3, 16, 8)), prepare_mask(pictures["left"], (3, 16, 8))
    assert out.shape == (2, 3, 16, 8) and keep.any() and not keep.all()
    assert all(torch.equal(o[keep.expand(3, -1, -1)], image[keep.expand(3, -1, -1)]) for o in out)


# ----------------------------------------------------------------------------- image to image


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """The exact epsilon-predictor for data whose pixels are independent N(mean, std^2): E[eps | x_t] =
    sqrt(1 - a)(x_t - sqrt(a) mean) / (a std^2 + 1 - a), a = alpha-bar of t. Its samples are N(mean, std^2)."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, mean: float = 0.5, std: float = 0.1, timesteps: int = 100):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # generate() reads the device and dtype from a parameter
        self.register_buffer("alphas", DDPMScheduler(num_train_timesteps=timesteps).alphas_cumprod, persistent=False)

    def forward(self, sample, timestep, class_labels=None):
        t = torch.as_tensor(timestep, device=sample.device).float().round().long().clamp(0, len(self.alphas) - 1)
        a = self.alphas[t].reshape(-1, 1, 1, 1) if t.ndim else self.alphas[t]
        m, s = self.config.mean, self.config.std
        return UNetOutput(sample=(1 - a).sqrt() * (sample - a.sqrt() * m) / (a * s * s + 1 - a))


@pytest.mark.parametrize("sampler", list(FEW))
def test_img2img_moves_further_from_the_input_as_the_strength_grows(sampler):
    """The input (-0.5 everywhere) is far from the data (0.5 +- 0.1): the more steps re-run, the more of that
    distance the output covers. Strictly increasing over the strengths, for every sampler."""
    config = dict(DDPMScheduler(num_train_timesteps=100).config)
    image = torch.full((1, 8, 8), 64, dtype=torch.uint8)  # -0.5 in the model's range
    kw = dict(sampler=sampler, steps=10, seed=0, progress=False, scheduler_config=config)
    distances = []
    for strength in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out = img2img(GaussianDenoiser(), image, 8, strength=strength, **kw)
        distances.append((out.float() - image.float()).abs().mean().item())
    assert distances[0] == 0
    assert all(b > a for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] > 100  # strength 1 lands on the data: about 191 levels from the input


def test_img2img_strength_0_returns_the_input_and_1_is_plain_sampling(models, pictures):
    kw = dict(steps=4, seed=3, progress=False)
    assert torch.equal(img2img(models["rgb"], pictures["photo"], 2, strength=0.0, **kw),
                       prepare_image(pictures["photo"], (3, 16, 16)).expand(2, -1, -1, -1))
    for sampler in ("ddpm", "heun"):
        kw = dict(sampler=sampler, steps=FEW[sampler], seed=3, progress=False, batch_size=3)
        assert torch.equal(img2img(models["rgb"], pictures["photo"], 3, strength=1.0, **kw), generate(models["rgb"], 3, **kw))


def test_img2img_strength_1_from_sample_py_equals_plain_sample_py(models, pictures, tmp_path, capsys):
    common = ["--model", models["gray"], "--sampler", "ddpm", "--steps", 6, "--seed", 9, "-n", 3]
    assert run_cli(common + ["--out", tmp_path / "plain"], capsys)[0] == 0
    code, stdout, err = run_cli(common + ["--init", pictures["photo"], "--strength", 1, "--out", tmp_path / "edit"], capsys)
    assert code == 0, err
    assert torch.equal(read_images(tmp_path / "edit", range(3)), read_images(tmp_path / "plain", range(3)))
    assert sorted(p.name for p in (tmp_path / "edit").iterdir()) == [
        "00000.png", "00001.png", "00002.png", "grid.png", "input.png", "strip.png"]


# ----------------------------------------------------------------------------- interpolation


def test_slerp_keeps_the_ends_exactly_and_the_norm_between():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() - (a.norm() + b.norm()) / 2) < 0.02 * a.norm()  # a straight line would shrink by ~1/sqrt(2)
    assert torch.allclose(slerp(a, a, 0.3), a)


@pytest.mark.parametrize("sampler", DETERMINISTIC_SAMPLERS)
def test_interpolation_ends_are_the_two_seeds_plain_samples(models, sampler):
    kw = dict(sampler=sampler, steps=FEW[sampler], batch_size=1, progress=False)  # batch 1 both sides: exact
    frames = interpolate(models["rgb"], 3, 7, 5, **kw)
    assert frames.shape == (5, 3, 16, 16)
    assert torch.equal(frames[0], generate(models["rgb"], 1, seed=3, **kw)[0])
    assert torch.equal(frames[-1], generate(models["rgb"], 1, seed=7, **kw)[0])
    assert len({bytes(f.numpy()) for f in frames}) == 5


def test_interpolation_from_sample_py_writes_frames_a_strip_and_a_gif(models, tmp_path, capsys):
    out = tmp_path / "walk"
    code, stdout, err = run_cli(["--model", models["gray"], "--interpolate", 3, 7, "--frames", 4, "--steps", 3, "--gif",
                                 "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(4)] + ["frames.gif", "grid.png", "strip.png"]
    with Image.open(out / "strip.png") as im:
        assert im.size == (4 * 18 + 2, 20)  # one row of the four frames
    with Image.open(out / "frames.gif") as im:
        assert im.n_frames == 6  # there and back: 0 1 2 3 2 1
    assert f"wrote 4 images to {out}" in stdout
    assert "sampler: ddim" in stdout  # without --sampler: interpolation's deterministic default, not ddpm's


def test_interpolation_defaults_to_ddim_where_everything_else_defaults_to_ddpm(models):
    """The default sampler (ddpm) draws fresh noise at every step, so interpolation picks its own: ddim."""
    assert (INTERPOLATE_SAMPLER, SamplingSettings().sampler) == ("ddim", "ddpm")
    kw = dict(steps=3, batch_size=1, progress=False)
    frames = interpolate(models["rgb"], 3, 7, 3, **kw)  # no sampler given
    assert torch.equal(frames[0], generate(models["rgb"], 1, seed=3, sampler="ddim", **kw)[0])
    assert not torch.equal(frames[0], generate(models["rgb"], 1, seed=3, **kw)[0])  # plain sampling: ddpm


def test_inpainting_from_sample_py_writes_what_the_model_saw(models, pictures, tmp_path, capsys):
    out = tmp_path / "filled"
    code, stdout, err = run_cli(["--model", models["rgb"], "--inpaint", pictures["photo"], "--mask", pictures["left"],
                                 "-n", 3, "--steps", 3, "--resample", 2, "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(3)] + [
        "grid.png", "input.png", "mask.png", "strip.png"]
    assert torch.equal(read_images(out, range(3)),
                       inpaint(models["rgb"], pictures["photo"], pictures["left"], 3, steps=3, resample=2, progress=False))
    with Image.open(out / "mask.png") as im:
        assert np.array_equal(np.array(im) == 255, prepare_mask(pictures["left"], (3, 16, 16))[0].numpy())
    with Image.open(out / "input.png") as im:
        assert np.array_equal(np.array(im), prepare_image(pictures["photo"], (3, 16, 16)).permute(1, 2, 0).numpy())
    default = models["rgb"].parent / "inpaint-ddpm-50-seed0"  # without --out: a new folder beside the model
    assert run_cli(["--model", models["rgb"], "--inpaint", pictures["rgba"], "-n", 1, "--steps", 2], capsys)[0] == 0
    assert (models["rgb"].parent / "inpaint-ddpm-2-seed0" / "00000.png").is_file() and not default.exists()


# ----------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--inpaint", "{photo}", "--mask", "{small}"], "the mask is 12x10 pixels but the image is 24x20"),
        (["--inpaint", "{photo}", "--mask", "{black}"], "the mask keeps no pixel (white = keep, black = generate)"),
        (["--inpaint", "{photo}"], "inpainting needs a mask: pass --mask"),
        (["--inpaint", "{photo}", "--mask", "{left}", "--sampler", "euler"], "inpainting works with the samplers ddpm and ddim, not euler"),
        (["--inpaint", "{photo}", "--mask", "{left}", "--resample", "0"], "resample count (--resample) must be a positive integer"),
        (["--inpaint", "{tmp}/nowhere.png", "--mask", "{left}"], "does not exist"),
        (["--inpaint", "{photo}", "--mask", "{model}/model_index.json"], "cannot read the mask"),
        (["--init", "{photo}", "--strength", "1.5"], "strength (--strength) must be between 0 and 1, got 1.5"),
        (["--init", "{photo}", "--strength", "-0.1"], "strength (--strength) must be between 0 and 1, got -0.1"),
        (["--init", "{photo}", "--strength", "nan"], "strength (--strength) must be between 0 and 1, got nan"),
        (["--interpolate", "1", "2", "--sampler", "ddpm"], "interpolation needs a deterministic sampler"),
        (["--interpolate", "1", "2", "--eta", "1"], "interpolation needs a deterministic sampler"),
        (["--interpolate", "1", "2", "--frames", "1"], "frames (--frames) must be an integer of at least 2"),
        (["--interpolate", "1", "2", "-n", "4"], "--interpolate makes --frames images; drop --num-images"),
        (["--init", "{photo}", "--inpaint", "{photo}"], "not allowed with argument"),
        (["--mask", "{left}"], "--mask goes with --inpaint"),
        (["--init", "{photo}", "--frames", "3"], "--frames goes with --interpolate"),
        (["--inpaint", "{photo}", "--mask", "{left}", "--strength", "0.5"], "--strength goes with --init"),
        (["--init", "{photo}", "--npz"], "--npz, --no-grid and --compile are for plain sampling"),
    ],
)
def test_mistakes_are_one_line_errors_with_exit_code_2(models, pictures, tmp_path, capsys, argv, message):
    argv = ["--model", models["rgb"], "--out", tmp_path / "out"] + [
        a.format(tmp=tmp_path, model=models["rgb"], **pictures) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()  # nothing written


def test_mistakes_from_python_are_usage_errors(models, pictures):
    from resdiff.errors import UsageError

    with pytest.raises(UsageError, match="between 0 and 1"):
        img2img(models["rgb"], pictures["photo"], 1, strength=2)
    with pytest.raises(UsageError, match="uint8"):
        img2img(models["rgb"], torch.zeros(3, 8, 8), 1)
    with pytest.raises(UsageError, match="keeps no pixel"):
        inpaint(models["rgb"], pictures["photo"], torch.zeros(20, 24, dtype=torch.uint8), 1, progress=False)


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_processes_inpaint_the_same_images_as_one(models, pictures, tmp_path):
    out = tmp_path / "out"
    proc = run_watched(
        [launcher("torchrun"), "--nproc_per_node", "2", "sample.py", "--model", str(models["gray"]),
         "--inpaint", str(pictures["photo"]), "--mask", str(pictures["left"]), "-n", "5", "--sampler", "ddpm",
         "--steps", "6", "--resample", "2", "--seed", "5", "--batch-size", "1", "--out", str(out)],
        timeout=120, env=launch_env(free_port()),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("processes: 2") == 1 and proc.stdout.count("wrote 5 images") == 1
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(5)] + [
        "grid.png", "input.png", "mask.png", "strip.png"]
    # Batch size 1 on both sides: the same arithmetic per image, so the comparison can be exact.
    expected = inpaint(models["gray"], pictures["photo"], pictures["left"], 5, sampler="ddpm", steps=6, resample=2,
                       seed=5, batch_size=1, progress=False)
    assert torch.equal(read_images(out, range(5)), expected)


