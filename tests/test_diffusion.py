"""GaussianDiffusion (resdiff/diffusion.py): noise schedules, training targets and loss, label dropout, and the sampling
loop over every named sampler, with per-image randomness and classifier-free guidance.

Everything runs on tiny real U-Nets at 16x16; the expected values are the closed forms of the papers,
computed here independently of diffusers.
"""

import itertools
from types import SimpleNamespace
import math

import pytest
import torch

from resdiff import UNet
from resdiff.config import load_config
from resdiff.choices import SAMPLERS
from resdiff.config import DiffusionConfig
from resdiff.diffusion import (LATENT_SCHEDULE_SHIFT, GaussianDiffusion, Guidance, image_generators, image_noise,
                               immiscible_order, laplace_timestep_probs, make_sampler, resolve_schedule_shift,
                               shifted_betas)

SMALL = dict(sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), norm_groups=8)
FEW = {"ddpm": 20, "ddim": 4, "dpm++": 4, "euler": 4, "heun": 3, "unipc": 4, "dpm++3m": 4,
       "dpm++sde": 4}  # sampling steps per sampler here


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test machines are small and shared: one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_unet(seed: int = 0, **overrides) -> UNet:
    """A tiny U-Net with non-zero output layers, so its predictions depend on its inputs."""
    torch.manual_seed(seed)
    return UNet(**{**SMALL, "zero_init_last": False, **overrides}).eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class Recorder(torch.nn.Module):
    """A real model that remembers what the loss fed it and what it answered."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, labels=None):
        out = self.model(x, t, labels)
        self.calls.append((x.detach().clone(), t.detach().clone(), out.sample.detach().clone()))
        return out


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_from_config():
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=100, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    torch.testing.assert_close(diffusion.scheduler.betas.double(), betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(diffusion.scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-7)
    assert diffusion.scheduler.config.num_train_timesteps == 100
    assert diffusion.prediction_type == "v_prediction" and diffusion.min_snr_gamma == 5.0  # DiffusionConfig()'s


def test_cosine_schedule_through_the_config_alias():
    """`cosine` in a config is squaredcos_cap_v2: Nichol & Dhariwal's alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
    cfg = load_config(None, ["diffusion.beta_schedule=cosine", "diffusion.num_train_timesteps=50"])
    assert cfg.diffusion.beta_schedule == "squaredcos_cap_v2"
    diffusion = GaussianDiffusion.from_config(**vars(cfg.diffusion))
    T, s = 50, 0.008

    def abar(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - abar(i + 1) / abar(i), 0.999) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(diffusion.scheduler.betas.double(), betas, rtol=1e-5, atol=1e-7)
    assert diffusion.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert diffusion.label_dropout == cfg.diffusion.label_dropout
    # At DDPM's 1000 steps the cosine schedule keeps far more signal halfway than the linear one.
    cosine, linear = GaussianDiffusion.from_config(beta_schedule="squaredcos_cap_v2"), GaussianDiffusion.from_config(beta_schedule="linear")
    assert cosine.scheduler.alphas_cumprod[500] > 0.4 > 0.1 > linear.scheduler.alphas_cumprod[500]


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=100)
    ab = diffusion.scheduler.alphas_cumprod.double()
    torch.testing.assert_close(diffusion.snr.double(), ab / (1 - ab), rtol=1e-5, atol=0)
    assert bool((diffusion.snr[1:] < diffusion.snr[:-1]).all())  # noisier with every step


# ----------------------------------------------------------------------------- targets and loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_is_the_closed_form(prediction_type):
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=100, prediction_type=prediction_type)
    x0, noise = images(), torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 10, 50, 99])
    ab = diffusion.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {
        "epsilon": noise,
        "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0,  # Salimans & Ho 2022
        "sample": x0,
    }[prediction_type]
    torch.testing.assert_close(diffusion.target(x0, noise, t), expected, rtol=1e-5, atol=1e-6)


def test_config_aliases_reach_the_target():
    cfg = load_config(None, ["diffusion.prediction_type=v"])
    assert GaussianDiffusion.from_config(**vars(cfg.diffusion)).prediction_type == "v_prediction"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_the_mse_to_the_target_of_the_noised_images(prediction_type):
    """Recover t and the noise from what the model was fed (x_t = sqrt(ab) x0 + sqrt(1-ab) eps) and recompute."""
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=100, prediction_type=prediction_type,
                                              min_snr_gamma=None)  # the plain MSE (weights: test_min_snr_weights)
    model, x0 = Recorder(small_unet()), images(8)
    loss = diffusion.loss(model, x0)
    (xt, t, pred), = model.calls
    assert t.shape == (8,) and t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 100
    ab = diffusion.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
    target = {"epsilon": noise, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(), rtol=1e-4, atol=1e-5)


def test_loss_is_float32_under_bf16_autocast():
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=100)
    model = Recorder(small_unet())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion.loss(model, images())
    assert model.calls[0][2].dtype == torch.bfloat16  # the network itself did run in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_loss_backpropagates_to_every_parameter():
    model = small_unet().train()
    GaussianDiffusion.from_config(num_train_timesteps=100).loss(model, images()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights(prediction_type):
    """Hang et al. 2023: weight min(snr, gamma)/snr for epsilon, min(snr, gamma)/(snr + 1) for v, min(snr, gamma) for x0."""
    gamma = 5.0
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=100, prediction_type=prediction_type, min_snr_gamma=gamma)
    t = torch.arange(100)
    ab = diffusion.scheduler.alphas_cumprod.double()
    snr = ab / (1 - ab)
    clipped = snr.clamp(max=gamma)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    torch.testing.assert_close(diffusion.loss_weight(t).double(), expected, rtol=1e-5, atol=1e-7)
    if prediction_type == "epsilon":  # low-noise steps (snr > gamma) are down-weighted, the rest kept
        w = diffusion.loss_weight(t)
        assert float(w[0]) < 0.01 and bool((w[snr < gamma] == 1).all())
    assert GaussianDiffusion.from_config(num_train_timesteps=100, min_snr_gamma=None).loss_weight(t) is None


def test_min_snr_weighting_changes_the_loss_as_the_weights_say():
    epsilon = dict(num_train_timesteps=100, beta_schedule="linear", prediction_type="epsilon")
    plain = GaussianDiffusion.from_config(**epsilon, min_snr_gamma=None)
    weighted = GaussianDiffusion.from_config(**epsilon, min_snr_gamma=5.0)
    x0 = images(8)
    losses = {}
    for name, diffusion in (("plain", plain), ("weighted", weighted)):
        model = Recorder(small_unet())
        torch.manual_seed(3)  # the same timesteps and noise for both
        losses[name] = diffusion.loss(model, x0).detach()
        (xt, t, pred), = model.calls
    ab = plain.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    per_image = ((pred - (xt - ab.sqrt() * x0) / (1 - ab).sqrt()) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(losses["plain"], per_image.mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["weighted"], (per_image * weighted.loss_weight(t)).mean(), rtol=1e-4, atol=1e-5)
    assert abs(float(losses["weighted"]) - float(losses["plain"])) > 1e-3


# ----------------------------------------------------------------------------- immiscible noise


def test_immiscible_order_is_the_permutation_of_least_total_distance():
    torch.manual_seed(0)
    x0, noise = images(6), torch.randn(6, 3, 16, 16)
    order = immiscible_order(x0, noise)
    assert sorted(order.tolist()) == list(range(6))

    def total(perm) -> float:
        return sum(float((x0[i] - noise[j]).norm()) for i, j in enumerate(perm))

    best = min(itertools.permutations(range(6)), key=total)  # all 720 pairings
    assert total(order.tolist()) == pytest.approx(total(best), rel=1e-6)
    assert total(order.tolist()) < total(range(6))  # the random pairing is farther


def test_immiscible_loss_trains_each_image_towards_its_assigned_noise():
    """Recover the noise the model was fed: it is the batch's noise reordered by immiscible_order, not as drawn."""
    config = dict(num_train_timesteps=100, prediction_type="epsilon", min_snr_gamma=None)
    x0 = images(8)
    fed = {}
    for immiscible in (False, True):
        model = Recorder(small_unet())
        torch.manual_seed(5)  # the same timesteps and noise draw for both
        GaussianDiffusion.from_config(**config, immiscible=immiscible).loss(model, x0)
        (xt, t, _), = model.calls
        ab = GaussianDiffusion.from_config(**config).scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        fed[immiscible] = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
    torch.testing.assert_close(fed[True], fed[False][immiscible_order(x0, fed[False])], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fed[True], fed[False], atol=1e-3)
    assert load_config(None, ["diffusion.immiscible=true"]).diffusion.immiscible is True


# ----------------------------------------------------------------------------- Laplace timestep sampling


def log_snr(diffusion: GaussianDiffusion) -> torch.Tensor:
    a = diffusion.scheduler.alphas_cumprod.double()
    return torch.log(a / (1 - a))  # (T,)


def test_laplace_timestep_probs_give_the_laplace_mass_of_log_snr():
    """Hang et al. 2024's Laplace(0, 0.5) over the cosine schedule's 1000 steps: the mass within |log-SNR| <= 1 is
    1 - exp(-2), half of it on each side of SNR 1, against 31% of the timesteps; a zero-SNR last step takes the tail."""
    diffusion = GaussianDiffusion.from_config(timestep_sampling="laplace")
    p, lam = diffusion.timestep_probs.double(), log_snr(diffusion)
    assert p.shape == (1000,) and (p >= 0).all() and p.sum().item() == pytest.approx(1, abs=1e-6)
    assert p[lam.abs() <= 1].sum().item() == pytest.approx(1 - math.exp(-2), abs=0.003)
    assert (lam.abs() <= 1).double().mean().item() < 0.35  # uniform draws would put 31% there
    assert p[lam < 0].sum().item() == pytest.approx(0.5, abs=0.003)
    assert lam[p.argmax()].abs().item() < 0.05  # the most drawn timestep is the one of SNR 1
    shifted = laplace_timestep_probs(diffusion.scheduler.alphas_cumprod, mu=-2.0, b=1.0).double()
    assert p @ lam > shifted @ lam + 1.5  # the location moves the draws
    zero_snr = diffusion.scheduler.alphas_cumprod.clone()
    zero_snr[-1] = 0
    tail = laplace_timestep_probs(zero_snr)
    assert torch.isfinite(tail).all() and tail.sum().item() == pytest.approx(1, abs=1e-6)
    assert GaussianDiffusion.from_config().timestep_probs is None  # the default draws uniformly


def test_the_loss_draws_its_timesteps_by_the_configured_sampling():
    """What the model is fed: uniform timesteps by default, Laplace-distributed log-SNRs with timestep_sampling."""
    fed = {}
    for sampling in ("uniform", "laplace"):
        diffusion = GaussianDiffusion.from_config(timestep_sampling=sampling)
        seen = []

        def model(x, t, labels=None):  # answers zeros and remembers the timesteps
            seen.append(t)
            return SimpleNamespace(sample=torch.zeros_like(x))

        torch.manual_seed(0)
        diffusion.loss(model, torch.zeros(20000, 1, 1, 1))
        fed[sampling] = (log_snr(diffusion)[seen[0]].abs() <= 1).double().mean().item()
    assert fed["uniform"] == pytest.approx(0.309, abs=0.02)  # 20000 draws: the std is about 0.0035
    assert fed["laplace"] == pytest.approx(1 - math.exp(-2), abs=0.02)
    assert load_config(None, ["diffusion.timestep_sampling=laplace"]).diffusion.timestep_sampling == "laplace"
    with pytest.raises(ValueError, match="timestep_sampling must be one of uniform, laplace, got 'normal'"):
        GaussianDiffusion.from_config(timestep_sampling="normal")


# ----------------------------------------------------------------------------- label dropout


def test_schedule_shift_divides_every_snr_by_the_square_of_the_shift():
    """diffusion.schedule_shift=3 on the cosine schedule: SNR(t) / 9 at every timestep (log-SNR - 2 log 3), still
    falling with t; 1 leaves the named schedule (no trained_betas in the scheduler config); the Min-SNR weights follow."""
    plain, shifted = GaussianDiffusion.from_config(), GaussianDiffusion.from_config(schedule_shift=3.0)
    assert plain.scheduler.config.trained_betas is None
    assert shifted.scheduler.config.beta_schedule == "squaredcos_cap_v2"  # what was shifted stays in the config
    difference = log_snr(shifted) - log_snr(plain)
    assert torch.allclose(difference, torch.full_like(difference, -2 * math.log(3)), atol=1e-3)
    assert (log_snr(shifted).diff() < 0).all()
    t = torch.tensor([0, 100, 500, 999])
    assert torch.allclose(shifted.loss_weight(t), (plain.snr[t] / 9).clamp(max=5) / (plain.snr[t] / 9 + 1), rtol=1e-3)
    linear = GaussianDiffusion.from_config(beta_schedule="linear").scheduler.betas
    back = torch.cumprod(1 - shifted_betas(shifted_betas(linear, 2.0), 0.5).double(), 0)  # 2 then 1/2: the schedule
    assert torch.allclose(back, torch.cumprod(1 - linear.double(), 0), rtol=1e-4)
    with pytest.raises(ValueError, match="diffusion.schedule_shift must be auto or > 0, got 0"):
        load_config(None, ["diffusion.schedule_shift=0"])


def test_schedule_shift_auto_shifts_latent_models_only():
    """The default, "auto": a latent model trains on the schedule shifted by LATENT_SCHEDULE_SHIFT, a pixel model on
    the schedule as named; a number is used as it is for both. Config values: auto, a number, or one error line."""
    assert DiffusionConfig().schedule_shift == "auto" and LATENT_SCHEDULE_SHIFT > 1
    pixel, latent = GaussianDiffusion.from_config(), GaussianDiffusion.from_config(latent=True)
    assert pixel.scheduler.config.trained_betas is None
    expected = GaussianDiffusion.from_config(schedule_shift=LATENT_SCHEDULE_SHIFT).scheduler.alphas_cumprod
    assert torch.allclose(latent.scheduler.alphas_cumprod, expected)
    assert GaussianDiffusion.from_config(latent=True, schedule_shift=1.0).scheduler.config.trained_betas is None
    assert resolve_schedule_shift("auto", True) == LATENT_SCHEDULE_SHIFT and resolve_schedule_shift("auto", False) == 1
    assert resolve_schedule_shift(2, True) == 2.0
    assert load_config(None, ["diffusion.schedule_shift=2"]).diffusion.schedule_shift == 2.0
    assert load_config(None, ["diffusion.schedule_shift=auto"]).diffusion.schedule_shift == "auto"
    with pytest.raises(ValueError, match="diffusion.schedule_shift must be auto or > 0, got 'big'"):
        load_config(None, ["diffusion.schedule_shift=big"])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_shifted_schedule_reaches_every_sampler_and_a_saved_pipeline(sampler, tmp_path):
    """The shift lives in the scheduler config: each sampler built from it, and diffusers' pipelines loading a saved
    model folder, noise with the shifted schedule (the training one), not the schedule's name."""
    from diffusers import DDIMPipeline, DDPMPipeline

    shifted = GaussianDiffusion.from_config(schedule_shift=2.0).scheduler
    assert not torch.allclose(shifted.alphas_cumprod, GaussianDiffusion.from_config().scheduler.alphas_cumprod, rtol=0.1)
    scheduler, _ = make_sampler(sampler, shifted.config)
    assert torch.allclose(scheduler.alphas_cumprod, shifted.alphas_cumprod)  # the sigma samplers derive theirs from it
    if sampler == "ddpm":
        DDPMPipeline(unet=small_unet(), scheduler=shifted).save_pretrained(tmp_path)
        for pipeline in (DDPMPipeline, DDIMPipeline):
            assert torch.allclose(pipeline.from_pretrained(tmp_path).scheduler.alphas_cumprod, shifted.alphas_cumprod)


def test_drop_labels_at_the_given_rate():
    diffusion = GaussianDiffusion.from_config(label_dropout=0.3)
    labels = torch.arange(20000) % 5
    dropped = diffusion.drop_labels(labels, null_label=5)
    is_null = dropped == 5
    assert abs(is_null.float().mean().item() - 0.3) < 0.02  # 20000 draws: the std is 0.0032
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the rest are untouched
    assert dropped.dtype == labels.dtype and dropped.shape == labels.shape


def test_no_dropout_keeps_every_label():
    labels = torch.arange(100) % 5
    assert torch.equal(GaussianDiffusion.from_config(label_dropout=0.0).drop_labels(labels, null_label=5), labels)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_gives_images_in_range(sampler):
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=20)  # few training steps: ddpm samples all 20
    gens = image_generators(0, range(2))
    out = diffusion.sample(small_unet(), image_noise(gens, (3, 16, 16)), sampler=sampler, steps=FEW[sampler], generators=gens)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert out.std() > 0.01  # not collapsed to a constant


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_starts_at_the_last_training_timestep(sampler):
    """A new model's samplers place their steps "trailing" (Lin et al. 2024): the first step is t = T - 1, where
    pure noise belongs, at any step count; a model saved with diffusers' "leading" keeps it (10 steps of 1000
    start at 900)."""
    config = GaussianDiffusion.from_config().scheduler.config
    assert config.timestep_spacing == "trailing"
    for steps in (10, 20, 50):
        scheduler, _ = make_sampler(sampler, config)
        scheduler.set_timesteps(steps)
        assert int(scheduler.timesteps[0]) == 999 and int(scheduler.timesteps.min()) >= 0
    old, _ = make_sampler(sampler, {**dict(config), "timestep_spacing": "leading"})
    old.set_timesteps(10)
    assert int(old.timesteps[0]) == 900


def test_image_randomness_is_independent_of_the_batch():
    """ddpm draws fresh noise every step; with one generator per image, image 1 comes out the same alone or in a batch."""
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=10)
    model = small_unet()

    def run(indices):
        gens = image_generators(7, indices)
        return diffusion.sample(model, image_noise(gens, (3, 16, 16)), sampler="ddpm", steps=10, generators=gens)

    together, alone = run([0, 1, 2]), run([1])
    torch.testing.assert_close(together[1], alone[0], rtol=0, atol=1e-5)
    assert (together[0] - together[1]).abs().max() > 0.1  # different images differ
    # The per-step noise matters: another seed for image 1's generator gives another image.
    gens = image_generators(8, [1])
    other_steps = diffusion.sample(model, image_noise(image_generators(7, [1]), (3, 16, 16)), sampler="ddpm", steps=10, generators=gens)
    assert (other_steps[0] - alone[0]).abs().max() > 0.01


def test_image_generators_depend_on_seed_and_index_only():
    a = image_noise(image_generators(3, [0, 5]), (4,))
    b = image_noise(image_generators(3, [5]), (4,))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(image_noise(image_generators(4, [5]), (4,))[0], b[0])


def test_classifier_free_guidance():
    """guidance mixes uncond + scale * (cond - uncond): scale 0 is the null-class sample, other scales move it."""
    diffusion = GaussianDiffusion.from_config(num_train_timesteps=50)
    model = small_unet(num_classes=3)
    noise = image_noise(image_generators(0, range(3)), (3, 16, 16))
    labels = torch.tensor([0, 1, 2])

    def run(scale, class_labels=labels, null_label=None):
        guidance = Guidance(class_labels, scale, null_label)
        return diffusion.sample(model, noise, sampler="ddim", steps=3, guidance=guidance)

    plain, guided, strong = run(1.0), run(3.0, null_label=3), run(6.0, null_label=3)
    for out in (plain, guided, strong):
        assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert (guided - plain).abs().max() > 1e-3 and (strong - guided).abs().max() > 1e-3
    torch.testing.assert_close(run(0.0, null_label=3), run(1.0, torch.full((3,), 3)), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="null label"):
        run(3.0)


def test_the_defaults_are_the_configs():
    """One source for the diffusion's defaults: GaussianDiffusion.from_config() is DiffusionConfig() (the
    label dropout included), and a config section with changes is that section changed."""
    plain, defaults = GaussianDiffusion.from_config(), DiffusionConfig()
    assert plain.label_dropout == defaults.label_dropout and plain.min_snr_gamma == defaults.min_snr_gamma
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert plain.scheduler.config[key] == getattr(defaults, key), key
    changed = GaussianDiffusion.from_config(DiffusionConfig(num_train_timesteps=50), label_dropout=0.0)
    assert changed.scheduler.config.num_train_timesteps == 50 and changed.label_dropout == 0.0
