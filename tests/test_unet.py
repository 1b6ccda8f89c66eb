"""The resdiff U-Net: shapes, presets, saving, diffusers pipelines, errors, gradients."""

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from resdiff import UNet
from resdiff.nn import RES_BLOCKS, Attention, BottleneckResBlock, Downsample, ResBlock, Upsample
from resdiff.unet import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny(**kw) -> UNet:
    return UNet.from_preset("tiny", **{"sample_size": 16, **kw})


@pytest.mark.parametrize(
    "kw, shape",
    [
        (dict(), (2, 3, 16, 16)),
        (dict(in_channels=1), (2, 1, 16, 16)),
        (dict(out_channels=6), (2, 6, 16, 16)),  # learned variance: 2x the input channels
        (dict(time_injection="additive", resblock_updown=True, head_channels=16), (2, 3, 16, 16)),
        (dict(channel_mult=(1, 2, 2, 4), attention_resolutions=(4, 2)), (2, 3, 16, 16)),
        (dict(num_classes=10), (2, 3, 16, 16)),
    ],
)
def test_output_shape(kw, shape):
    model = tiny(**kw)
    x = torch.randn(2, kw.get("in_channels", 3), 16, 16)
    assert model(x, torch.tensor([3, 700])).sample.shape == shape


def test_non_square_input_that_divides_works():
    assert tiny()(torch.randn(1, 3, 16, 24), 5).sample.shape == (1, 3, 16, 24)


def test_preset_parameter_counts_match_the_ddpm_paper():
    assert n_params(UNet.from_preset("ddpm-cifar10")) == 35_746_307
    assert n_params(UNet.from_preset("ddpm-celebahq-256")) == 113_673_219


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fresh_weights_follow_ddpms_initialisation(preset):
    """Glorot-uniform convs and linears with zero biases; the last layer of every residual branch and the output
    conv at zero (DDPM's reference initialisation). The Kaiming-normal (ReLU gain) weights used before were
    sqrt(2) to 2x larger and learned slower at the DDPM recipe (bench/learning.py): this fails if they return."""
    torch.manual_seed(0)
    model = UNet.from_preset(preset)
    zeroed = {id(getattr(m, m.branch_end)) for m in model.modules() if isinstance(m, RES_BLOCKS)}
    zeroed |= {id(m.proj) for m in model.modules() if isinstance(m, Attention)} | {id(model.out[-1])}
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(zeroed) > 2 and zeroed < {id(m) for m in layers}
    for m in layers:
        assert not m.bias.any()
        if id(m) in zeroed:
            assert not m.weight.any()
            continue
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(m.weight)
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert m.weight.abs().max() <= bound
        if m.weight.numel() >= 4096:  # enough values for the spread to be the distribution's
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_a_fresh_unet_predicts_zero_and_keeps_unit_scale_inside():
    """Zeroed branch ends: the output starts at exactly 0, and every block passes its input on unchanged, so
    activations keep the input's scale through the whole depth."""
    model = tiny().eval()
    x = torch.randn(4, 3, 16, 16)
    assert not model(x, torch.tensor([1, 100, 500, 999])).sample.any()
    scales = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: scales.append(out.std().item()))
             for m in model.modules() if isinstance(m, RES_BLOCKS)]
    model(x, 10)
    for h in hooks:
        h.remove()
    first = model.conv_in(x).std().item()
    assert scales and all(0.5 * first < s < 2 * first for s in scales)


def test_preset_overrides_and_unknown_preset():
    assert UNet.from_preset("ddpm-cifar10", dropout=0.0).config.dropout == 0.0
    with pytest.raises(ValueError, match="unknown UNet preset 'nope'"):
        UNet.from_preset("nope")


@pytest.mark.parametrize("t", [7, 7.5, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7]), torch.tensor([7.0, 7.0])])
def test_timestep_forms_agree(t):
    model = tiny(zero_init_last=False).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x, torch.tensor([7, 7])).sample
    out = model(x, t).sample
    if isinstance(t, float):
        assert not torch.allclose(out, ref)  # a fractional timestep is a different timestep
    else:
        torch.testing.assert_close(out, ref)


def test_timestep_of_wrong_length_is_rejected():
    with pytest.raises(ValueError, match=r"one value per sample \(2\)"):
        tiny()(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))


def test_return_tuple():
    out = tiny()(torch.randn(1, 3, 16, 16), 1, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 3, 16, 16)


def test_class_conditioning_changes_output_and_defaults_to_null_class():
    model = tiny(num_classes=3, zero_init_last=False).eval()
    x = torch.randn(2, 3, 16, 16)
    a = model(x, 10, class_labels=torch.tensor([0, 0])).sample
    b = model(x, 10, class_labels=torch.tensor([1, 1])).sample
    null = model(x, 10, class_labels=torch.tensor([3, 3])).sample
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, 10).sample, null)
    with pytest.raises(ValueError, match="no num_classes"):
        tiny()(x, 10, class_labels=torch.tensor([0, 0]))


def test_save_and_load_roundtrip_gives_identical_outputs(tmp_path):
    model = tiny(num_classes=4, zero_init_last=False).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet"
    loaded = UNet.from_pretrained(tmp_path).eval()
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    assert torch.equal(model(x, 99, labels).sample, loaded(x, 99, labels).sample)
    assert loaded.config.channel_mult == model.config.channel_mult or list(loaded.config.channel_mult) == list(model.config.channel_mult)


@pytest.mark.parametrize("Pipeline, Scheduler", [(DDPMPipeline, DDPMScheduler), (DDIMPipeline, DDIMScheduler)])
def test_runs_inside_diffusers_pipelines(Pipeline, Scheduler):
    pipe = Pipeline(unet=tiny(in_channels=1).eval(), scheduler=Scheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 1)
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_pipeline_save_and_from_pretrained_roundtrip(tmp_path):
    pipe = DDPMPipeline(unet=tiny(zero_init_last=False).eval(), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"][1] == "UNet"
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, UNet)
    run = lambda p: p(batch_size=1, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(run(pipe), run(loaded), atol=1e-5)


def test_import_resdiff_is_enough_for_from_pretrained_in_a_fresh_process(tmp_path):
    """model_index.json names ["resdiff.unet", "UNet"], and diffusers takes that module only from sys.modules: a
    new process that runs `import resdiff` (as the README says) loads the pipeline, though the package imports the
    U-Net's code (torch, diffusers) only when it is first used."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    DDPMPipeline(unet=tiny().eval(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == ["resdiff.unet", "UNet"]
    code = (
        "import sys, resdiff\n"
        "assert 'diffusers' not in sys.modules and 'torch' not in sys.modules\n"
        "from diffusers import DDPMPipeline\n"
        f"pipe = DDPMPipeline.from_pretrained({str(tmp_path)!r})\n"
        "assert type(pipe.unet) is resdiff.UNet, type(pipe.unet)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_indivisible_input_size_names_the_numbers():
    with pytest.raises(ValueError, match=r"input size 18x16 is not divisible by 4"):
        tiny()(torch.randn(1, 3, 18, 16), 1)


def test_indivisible_sample_size_at_construction():
    with pytest.raises(ValueError, match=r"sample_size 30 is not divisible by 2\*\*3 = 8"):
        UNet(sample_size=30, channels=32, channel_mult=(1, 1, 1, 1), attention_resolutions=())


def test_indivisible_norm_groups_names_the_numbers():
    with pytest.raises(ValueError, match=r"48 channels cannot be split into 32 groups"):
        UNet(sample_size=16, channels=48, channel_mult=(1, 2), attention_resolutions=())


def test_attention_resolution_that_does_not_exist():
    with pytest.raises(ValueError, match=r"attention_resolutions \[5\] are not resolutions of this U-Net; it has \[16, 8\]"):
        UNet(sample_size=16, channels=32, channel_mult=(1, 2), attention_resolutions=(5,))


def test_every_parameter_receives_a_gradient():
    model = tiny(num_classes=3, resblock_updown=True, zero_init_last=False, dropout=0.1).train()
    x = torch.randn(2, 3, 16, 16)
    model(x, torch.tensor([1, 2]), torch.tensor([0, 3])).sample.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_zero_init_last_makes_every_resblock_its_skip_path(block):
    model = tiny(zero_init_last=True, dropout=0.0, block=block).eval()
    blocks = [m for m in model.modules() if isinstance(m, RES_BLOCKS)]
    assert blocks and all(type(m) is (ResBlock if block == "basic" else BottleneckResBlock) for m in blocks)
    for block in blocks:
        cin = block.norm1.num_channels
        x, emb = torch.randn(2, cin, 8, 8), torch.randn(2, 4 * model.config.channels)
        torch.testing.assert_close(block(x, emb), block.skip(block.resample(x)))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(zero_init_last=False)
    x = torch.randn(2, 3, 16, 16)
    model(x, 5).sample.sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, 5).sample.sum().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_unet_imports_without_training_code():
    import subprocess
    import sys

    code = "import sys, resdiff; m = resdiff.UNet; bad = [k for k in sys.modules if k.startswith(('resdiff.trainer', 'resdiff.data', 'resdiff.config', 'resdiff.sampling'))]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _smallest(**kw) -> UNet:
    return UNet(sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                norm_groups=8, zero_init_last=False, **kw)


def test_channels_last_and_bf16_match_the_plain_path():
    model = _smallest().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 600])
    with torch.no_grad():
        ref = model(x, t).sample
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, t).sample.float()
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    assert (bf16 - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 keeps ~3 significant digits
    assert not torch.equal(bf16, ref)  # autocast really ran in bf16


@pytest.mark.slow
def test_compile_blocks_compiles_every_block_past_dynamos_default_recompile_limit():
    """Each block shape and mode is a graph of the blocks' one forward; at dynamo's default limit of 8 the rest of a
    U-Net's blocks would silently run eager. Dynamo alone (backend="eager") shows which frames it gave up on."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = UNet(sample_size=16, channels=8, channel_mult=(1, 2, 3), num_res_blocks=1, attention_resolutions=(4,),
                 norm_groups=4, dropout=0.1).compile_blocks(backend="eager")  # 15 blocks: 22 graphs
    assert torch._dynamo.config.recompile_limit >= 2 * sum(isinstance(m, (*RES_BLOCKS, Attention)) for m in model.modules())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 600])
    model(x, t).sample.sum().backward()
    with torch.no_grad():
        model.eval()(x, t)
    gave_up = [k.splitlines()[0] for k in counters["unimplemented"] if "recompile" in k.lower()]
    assert not gave_up, gave_up
    assert counters["stats"]["unique_graphs"] > 8  # the model really needs more graphs than the default limit


@pytest.mark.slow
def test_compiled_blocks_match_and_still_learn():
    from resdiff.diffusion import GaussianDiffusion

    def one_level() -> UNet:  # few blocks to compile: the test is about equality, not size
        return UNet(sample_size=16, channels=16, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                    norm_groups=8, zero_init_last=False)

    model, plain = one_level(), one_level()
    plain.load_state_dict(model.state_dict())
    model.compile_blocks()
    assert list(model.state_dict()) == list(plain.state_dict())  # regional compile keeps the keys
    # the batch the training below uses: a second batch size would compile every block again (dynamic shapes)
    x, t = torch.randn(8, 3, 16, 16), torch.tensor([10, 600] * 4)
    torch.testing.assert_close(model(x, t).sample, plain(x, t).sample, rtol=1e-4, atol=1e-5)

    diffusion = GaussianDiffusion.from_config(num_train_timesteps=100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(8, 3, 16, 16)  # one smooth image, learnable
    losses = []
    for _ in range(25):
        loss = diffusion.loss(model, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


# --- names kept for saved configs and weights -----------------------------------------------------


def test_names_from_before_2026_11_27_are_refused():
    """block="resnet" (now "basic") and the layers' old names (time_norm.*, now time_proj / norm2) no longer load."""
    with pytest.raises(ValueError, match=r"unknown block 'resnet'; choose one of \['basic', 'bottleneck'\]"):
        tiny(block="resnet")
    assert UNet().config.block == "basic"
    model = tiny(zero_init_last=False)
    old = {k.replace(".time_proj.", ".time_norm.proj."): v for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*time_proj.*Unexpected key\(s\).*time_norm\.proj"):
        tiny(zero_init_last=False).load_state_dict(old)


# --- ResBlock resampling chosen per resampler -----------------------------------------------------


def resamplers(model: UNet) -> list[str]:
    """Each resampler of the U-Net in the order forward applies them, as "resblock" or "conv"."""
    kinds = []
    for level in [*model.down, *model.up]:
        if level.resample is not None:
            assert isinstance(level.resample, (ResBlock, Downsample, Upsample))
            kinds.append("resblock" if isinstance(level.resample, ResBlock) else "conv")
    return kinds


def test_resblock_updown_per_resampler():
    assert resamplers(tiny(resblock_updown=False)) == ["conv"] * 4
    assert resamplers(tiny(resblock_updown=True)) == ["resblock"] * 4
    mixed = tiny(resblock_updown=[True, False, False, True])  # down 16->8, down 8->4, up 4->8, up 8->16
    assert resamplers(mixed) == ["resblock", "conv", "conv", "resblock"]
    assert mixed.down[0].resample.resample.mode == "down" and mixed.up[1].resample.resample.mode == "up"
    x = torch.randn(2, 3, 16, 16)
    assert mixed(x, 3).sample.shape == x.shape


def test_resblock_updown_sequence_equal_to_the_bool_builds_the_same_model():
    torch.manual_seed(0)
    a = tiny(resblock_updown=True, zero_init_last=False)
    torch.manual_seed(0)
    b = tiny(resblock_updown=(True,) * 4, zero_init_last=False)
    assert a.state_dict().keys() == b.state_dict().keys() and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_resblock_updown_of_the_wrong_length_names_the_numbers():
    with pytest.raises(ValueError, match=r"resblock_updown must be a bool or 4 bools, one per resampler \(2 down, then 2 up\), got \[True, False\]"):
        tiny(resblock_updown=[True, False])
    with pytest.raises(ValueError, match="resblock_updown must be a bool or 4 bools"):
        tiny(resblock_updown=[1, 0, 0, 1])


def test_per_resampler_resblock_updown_saves_and_loads(tmp_path):
    model = tiny(resblock_updown=(False, True, True, False), zero_init_last=False).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["resblock_updown"] == [False, True, True, False]
    loaded = UNet.from_pretrained(tmp_path).eval()
    assert resamplers(loaded) == ["conv", "resblock", "resblock", "conv"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x, 9).sample, model(x, 9).sample, rtol=1e-5, atol=1e-5)  # see above


# ----------------------------------------------------------------------------- non-square models


def test_non_square_sample_size_and_attention_at_the_shorter_side():
    """sample_size (H, W): each level halves both sides; an attention resolution names a level by its shorter side."""
    model = UNet.from_preset("tiny", sample_size=(16, 32), attention_resolutions=(8,))
    assert model(torch.randn(2, 3, 16, 32), 5).sample.shape == (2, 3, 16, 32)
    with_attention = [i for i, level in enumerate(model.down) if any(isinstance(a, Attention) for a in level.attentions)]
    assert with_attention == [1]  # the 8x16 level
    portrait = UNet.from_preset("tiny", sample_size=(32, 16), attention_resolutions=(8,))
    assert [p.shape for p in portrait.parameters()] == [p.shape for p in model.parameters()]
    # A square model is unchanged: 16 and (16, 16) build the same layers.
    assert [p.shape for p in tiny().parameters()] == [p.shape for p in tiny(sample_size=(16, 16)).parameters()]


def test_non_square_sample_size_checks_each_side():
    with pytest.raises(ValueError, match=r"sample_size 16x30 is not divisible by 2\*\*2 = 4"):
        tiny(sample_size=(16, 30))
    with pytest.raises(ValueError, match=r"attention_resolutions \[32\] .* it has \[16, 8, 4\] \(the shorter side of its levels 16x32, 8x16, 4x8\)"):
        tiny(sample_size=(16, 32), attention_resolutions=(32,))  # the width: not a level's shorter side
    with pytest.raises(ValueError, match="sample_size must be a positive integer or a"):
        tiny(sample_size=(16, 32, 8))


def test_non_square_save_and_load_roundtrip(tmp_path):
    model = tiny(sample_size=(16, 32), zero_init_last=False).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sample_size"] == [16, 32]
    loaded = UNet.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 16, 32)
    assert torch.equal(model(x, 99).sample, loaded(x, 99).sample)


@pytest.mark.parametrize("size", [(16, 32), (24, 8)])
def test_generate_on_a_non_square_model_gives_its_shape(size, tmp_path):
    from resdiff.sampling import generate

    model = tiny(sample_size=size).eval()
    images = generate(model, 3, sampler="ddim", steps=2, seed=0, progress=False, scheduler_config=dict(DDPMScheduler().config))
    assert images.shape == (3, 3, *size) and images.dtype == torch.uint8


def test_grid_columns_follow_the_aspect_ratio():
    from resdiff.images import grid_columns, make_grid

    assert grid_columns(16, 32, 32) == 4 and grid_columns(10, 8, 8) == 4  # squares: ceil(sqrt(N)), as before
    assert grid_columns(16, 32, 128) == 2 and grid_columns(16, 128, 32) == 8  # wide: fewer columns; tall: more
    assert grid_columns(3, 8, 800) == 1 and grid_columns(3, 800, 8) == 3
    grid = make_grid(torch.zeros(16, 3, 32, 128, dtype=torch.uint8))  # 2 columns x 8 rows of 32x128
    assert grid.size == (2 + 2 * 130, 2 + 8 * 34)
    assert 0.5 < grid.size[0] / grid.size[1] < 2


@pytest.mark.parametrize("size, levels, attention", [
    (32, 3, (8,)), (64, 4, (16, 8)), (128, 5, (16, 8)), (28, 2, (14,)), ((64, 128), 4, (16, 8)), (16, 2, (8,)),
])
def test_auto_preset_lays_the_tiny_blocks_out_for_the_image_size(size, levels, attention):
    """preset "auto" (train.py's default) halves down to about 8 pixels, exactly, with attention at the lowest
    level and from 64 pixels up at 16 too; at 32x32 it is the tiny preset itself."""
    unet = UNet.from_preset("auto", sample_size=size)
    assert len(unet.config.channel_mult) == levels and tuple(unet.config.attention_resolutions) == attention
    hgt, wid = (size, size) if isinstance(size, int) else size
    assert unet(torch.randn(1, 3, hgt, wid), torch.tensor([10])).sample.shape == (1, 3, hgt, wid)
    if size == 32:
        tiny = UNet.from_preset("tiny")
        assert dict(unet.config) == dict(tiny.config)


def test_train_py_defaults_build_a_model_for_any_image_size():
    """The defaults name no size-bound model: data.image_size=64 alone gives a 64x64 U-Net (the tiny preset
    there would have no 8x8 level for its attention)."""
    from resdiff.build import build_unet, model_keys
    from resdiff.config import load_config

    cfg = load_config(None, ["data.image_size=64"], model_keys=model_keys())
    assert cfg.model["preset"] == "auto"
    unet = build_unet(cfg, None)
    assert unet.config.sample_size == 64 and tuple(unet.config.attention_resolutions) == (16, 8)
    with pytest.raises(ValueError, match="not resolutions"):
        UNet.from_preset("tiny", sample_size=64)
    fewer = UNet.from_preset("auto", channel_mult=(1, 2))  # the user's levels: the attention follows them
    assert tuple(fewer.config.attention_resolutions) == (16,)
