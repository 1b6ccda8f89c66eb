"""resdiff.ema.EMA: the same average as diffusers' EMAModel, kept in one model of its own."""

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from resdiff.ema import EMA


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_diffusers_ema_model_update_by_update(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    ours = EMA(model, decay=0.9, warmup=warmup)
    theirs = EMAModel(model.parameters(), decay=0.9, min_decay=0.0 if warmup else 0.9, foreach=True)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        theirs.step(model.parameters())
        for a, b in zip(ours.model.parameters(), theirs.shadow_params):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ours.updates == theirs.optimization_step == 6


def test_ema_starts_as_a_copy_and_then_lags_the_weights():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.99, warmup=False)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # the first update copies
    assert torch.equal(ema.model.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, torch.full((3, 3), 1.01))
    assert ema.current_decay() == 0.99


def test_ema_load_resumes_weights_and_count():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    weights = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    ema.load(weights, updates=41)
    assert ema.updates == 41 and torch.equal(ema.model.weight, torch.ones(2, 2))
    assert ema.current_decay() == pytest.approx(42 / 51)  # warm-up: (1 + n) / (10 + n)


def test_power_gamma_gives_edm2s_exponents_and_refuses_widths_without_one():
    from resdiff.ema import power_gamma

    assert power_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's table: sigma_rel 0.05 -> gamma 16.97
    assert power_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert power_gamma(0.28) > 0  # the widest allowed still weights later steps more
    for too_wide in (0.285, 0.3):  # 0.285 has roots, but only gamma < 0: the first steps would weigh the most
        with pytest.raises(ValueError, match=r"sigma_rel .* must be in \(0, 0.28\]"):
            power_gamma(too_wide)


def test_power_function_ema_weights_step_s_by_its_share_of_s_to_the_gamma_plus_one():
    """EDM2's power EMA after t updates is sum_s (s^(g+1) - (s-1)^(g+1)) / t^(g+1) * w_s: the average of the
    whole run with weight rising as s^g, not a window of fixed length."""
    from resdiff.ema import power_gamma

    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, warmup=True, sigma_rel=0.1)  # decay and warmup are unused
    g, seen = power_gamma(0.1), []
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        seen.append(model.weight.detach().clone())
        ema.update(model)
    t = len(seen)
    expected = sum((s ** (g + 1) - (s - 1) ** (g + 1)) / t ** (g + 1) * w for s, w in enumerate(seen, 1))
    torch.testing.assert_close(ema.model.weight, expected, rtol=0, atol=1e-5)
