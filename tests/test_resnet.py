"""Tests for resdiff.resnet: sizes, shapes, torchvision-compatible names, init options, one training step."""

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from resdiff import resnet
from resdiff.errors import UsageError
from resdiff.resnet import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, ResNet

FIXTURE = Path(__file__).parent / "data" / "torchvision_resnet_keys.json"
BLOCKS = (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name: str, **kwargs) -> nn.Module:
    """Build a model without allocating or initialising its weights (fast for the big ones)."""
    with torch.device("meta"):
        return getattr(resnet, name)(**kwargs)


# Counts from torchvision.models (same numbers as its documentation), 1000 classes.
@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
        ("resnext50_32x4d", 25_028_904),
        ("wide_resnet50_2", 68_883_240),
    ],
)
def test_imagenet_param_counts(name, expected):
    assert num_params(build_meta(name)) == expected


# resnet20, 10 classes, counted by hand: stem 3*16*9 + 32 = 464; stage 1: 6 * (16*16*9 + 32) = 14,016;
# stage 2: 16*32*9 + 5*32*32*9 + 6*64 + the 1x1 shortcut (512 + 64) = 51,648;
# stage 3: 205,696 incl. the shortcut (2,048 + 128); fc 64*10 + 10 = 650. Total 272,474.
# (The paper's zero-padding "option A" shortcut would give 269,722.) The pre-activation nets land on the
# same totals: no stem norm (-32) and narrower first norms in stages 2/3 (-96) balance the final norm (+128).
@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet20", 272_474),
        ("resnet56", 855_770),
        ("resnet110", 1_730_714),
        ("preact_resnet20", 272_474),
        ("preact_resnet56", 855_770),
        ("preact_resnet110", 1_730_714),
    ],
)
def test_cifar_param_counts(name, expected):
    assert num_params(build_meta(name)) == expected


def test_cifar_depth_is_6n_plus_2():
    model = build_meta("resnet56")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 56  # 3x3 convs plus the fc layer; 1x1 shortcuts do not count
    with pytest.raises(UsageError):
        resnet.cifar_resnet(21)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_matches_torchvision(name):
    expected = json.loads(FIXTURE.read_text())[name]
    got = [[k, list(v.shape)] for k, v in build_meta(name).state_dict().items()]
    assert got == expected


def test_torchvision_checkpoint_loads_strict():
    """A state_dict with torchvision's names and shapes loads into resnet18 with strict=True."""
    fake = {k: torch.full(shape, 0.5) for k, shape in json.loads(FIXTURE.read_text())["resnet18"]}
    fake = {k: v.long() if k.endswith("num_batches_tracked") else v for k, v in fake.items()}
    model = resnet.resnet18()
    model.load_state_dict(fake, strict=True)
    assert torch.equal(model.fc.bias, torch.full((1000,), 0.5))


@pytest.mark.parametrize(
    "name, num_features", [("resnet18", 512), ("resnet50", 2048)]
)
def test_imagenet_shapes(name, num_features):
    model = getattr(resnet, name)(num_classes=7, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.forward_features(x).shape == (2, num_features)
    assert model.num_features == num_features


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20"])
def test_cifar_shapes(name):
    model = getattr(resnet, name)().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert model.forward_features(x).shape == (2, 64)
        assert model.layer3(model.layer2(model.layer1(model.conv1(x)))).shape == (2, 64, 8, 8)


def test_preact_imagenet_shape():
    model = ResNet(PreActBottleneck, [1, 1, 1, 1], num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert isinstance(model.final_norm, nn.BatchNorm2d)  # pre-activation nets end with norm + ReLU


@pytest.mark.parametrize("kwargs", [{"features_only": True}, {"num_classes": 0}])
def test_features_only_head_is_identity(kwargs):
    model = resnet.resnet18(**kwargs).eval()
    assert isinstance(model.fc, nn.Identity)
    assert num_params(model) == 11_689_512 - (512 * 1000 + 1000)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_default_init():
    model = resnet.resnet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k))
    w = model.layer4[0].conv2.weight
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)


def shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the block's shortcut path outputs (projections in pre-activation blocks read the activated input)."""
    if block.downsample is None:
        return x
    if block.preact:
        return block.downsample(torch.relu(block.bn1(x)))
    return block.downsample(x)


def block_io(model: nn.Module, x: torch.Tensor) -> list:
    """Run the model once and record (block, input, output) for every residual block."""
    records, handles = [], []
    for m in model.modules():
        if isinstance(m, BLOCKS):
            handles.append(m.register_forward_hook(lambda mod, inp, out: records.append((mod, inp[0], out))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return records


ZERO_INIT_MODELS = {
    "basic": lambda **kw: ResNet(BasicBlock, [2, 2], widths=(16, 32), stem="cifar", **kw),
    "bottleneck": lambda **kw: ResNet(Bottleneck, [2, 2], widths=(16, 32), stem="cifar", **kw),
    "preact_basic": lambda **kw: resnet.preact_resnet20(**kw),
    "preact_bottleneck": lambda **kw: ResNet(PreActBottleneck, [2, 2], widths=(16, 32), stem="cifar", **kw),
    "basic_groupnorm": lambda **kw: resnet.resnet20(norm_layer=lambda c: nn.GroupNorm(4, c), **kw),
}


@pytest.mark.parametrize("kind", list(ZERO_INIT_MODELS))
@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_makes_blocks_their_shortcut(kind, zero_init):
    torch.manual_seed(0)
    model = ZERO_INIT_MODELS[kind](zero_init_residual=zero_init).eval()
    records = block_io(model, torch.randn(2, 3, 16, 16))
    assert any(b.downsample is not None for b, _, _ in records)  # both shortcut kinds are exercised
    assert any(b.downsample is None for b, _, _ in records)
    for block, x, out in records:
        with torch.no_grad():
            expected = shortcut(block, x)
            if not block.preact:
                expected = torch.relu(expected)  # post-activation blocks apply ReLU after the addition
        assert torch.allclose(out, expected, atol=1e-6) == zero_init


@pytest.mark.parametrize("zero_init", [False, True])
@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20"])
def test_sgd_step_and_strict_round_trip(name, zero_init):
    torch.manual_seed(0)
    model = getattr(resnet, name)(zero_init_residual=zero_init)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = {k for k, p in model.named_parameters() if not torch.equal(before[k], p)}
    if zero_init:
        # Weights behind a zeroed layer get no gradient on the first step, but the zeroed layers
        # themselves do, so every block leaves the identity after one step.
        last = "conv2.weight" if "preact" in name else "bn2.weight"
        zeroed = {k for k in before if k.startswith("layer") and k.endswith(last)}
        assert len(zeroed) == 9 and zeroed <= changed
    else:
        assert changed == set(before)  # every weight learned

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = getattr(resnet, name)()
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_basic_block_rejects_groups():
    with pytest.raises(UsageError):
        ResNet(BasicBlock, [1, 1, 1, 1], groups=32, width_per_group=4)
