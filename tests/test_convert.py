"""diffusers UNet2DModel <-> resdiff UNet: outputs must agree to 1e-4 in float32."""

import pytest
import torch
from diffusers import UNet2DModel

from resdiff import UNet
from resdiff.convert import from_diffusers, to_diffusers

# google/ddpm-cifar10-32's architecture (its config.json), built locally: no download.
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, dropout=0.1,
)
# scale_shift + flip_sin_to_cos + multi-head attention + ResBlock up/down sampling, learned variance.
SCALE_SHIFT = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet", upsample_type="resnet", attention_head_dim=8, resnet_time_scale_shift="scale_shift",
    flip_sin_to_cos=True, freq_shift=0, norm_num_groups=8,
)
# One channel, class-conditional.
GRAY = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16, num_class_embeds=5,
)

# Resampling kinds mixed across levels, each with the resdiff resblock_updown it converts to: one bool per
# resampler, the downsamplers from the top level down, then the upsamplers from the bottom level up.
TINY = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
MIXED = {
    # A ResnetDownsampleBlock2D next to an AttnDownBlock2D that resamples with a strided conv.
    "resnet-beside-attn-conv": (dict(
        TINY, down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"), downsample_type="conv",
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"), upsample_type="conv",
    ), (True, False, False, False)),
    # AttnDownBlock2D / AttnUpBlock2D resampling with ResBlocks next to plain conv levels, scale_shift, two heads.
    "attn-resnet-beside-conv": (dict(
        TINY, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"), downsample_type="resnet",
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), upsample_type="resnet",
        resnet_time_scale_shift="scale_shift", attention_head_dim=16, flip_sin_to_cos=True, freq_shift=0,
    ), (False, True, False, True)),
    # Down and up differ: strided-conv downsampling, ResBlock upsampling (attention at both ends of the decoder).
    "conv-down-resnet-up": (dict(
        TINY, down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"), downsample_type="conv",
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D"), upsample_type="resnet",
        downsample_padding=0,
    ), (False, False, True, True)),
    # Every kind in one model: ResnetDownsampleBlock2D, DownBlock2D, AttnDownBlock2D(resnet); four levels.
    "four-levels": (dict(
        TINY, block_out_channels=(16, 16, 32, 32), down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        downsample_type="resnet", up_block_types=("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "UpBlock2D"),
        upsample_type="conv", layers_per_block=2,
    ), (True, False, True, False, False, True)),
}


def randomized(config: dict) -> UNet2DModel:
    """A diffusers model with every weight random (zero-initialised layers would hide wiring mistakes)."""
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def outputs(model, config):
    n = 3
    x = torch.randn(n, config["in_channels"], config["sample_size"], config["sample_size"], generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 421, 999])
    labels = {"class_labels": torch.tensor([0, 2, 4])} if config.get("num_class_embeds") else {}
    with torch.no_grad():
        return model(x, t, **labels).sample


@pytest.mark.parametrize("config", [DDPM_CIFAR10, SCALE_SHIFT, GRAY], ids=["ddpm-cifar10", "scale-shift-multihead-resnet-updown", "one-channel"])
def test_from_diffusers_and_back_match(config):
    theirs = randomized(config)
    ours = from_diffusers(theirs)
    ref = outputs(theirs, config)
    assert ref.abs().mean() > 1e-3  # a real signal, not zeros
    assert (outputs(ours, config) - ref).abs().max() <= 1e-4
    back = to_diffusers(ours)
    assert (outputs(back, config) - ref).abs().max() <= 1e-4
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("name", sorted(MIXED))
def test_mixed_resampling_kinds_convert_both_ways(name):
    config, resblock_updown = MIXED[name]
    theirs = randomized(config)
    ours = from_diffusers(theirs)
    assert tuple(ours.config.resblock_updown) == resblock_updown
    ref = outputs(theirs, config)
    assert ref.abs().mean() > 1e-3
    # Float rounding only (resdiff fuses q, k and v into one matmul): about 1e-7 of the outputs' size.
    assert (outputs(ours, config) - ref).abs().max() <= 1e-6
    back = to_diffusers(ours)
    assert back.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in back.state_dict().items())
    assert torch.equal(outputs(back, config), ref)  # the same diffusers computation: bit for bit
    assert tuple(from_diffusers(back).config.resblock_updown) == resblock_updown


def test_resdiff_per_resampler_resblock_updown_to_diffusers_and_back():
    """From the resdiff side: a model with resamplers of both kinds converts to diffusers and back, same outputs."""
    ours = UNet(sample_size=16, channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                norm_groups=8, resblock_updown=(True, False, True, False), zero_init_last=False).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    theirs = to_diffusers(ours).eval()
    config = dict(in_channels=3, sample_size=16)
    ref = outputs(ours, config)
    assert ref.abs().mean() > 1e-3
    assert (outputs(theirs, config) - ref).abs().max() <= 1e-6  # float rounding only, as above
    assert theirs.config.down_block_types == ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D")
    assert theirs.config.up_block_types == ("ResnetUpsampleBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert theirs.config.downsample_type == "conv" and theirs.config.upsample_type == "conv"
    again = from_diffusers(theirs).eval()
    assert tuple(again.config.resblock_updown) == (True, False, True, False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
    assert torch.equal(outputs(again, config), ref)  # the same resdiff computation: bit for bit


def test_ddpm_cifar10_conversion_equals_the_preset_layout():
    ours = from_diffusers(UNet2DModel(**DDPM_CIFAR10))
    preset = UNet.from_preset("ddpm-cifar10")
    assert [p.shape for p in ours.parameters()] == [p.shape for p in preset.parameters()]
    assert ours.config.attention_resolutions in ((16,), [16])
    assert ours.config.downsample_padding == 0 and ours.config.freq_shift == 1 and not ours.config.flip_sin_to_cos


def test_resdiff_preset_to_diffusers_matches():
    ours = UNet.from_preset("tiny", sample_size=16, zero_init_last=False).eval()
    theirs = to_diffusers(ours).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (ours(x, torch.tensor([3, 900])).sample - theirs(x, torch.tensor([3, 900])).sample).abs().max() <= 1e-4


def test_unsupported_architectures_are_refused_clearly():
    with pytest.raises(ValueError, match="cannot convert: time_embedding_type='fourier'"):
        from_diffusers(UNet2DModel(sample_size=16, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, time_embedding_type="fourier"))
    with pytest.raises(ValueError, match="diffusers has no bottleneck"):
        to_diffusers(UNet.from_preset("tiny", block="bottleneck"))
    # diffusers gives all AttnDownBlock2D one downsample_type: attention levels resampling both ways cannot be written.
    two_attn = UNet(sample_size=16, channels=16, channel_mult=(1, 1, 1), num_res_blocks=1, attention_resolutions=(16, 8),
                    norm_groups=8, resblock_updown=(True, False, False, False))
    with pytest.raises(ValueError, match="cannot convert: AttnDownBlock2D levels that resample with both kinds"):
        to_diffusers(two_attn)


# ----------------------------------------------------------------------------- non-square models

# diffusers takes sample_size as (height, width); attention at the 8x16 level, which resdiff names by its shorter side.
WIDE = dict(
    sample_size=(16, 32), in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8,
)


@pytest.mark.parametrize("size", [(16, 32), (32, 16)], ids=["landscape", "portrait"])
def test_non_square_models_convert_both_ways_exactly(size):
    config = dict(WIDE, sample_size=size)
    theirs = randomized(config)
    ours = from_diffusers(theirs)
    assert tuple(ours.config.sample_size) == size and tuple(ours.config.attention_resolutions) == (8,)
    hgt, wid = size
    x = torch.randn(3, 3, hgt, wid, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 421, 999])
    with torch.no_grad():
        ref, got = theirs(x, t).sample, ours.eval()(x, t).sample
    assert ref.shape == (3, 3, hgt, wid) and ref.abs().mean() > 1e-3
    assert (got - ref).abs().max() <= 1e-6  # float rounding only (the fused qkv)
    back = to_diffusers(ours).eval()
    assert tuple(back.config.sample_size) == size
    assert back.config.down_block_types == WIDE["down_block_types"]
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in back.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x, t).sample, ref)


def test_a_square_pair_converts_to_one_number():
    ours = from_diffusers(UNet2DModel(**dict(WIDE, sample_size=(16, 16))))
    assert ours.config.sample_size == 16
