"""diffusers UNet2DModel <-> resdiff UNet: outputs must agree to 1e-4 in float32."""

import pytest
import torch
from diffusers import UNet2DModel

from resdiff import UNet

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
    ours = UNet.from_diffusers(theirs)
    ref = outputs(theirs, config)
    assert ref.abs().mean() > 1e-3  # a real signal, not zeros
    assert (outputs(ours, config) - ref).abs().max() <= 1e-4
    back = ours.to_diffusers()
    assert (outputs(back, config) - ref).abs().max() <= 1e-4
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_ddpm_cifar10_conversion_equals_the_preset_layout():
    ours = UNet.from_diffusers(UNet2DModel(**DDPM_CIFAR10))
    preset = UNet.from_preset("ddpm-cifar10")
    assert [p.shape for p in ours.parameters()] == [p.shape for p in preset.parameters()]
    assert ours.config.attention_resolutions in ((16,), [16])
    assert ours.config.downsample_padding == 0 and ours.config.freq_shift == 1 and not ours.config.flip_sin_to_cos


def test_resdiff_preset_to_diffusers_matches():
    ours = UNet.from_preset("tiny", sample_size=16, zero_init_last=False).eval()
    theirs = ours.to_diffusers().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (ours(x, torch.tensor([3, 900])).sample - theirs(x, torch.tensor([3, 900])).sample).abs().max() <= 1e-4


def test_unsupported_architectures_are_refused_clearly():
    with pytest.raises(ValueError, match="cannot convert: time_embedding_type='fourier'"):
        UNet.from_diffusers(UNet2DModel(sample_size=16, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, time_embedding_type="fourier"))
    with pytest.raises(ValueError, match="diffusers has no bottleneck"):
        UNet.from_preset("tiny", block="bottleneck").to_diffusers()
