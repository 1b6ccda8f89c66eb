"""The trainer (resdiff/trainer.py) and train.py: run directory, learning, resume, processes, accumulation, errors.

Every run is tiny (a 0.3M-parameter U-Net at 16x16, batches of 8, a handful of steps) on real PNG files.
The library is driven in-process (load_config + Trainer.fit, or train.main with an argv) where a new
interpreter would only add start-up time; `python train.py` and torchrun run for real where the process
boundary is the point (exit codes and stderr, two processes).
"""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from resdiff.config import load_config
from resdiff.errors import run_cli
from resdiff.batches import ShardedBatches
from resdiff.build import build_trainer, model_keys
from launch import free_port, launch_env, launcher, run_watched, workers
from tiny_runs import ROOT, TINY, config, fit, load_script, read_log, write_pngs

TRAIN = ROOT / "train.py"


cli = load_script("train_cli", "train.py")


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("data") / "pngs", 32)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, pngs):
    """5 steps; log every 3, checkpoint and preview every 2, keep the newest 2 checkpoints."""
    run = tmp_path_factory.mktemp("runs") / "run"
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    printed = fit(run, f"data.path={pngs}", "train.steps=5", "train.log_every=3", "train.checkpoint_every=2",
                  "train.preview_every=2", "train.keep_checkpoints=2")
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # fit() put them back
    return run, printed


# ----------------------------------------------------------------------------- the run directory


def test_run_directory_has_every_part(finished_run):
    run, _ = finished_run
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "identity.json", "log.jsonl", "model", "samples"]

    saved = load_config(run / "config.yaml", model_keys=model_keys())  # the resolved config reloads as is
    asked = config(run, f"data.path={saved.data.path}", "train.steps=5", "train.log_every=3",
                   "train.checkpoint_every=2", "train.preview_every=2", "train.keep_checkpoints=2")
    assert asked.diffusion.schedule_shift == "auto" and saved.diffusion.schedule_shift == 1.0  # a pixel run's number
    asked.diffusion.schedule_shift = 1.0
    assert saved.to_dict() == asked.to_dict()

    log = read_log(run)
    assert [r["step"] for r in log] == [2, 3, 4, 5]  # every 3rd step, every checkpoint, and always the last
    for record in log:
        assert {"step", "loss", "lr", "images_per_s", "world_size"} <= set(record)
        assert record["world_size"] == 1 and record["lr"] == pytest.approx(1e-3)
        assert np.isfinite(record["loss"]) and record["loss"] > 0 and record["images_per_s"] > 0

    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == [f"step-{s:07d}.png" for s in (2, 4, 5)]
    with Image.open(run / "samples" / grids[-1]) as grid:
        assert grid.mode == "RGB" and grid.size == (38, 38)  # 2 x 2 images of 16 px, 2 px apart

    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000004", "step-0000005"]  # keep 2
    newest = run / "checkpoints" / "step-0000005"
    assert sorted(p.name for p in newest.iterdir()) == ["SHA256SUMS", "ema", "model.safetensors", "optimizer.pt", "rng-0.pt", "state.json"]
    state = json.loads((newest / "state.json").read_text())
    assert state["step"] == 5 and state["world_size"] == 1 and state["ema_step"] == 5
    assert (state["epoch"], state["batch"]) == (1, 1)  # 32 images = 4 batches of 8 per epoch
    optimizer = torch.load(newest / "optimizer.pt", weights_only=True)
    assert set(optimizer) == {"optimizer", "lr_schedule", "scaler"} and optimizer["scaler"] is None and optimizer["lr_schedule"]["last_epoch"] == 5
    assert set(torch.load(newest / "rng-0.pt", weights_only=True)) >= {"cpu"}
    for part in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (newest / "ema" / part).is_file() and (run / "model" / part).is_file()
    # The exported model is the newest checkpoint's EMA model; the raw weights differ from it.
    exported = load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(newest / "ema" / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load_file(newest / "model.safetensors")
    assert exported.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert not list(run.rglob("*.tmp")) and not list(run.glob(".model*"))  # nothing half-written left behind


def test_exported_model_loads_as_a_diffusers_pipeline(finished_run):
    import resdiff  # noqa: F401  (diffusers resolves the custom UNet class only from imported modules)
    from diffusers import DDPMPipeline

    run, _ = finished_run
    pipe = DDPMPipeline.from_pretrained(run / "model")
    assert type(pipe.unet).__name__ == "UNet" and pipe.scheduler.config.num_train_timesteps == 1000
    # diffusers' pipeline places its steps as resdiff's samplers do: the first at the last training timestep
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1


def test_summary_lines(finished_run, pngs):
    run, printed = finished_run
    summary = printed[0].splitlines()
    assert summary[0].startswith("resdiff: training a DDPM, 0.") and "M parameters (auto: widths 16, 32" in summary[0]
    assert f"{pngs}: 32 images" in printed[0]
    assert "8 global = 8 per process x 1 process(es) x 1 accumulation" in printed[0]
    assert "1 process(es), device cpu, precision no" in printed[0]
    assert f"run dir:   {run} (new run)" in printed[0]
    assert printed[-1].startswith("done: 5 steps")


@pytest.mark.parametrize("overrides, line", [
    (["data.num_workers=auto"], "images:    16x16, 3 channel(s), cached in memory"),
    (["data.num_workers=auto"], "loader:    0 worker process(es) (auto: the decoded images are cached in memory)"),
    (["data.num_workers=auto", "data.cache=false"], "loader:    0 worker process(es) (auto: the model computes on the CPU"),
    (["data.num_workers=3"], "loader:    3 worker process(es) (data.num_workers)"),
])
def test_summary_says_how_many_loader_workers_and_why(tmp_path, pngs, overrides, line):
    trainer = build_trainer(config(tmp_path / "run", f"data.path={pngs}", *overrides), echo=lambda _m: None)
    try:
        assert line in trainer.about
        said = next(x for x in trainer.about.splitlines() if x.strip().startswith("loader:")).split()[1]
        assert trainer.batches.loader_kwargs["num_workers"] == int(said)
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- learning


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed precision per process; forget it around a test that trains with another."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


FAST_PATHS = {"plain": [], "channels_last+bf16": ["train.channels_last=true", "train.mixed_precision=bf16"]}


@pytest.mark.parametrize("fast", list(FAST_PATHS))
def test_training_learns_a_flat_colour(tmp_path, fast, fresh_accelerate_state):
    """All images one colour: the loss falls far below its start and EMA samples come out that colour,
    which the untrained model's samples do not.

    The x0 ("sample") target makes this learnable in a few dozen CPU steps: the network only has to output
    the colour. (An epsilon model's loss falls as fast, but its samples need far longer training: at high
    noise an epsilon error is amplified by 1/sqrt(alpha_bar) ~ 150 into the image estimate.)
    The optimised paths (channels_last memory, bf16 autocast) must learn just as well.
    """
    from resdiff.sampling import generate

    colour = torch.tensor([200.0, 40.0, 40.0])
    data = write_pngs(tmp_path / "flat", 32, color=(200, 40, 40))
    cfg = config(tmp_path / "run", f"data.path={data}", "train.steps=40", "train.lr=2e-3", "train.ema_decay=0.9",
                 "train.log_every=5", "diffusion.prediction_type=sample", "data.random_flip=false", *FAST_PATHS[fast])
    trainer = build_trainer(cfg, echo=lambda _: None)

    def mean_colour(model) -> torch.Tensor:
        images = generate(model, 8, sampler="ddim", steps=20, seed=1, progress=False,
                          scheduler_config=dict(trainer.diffusion.scheduler.config))
        return images.float().mean((0, 2, 3))

    untrained = mean_colour(trainer.ema.model)
    model = trainer.fit()
    losses = [r["loss"] for r in read_log(tmp_path / "run")]
    assert len(losses) == 8 and losses[-1] < 0.1 * losses[0]
    trained = mean_colour(str(model))  # the exported EMA pipeline, as a user would load it
    assert (trained - colour).abs().max() < 10, trained
    assert (untrained - colour).abs().max() > 40, untrained


# ----------------------------------------------------------------------------- resume


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path, pngs):
    """6 steps at once vs 3 steps, then resumed to 6 in the same run directory. Random flips, the data
    order across an epoch boundary, the noise, Adam's moments and the EMA all carry over exactly; the
    extra preview the split run draws at step 3 must not disturb the training RNG."""
    common = [f"data.path={pngs}", "train.log_every=2", "train.checkpoint_every=3", "train.batch_size=16"]
    fit(tmp_path / "straight", *common, "train.steps=6")
    fit(tmp_path / "split", *common, "train.steps=3")
    printed = fit(tmp_path / "split", *common, "train.steps=6")  # resume="auto": the newest checkpoint

    assert f"resumed from {tmp_path / 'split' / 'checkpoints' / 'step-0000003'} (step 3)" in printed[0]
    a, b = tmp_path / "straight" / "checkpoints" / "step-0000006", tmp_path / "split" / "checkpoints" / "step-0000006"
    for name in ("model.safetensors", "ema/unet/diffusion_pytorch_model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    opt_a, opt_b = (torch.load(p / "optimizer.pt", weights_only=True)["optimizer"]["state"] for p in (a, b))
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    assert torch.equal(torch.load(a / "rng-0.pt")["cpu"], torch.load(b / "rng-0.pt")["cpu"])
    timeless = [{k: v for k, v in json.loads((p / "state.json").read_text()).items() if not k.endswith("_seconds")}
                for p in (a, b)]  # the training and evaluation clocks are wall time
    assert timeless[0] == timeless[1]

    straight, split = read_log(tmp_path / "straight"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [2, 3, 4, 6]  # the resumed run continues the count in the same log
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]


def test_bf16_resume_is_bitwise_identical_too(tmp_path, pngs, fresh_accelerate_state):
    """The same comparison under bf16 autocast (which needs no loss scale): 4 steps straight against 2 + resume + 2."""
    common = [f"data.path={pngs}", "train.log_every=2", "train.checkpoint_every=2", "train.mixed_precision=bf16"]
    fit(tmp_path / "straight", *common, "train.steps=4")
    fit(tmp_path / "split", *common, "train.steps=2")
    fit(tmp_path / "split", *common, "train.steps=4")
    a, b = tmp_path / "straight" / "checkpoints" / "step-0000004", tmp_path / "split" / "checkpoints" / "step-0000004"
    for name in ("model.safetensors", "ema/unet/diffusion_pytorch_model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    assert [r["loss"] for r in read_log(tmp_path / "split")] == [r["loss"] for r in read_log(tmp_path / "straight")]


def test_resuming_a_finished_run_does_nothing(tmp_path, pngs):
    fit(tmp_path / "run", f"data.path={pngs}", "train.steps=2")
    printed = fit(tmp_path / "run", f"data.path={pngs}", "train.steps=2")
    assert "(step 2)" in printed[0] and printed[-1].startswith("done: 2 steps")
    assert [r["step"] for r in read_log(tmp_path / "run")] == [2]


def test_a_signal_finishes_the_step_checkpoints_and_stops(tmp_path, pngs):
    """SIGTERM (here sent by the process to itself as training starts) ends the run after the current step
    with a checkpoint that the same command resumes; the caller's handler is back afterwards."""
    printed = []

    def echo(message: str) -> None:
        printed.append(message)
        if message.startswith("resdiff: training"):  # the summary: the handlers are in place, no step taken yet
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    build_trainer(config(tmp_path / "run", f"data.path={pngs}", "train.steps=50"), echo=echo).fit()
    assert signal.getsignal(signal.SIGTERM) == before
    assert any(m.strip().startswith("signal 15: finishing step 1") for m in printed)
    assert printed[-1].startswith("stopped by signal 15 at step 1; checkpoint saved")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000001"]
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1]
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
    printed = fit(tmp_path / "run", f"data.path={pngs}", "train.steps=2")
    assert "(step 1)" in printed[0] and printed[-1].startswith("done: 2 steps")


# ----------------------------------------------------------------------------- parts of one's own


def test_the_trainer_trains_parts_it_is_given_without_a_config(tmp_path):
    """Trainer(model=, diffusion=, optimizer=, lr_schedule=, ema=, batches=, run=, accelerator=, ...): parts of one's
    own (an SGD optimizer, a constant schedule, an endless iterable of uint8 batches), no Config, no image folder;
    it writes a run directory all the same."""
    from accelerate import Accelerator

    from resdiff import UNet
    from resdiff.checkpoint import complete_checkpoints
    from resdiff.diffusion import GaussianDiffusion
    from resdiff.ema import EMA
    from resdiff.previews import Previews
    from resdiff.rundir import RunDir
    from resdiff.settings import SamplingSettings
    from resdiff.trainer import Trainer

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=g), torch.zeros(4, dtype=torch.long)

    torch.manual_seed(0)
    unet = UNet.from_preset("tiny", sample_size=16, in_channels=1, channels=16, norm_groups=4)
    optimizer = torch.optim.SGD(unet.parameters(), lr=1e-2)
    run = RunDir(tmp_path / "mine")
    trainer = Trainer(model=unet, diffusion=GaussianDiffusion.from_config(num_train_timesteps=50), optimizer=optimizer,
                      lr_schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0), ema=EMA(unet, 0.99),
                      batches=batches(), run=run, accelerator=Accelerator(cpu=True), steps=3, batch_size=4,
                      log_every=1, previews=Previews(every=1000, num_images=2, run=run,
                                                     settings=SamplingSettings(sampler="ddim", steps=2)),
                      echo=lambda _m: None)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert trainer.fit() == tmp_path / "mine" / "model"
    assert [r["step"] for r in read_log(tmp_path / "mine")] == [1, 2, 3]
    assert [p.name for p in complete_checkpoints(tmp_path / "mine")] == ["step-0000003"]
    assert (tmp_path / "mine" / "samples" / "step-0000003.png").is_file()
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert trainer.ema.updates == 3


def test_previews_go_to_tensorboard_as_images_at_their_step(tmp_path, pngs):
    """train.trackers=[tensorboard]: each preview grid the run writes is also an image in TensorBoard's event file
    (RUN/resdiff/, accelerate's project folder), at its step, pixel for pixel; the scalars are there beside it."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    fit(run, f"data.path={pngs}", "train.steps=3", "train.log_every=1", "train.preview_every=2",
        "train.trackers=[tensorboard]")
    events = EventAccumulator(str(run / "resdiff"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    previews = events.Images("preview")
    assert [e.step for e in previews] == [2, 3]  # every 2 steps and at the end, as samples/ has them
    for event in previews:
        with Image.open(run / "samples" / f"step-{event.step:07d}.png") as grid:
            shown = Image.open(io.BytesIO(event.encoded_image_string))
            assert (event.width, event.height) == grid.size
            assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(grid.convert("RGB")))
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


# ----------------------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_matches_one_full_batch(tmp_path, pngs):
    """grad_accum=2 (two micro-batches of 4) and grad_accum=1 (one batch of 8), two steps each, same seed.

    Through the real trainer the two runs draw different timesteps and noise per micro-batch, so the
    objective is made deterministic with a valid degenerate schedule instead: one training timestep whose
    beta (1e-12) rounds alpha_bar to exactly 1.0 in float32, so x_t = x0 whatever the noise, t is always 0,
    and the x0 target ("sample") does not involve the noise either; flips are off. The loss is then a fixed
    function of the batch, and accumulation must reproduce the full batch's gradient: Adam's moments after
    the steps (which hold the gradients' scale, unlike Adam's normalised update), the weights and the logged
    loss agree to float tolerance. Gradient clipping is off so it cannot hide a wrongly scaled gradient.
    """
    degenerate = [f"data.path={pngs}", "train.steps=2", "train.log_every=1", "train.preview_steps=1", "train.grad_clip=null",
                  "diffusion.num_train_timesteps=1", "diffusion.beta_schedule=linear", "diffusion.beta_start=1e-12",
                  "diffusion.prediction_type=sample", "diffusion.min_snr_gamma=null", "data.random_flip=false"]
    trainer = build_trainer(config(tmp_path / "check", *degenerate), echo=lambda _: None)
    assert float(trainer.diffusion.scheduler.alphas_cumprod[0]) == 1.0
    initial = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}

    results = {}
    for name, extra in (("full", ["train.grad_accum=1"]), ("accum", ["train.grad_accum=2"]),
                        ("half", ["train.grad_accum=1", "train.batch_size=4"])):
        fit(tmp_path / name, *degenerate, *extra)
        ckpt = tmp_path / name / "checkpoints" / "step-0000002"
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]["state"]
        results[name] = (load_file(ckpt / "model.safetensors"), opt, [r["loss"] for r in read_log(tmp_path / name)])

    (w1, opt1, loss1), (w2, opt2, loss2), (_, opt_half, _) = results["full"], results["accum"], results["half"]
    assert any(not torch.equal(w1[k], initial[k]) for k in initial)  # the steps did move the weights
    for i in opt1:
        for key in ("exp_avg", "exp_avg_sq"):
            scale = float(opt1[i][key].abs().max())  # summation order differs: tolerance relative to the tensor
            torch.testing.assert_close(opt2[i][key], opt1[i][key], rtol=1e-4, atol=1e-5 * scale)
    for k in w1:
        # Adam's update m / sqrt(v) is scale-free, so a gradient that is ~0 up to rounding (e.g. a bias in
        # front of a GroupNorm) still moves by up to ~lr = 1e-3: weights agree to a small fraction of lr.
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=5e-5)
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    # The comparison can fail: half the batch (what a step on one micro-batch would see) gives other moments.
    assert any(not torch.allclose(opt_half[i]["exp_avg"], opt1[i]["exp_avg"], rtol=1e-2, atol=1e-6) for i in opt1)


# ----------------------------------------------------------------------------- data sharding


def test_batches_give_each_process_its_own_slice(pngs):
    """Two ranks' batches in an epoch are disjoint and together cover every image once; the order is seeded."""
    from resdiff.data import ImageFolder

    dataset = ImageFolder(pngs, 16)
    def indices(batches: ShardedBatches) -> list[int]:
        return [i for batch in batches._epoch_batches() for i, _flipped in batch]

    ranks = [ShardedBatches(dataset, 4, rank, 2, seed=3, loader_kwargs={}) for rank in (0, 1)]
    first = [indices(b) for b in ranks]
    assert len(first[0]) == len(first[1]) == 16 and not set(first[0]) & set(first[1])
    assert sorted(first[0] + first[1]) == list(range(32))
    assert first[0] == indices(ShardedBatches(dataset, 4, 0, 2, seed=3, loader_kwargs={}))  # reproducible
    ranks[0].epoch = 1
    assert indices(ranks[0]) != first[0]  # a new permutation every epoch
    # The images the iterator yields are those indices, in batches of 4 per process.
    images, _ = next(iter(ranks[1]))
    assert torch.equal(images, torch.stack([dataset[i][0] for i in first[1][:4]]))


HELPER = '''
"""Run under torchrun: train, then save this process's weights and the indices of the images it loaded."""
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from resdiff.config import load_config
from resdiff.build import build_trainer, model_keys
from tiny_runs import Seen  # tests/ is on PYTHONPATH


out = Path(sys.argv[1])
trainer = build_trainer(load_config(None, sys.argv[2:], model_keys=model_keys()))
trainer.batches.dataset = seen = Seen(trainer.batches.dataset)
trainer.fit()
rank = trainer.rank
state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
save_file({k: v.contiguous() for k, v in state.items()}, out / f"model{rank}.safetensors")
save_file({k: v.contiguous() for k, v in trainer.ema.model.state_dict().items()}, out / f"ema{rank}.safetensors")
(out / f"seen{rank}.json").write_text(json.dumps({"indices": seen.indices, "world": trainer.world, "epoch": trainer.batches.epoch}))
'''


@pytest.mark.slow
def test_two_processes(tmp_path, pngs):
    """The README's torchrun line (no --standalone; the test picks a free port) with two CPU processes, twice
    at once: train.py itself, and a helper that looks inside each rank. Both must end by themselves."""
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    common = [*TINY, f"data.path={pngs}", "train.steps=4", "train.log_every=2", "train.checkpoint_every=2"]
    torchrun = [launcher("torchrun"), "--nproc_per_node", "2"]
    commands = {
        "cli": [*torchrun, "train.py", "--out", str(tmp_path / "cli"), "--steps", "4", "--batch-size", "8", "--seed", "1", *common],
        "helper": [*torchrun, str(helper), str(tmp_path), *common, f"out={tmp_path / 'run'}"],
    }
    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(run_watched, cmd, timeout=240, env=launch_env(free_port(), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}"))
                for name, cmd in commands.items()}
        done = {name: future.result() for name, future in runs.items()}
    for name, proc in done.items():
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}\n{proc.stderr}"
    out = done["cli"].stdout
    assert out.count("resdiff: training a DDPM") == 1  # the summary comes from the main process only
    assert "8 global = 4 per process x 2 process(es) x 1 accumulation" in out
    assert "(auto: widths 16, 32, attention at 8)" in out  # the layout is read through the DDP wrapper

    for run in (tmp_path / "cli", tmp_path / "run"):
        log = read_log(run)
        assert [r["step"] for r in log] == [2, 4] and all(r["world_size"] == 2 for r in log)
        state = json.loads((run / "checkpoints" / "step-0000004" / "state.json").read_text())
        assert state["world_size"] == 2
        assert sorted(p.name for p in (run / "checkpoints" / "step-0000004").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
        assert (run / "samples" / "step-0000004.png").is_file() and (run / "model" / "model_index.json").is_file()

    # Identical parameters (and EMA) on both processes after training on different data.
    for kind in ("model", "ema"):
        r0, r1 = load_file(tmp_path / f"{kind}0.safetensors"), load_file(tmp_path / f"{kind}1.safetensors")
        assert all(torch.equal(r0[k], r1[k]) for k in r0), kind
    saved, rank0 = (load_file(p) for p in (tmp_path / "run" / "checkpoints" / "step-0000004" / "model.safetensors",
                                           tmp_path / "model0.safetensors"))
    assert saved.keys() == rank0.keys() and all(torch.equal(saved[k], rank0[k]) for k in saved)
    # 4 steps x 8 images = one epoch of 32: each process loaded its own 16, together every image once.
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [s["world"] for s in seen] == [2, 2]
    assert len(seen[0]["indices"]) == len(seen[1]["indices"]) == 16
    assert not set(seen[0]["indices"]) & set(seen[1]["indices"])
    assert sorted(seen[0]["indices"] + seen[1]["indices"]) == list(range(32))


@pytest.mark.slow
def test_torchrun_standalone_ends(tmp_path, pngs):
    """The other torchrun form users type: --standalone picks its own port."""
    cmd = [launcher("torchrun"), "--standalone", "--nproc_per_node", "2", "train.py", "--data", str(pngs), "--steps", "2",
           "--batch-size", "8", "--out", str(tmp_path / "run"), *TINY]
    proc = run_watched(cmd, timeout=120, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["world_size"] for r in read_log(tmp_path / "run")] == [2]


@pytest.mark.slow
def test_accelerate_launch_ends(tmp_path, pngs):
    """The README's accelerate line (`accelerate launch --multi_gpu --num_processes N train.py ...`) with two CPU
    processes: one world of 2, not two worlds of 1. The port comes from an accelerate config file, as
    `accelerate config` writes one (accelerate has no environment variable for it), so the line stays the README's."""
    port_config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    port_config.parent.mkdir(parents=True)
    port_config.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmain_process_port: {free_port()}\n")
    cmd = [launcher("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "train.py", "--data", str(pngs),
           "--steps", "2", "--batch-size", "8", "--out", str(tmp_path / "run"), *TINY]
    proc = run_watched(cmd, timeout=120, env=launch_env(HF_HOME=str(tmp_path / "hf")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 global = 4 per process x 2 process(es)" in proc.stdout
    assert [r["world_size"] for r in read_log(tmp_path / "run")] == [2]


def _when_checkpointed(run: Path, step: int, act):
    """An on_start callback: once checkpoint ``step`` of ``run`` exists, call ``act(rank 1's process)``."""

    def on_start(proc):
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / f"step-{step:07d}").is_dir():
            assert time.monotonic() < deadline and proc.poll() is None, "the run never reached its first checkpoint"
            time.sleep(0.1)
        (victim,) = [p for p in workers(proc, "train.py") if p.environ().get("LOCAL_RANK") == "1"]
        act(victim)

    return on_start


@pytest.mark.slow
def test_a_killed_process_stops_the_other_with_one_line_and_the_run_resumes(tmp_path, pngs):
    """kill -9 one of two processes mid-run: the other exits by itself with one error line; the same command
    then resumes from the last checkpoint and finishes."""
    run = tmp_path / "run"
    cmd = [launcher("torchrun"), "--nproc_per_node", "2", "train.py", "--data", str(pngs), "--steps", "400", "--batch-size", "8",
           "--out", str(run), *TINY, "train.checkpoint_every=3", "train.timeout_s=30"]
    start = time.monotonic()
    proc = run_watched(cmd, timeout=180, env=launch_env(free_port()), on_start=_when_checkpointed(run, 3, lambda p: p.kill()))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "process 0 lost contact with the others at step" in errors[0], proc.stderr[-3000:]
    assert "Resume from the last checkpoint with the same command" in errors[0]
    assert "[rank0]: Traceback" not in proc.stderr
    assert time.monotonic() - start < 150
    last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))

    cmd[cmd.index("400")] = str(last + 3)  # the same command, with a nearer end so the test stays short
    again = run_watched(cmd, timeout=180, env=launch_env(free_port()))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{last:07d}'}" in again.stdout
    assert read_log(run)[-1]["step"] == last + 3


@pytest.mark.slow
def test_a_process_that_stops_answering_times_out(tmp_path, pngs):
    """A process that hangs (SIGSTOP) rather than dies: the other gives up after train.timeout_s, not 30 minutes."""
    run = tmp_path / "run"
    cmd = [launcher("torchrun"), "--nproc_per_node", "2", "train.py", "--data", str(pngs), "--steps", "400", "--batch-size", "8",
           "--out", str(run), *TINY, "train.checkpoint_every=3", "train.timeout_s=5"]
    waited = []

    def on_start(proc):
        frozen = []
        _when_checkpointed(run, 3, lambda victim: (victim.suspend(), frozen.append(victim)))(proc)
        since = time.monotonic()
        (rank0,) = [p for p in workers(proc, "train.py") if p.environ().get("LOCAL_RANK") == "0"]
        rank0.wait(timeout=120)  # it gives up by itself ...
        waited.append(time.monotonic() - since)
        frozen[0].kill()  # ... and the launcher ends the run once the frozen one is gone (it never exits by itself)

    proc = run_watched(cmd, timeout=180, env=launch_env(free_port()), on_start=on_start)
    assert 5 <= waited[0] < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "did not answer within train.timeout_s=5 s" in errors[0], proc.stderr[-3000:]


# ----------------------------------------------------------------------------- the command line


def test_train_py_help_and_flag_errors_answer_without_importing_torch():
    """`python train.py --help` (and a mistyped flag) answer at once: only a run imports torch, diffusers and
    accelerate, which costs seconds on a small CPU (and in every test that starts train.py)."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    heavy = sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules)\n"
        "    print('exit', stop.code, 'heavy', heavy)\n"
    )
    for argv, status in ((["--help"], 0), (["--mixed-precision", "fp8"], 2)):
        done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=subprocess_env(), capture_output=True,
                              text=True, timeout=120)
        assert f"exit {status} heavy []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--mixed-precision" in done.stderr and "fp16" in done.stderr and "bf16" in done.stderr, done.stderr  # the choices


def test_overrides_may_come_anywhere_among_the_flags():
    from resdiff.cli.train import parse_args

    args = parse_args(["model.channels=16", "--steps", "3", "train.lr=1e-3", "--out", "x", "data.image_size=16"])
    assert args.overrides == ["model.channels=16", "train.lr=1e-3", "data.image_size=16"]
    assert (args.steps, args.out, args.resume) == (3, "x", "auto")


def train_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_run_directory_names(tmp_path, pngs, monkeypatch, capsys):
    """--out defaults to runs/<data folder>, else runs/<config name>, else runs/demo (the defaults)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = train_cli(["--data", pngs, "--steps", "1", *TINY], capsys)
    assert code == 0, err
    run = Path("runs") / pngs.name
    assert (tmp_path / run / "model" / "model_index.json").is_file()
    summary = out.splitlines()
    assert summary[0].startswith("resdiff: training a DDPM") and "M parameters" in summary[0]
    assert summary[0].endswith("(auto: widths 16, 32, attention at 8)")  # what preset auto chose for 16x16
    for line in (f"{pngs}: 32 images", "images:    16x16, 3 channel(s)", "8 global = 8 per process x 1 process(es)",
                 "world:     1 process(es), device cpu, precision no", "memory:    freed blocks kept for the next step", f"run dir:   {run} (new run)", "steps:     0 -> 1"):
        assert line in out, line

    code, out, _ = train_cli(["--data", pngs, "--steps", "2", *TINY], capsys)  # the same command resumes
    assert code == 0 and f"run dir:   {run} (resumed from {run / 'checkpoints' / 'step-0000001'} (step 1))" in out

    (tmp_path / "my-experiment.yaml").write_text("train:\n  seed: 3\n")
    assert train_cli(["--config", "my-experiment.yaml", "--steps", "1", *TINY], capsys)[0] == 0
    assert train_cli(["--steps", "1", *TINY], capsys)[0] == 0
    assert (tmp_path / "runs" / "my-experiment" / "model").is_dir() and (tmp_path / "runs" / "demo" / "model").is_dir()
    assert load_config(tmp_path / "runs" / "my-experiment" / "config.yaml").train.seed == 3


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, finished_run):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "text").mkdir()
    for i in range(3):
        (root / "text" / f"notes{i}.txt").write_text("not an image")
    (root / "broken").mkdir()
    for i in range(3):
        (root / "broken" / f"img{i}.png").write_bytes(b"\x89PNG not really" + bytes(range(40)))
    return root


BAD = {  # name: (argv after --data/--out, what the message says)
    "empty folder": (["--data", "{bad}/empty"], "no image files in"),
    "no image files": (["--data", "{bad}/text"], "no image files in"),
    "unreadable images": (["--data", "{bad}/broken"], "no readable images in"),
    "unknown key": (["train.ema_decy=0.9"], "unknown config key 'train.ema_decy' (from override 'train.ema_decy=0.9'); did you mean 'train.ema_decay'?"),
    "batch not divisible": (["train.batch_size=10", "train.grad_accum=3"], "train.batch_size 10 does not divide into 1 processes x 3"),
    "image size the U-Net can't halve": (["data.image_size=18", "model.channel_mult=[1,2,2]"],
                                         "sample_size 18 is not divisible by 2**2 = 4"),
    "model size contradicts data": (["model.sample_size=32"], "model.sample_size=32 contradicts data (16)"),
    "missing config file": (["--config", "{bad}/nope.yaml"], "config file '{bad}/nope.yaml' does not exist"),
    "resume changes the model": (["--out", "{run}", "model.channels=32"], "the config changes the model (model.channels: 16 -> 32)"),
    "resume never on a run with checkpoints": (["--out", "{run}", "--resume", "never"], "already has checkpoints"),
    "not a checkpoint folder": (["--resume", "{bad}/empty"], "not a checkpoint folder"),
    "misspelt flag": (["--step", "5"], "unrecognized arguments: --step 5 (see python train.py --help)"),
    "flag value of the wrong type": (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(case, bad_inputs, finished_run, pngs, tmp_path, capsys):
    """Through train.py's main and run_cli, exactly as `python train.py` runs them: exit 2, one `error:` line."""
    argv, message = BAD[case]
    subst = dict(bad=bad_inputs, run=finished_run[0])
    argv = ["--data", pngs, "--out", tmp_path / "run", "--steps", "2", *TINY, *[a.format(**subst) for a in argv]]
    before = sorted(p.relative_to(finished_run[0]) for p in finished_run[0].rglob("*"))
    code, out, err = train_cli(argv, capsys)
    assert code == 2, out + err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(**subst) in err
    assert "Traceback" not in out + err
    assert sorted(p.relative_to(finished_run[0]) for p in finished_run[0].rglob("*")) == before  # left alone


@pytest.mark.slow
def test_bad_input_through_the_real_script(bad_inputs, finished_run, pngs, tmp_path):
    """`python train.py` as a process: one stderr line, exit code 2, no traceback (nor any warning) before or
    after the library is loaded; three cases run at once to share the interpreter start-up time."""
    cases = {
        "unknown key": [*TINY, "--data", str(pngs), "--out", str(tmp_path / "a"), "train.ema_decy=0.9"],
        "empty folder": [*TINY, "--data", str(bad_inputs / "empty"), "--out", str(tmp_path / "b")],
        "resume changes the model": [*TINY, "--data", str(pngs), "--out", str(finished_run[0]), "model.channels=32"],
    }
    procs = {name: subprocess.Popen([sys.executable, str(TRAIN), *argv], cwd=tmp_path, env=subprocess_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, argv in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, f"{name}: {out}{err}"
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in out + err, f"{name}: {err}"


# ----------------------------------------------------------------------------- non-square images


def test_non_square_training_learns_samples_and_resumes_only_at_its_shape(tmp_path, fresh_accelerate_state):
    """A 16x32 run on wide images of one colour: the loss falls far, previews, samples, the grid and the npz
    are 16x32, and resuming with another shape is refused while the same shape resumes."""
    from resdiff.sampling import SamplingSettings, sample_to_folder
    from resdiff.errors import UsageError

    data = tmp_path / "wide"
    data.mkdir()
    for i in range(16):  # 20x50 files: resized to cover 16x32 (-> 16x40), then centre-cropped
        Image.fromarray(np.full((20, 50, 3), (200, 40, 40), np.uint8)).save(data / f"w{i:02d}.png")
    cfg = config(tmp_path / "run", f"data.path={data}", "data.image_size=16x32", "train.steps=40", "train.lr=2e-3",
                 "train.ema_decay=0.9", "train.log_every=5", "train.preview_every=40", "diffusion.prediction_type=sample")
    printed = []
    trainer = build_trainer(cfg, echo=printed.append)
    assert "images:    16x32, 3 channel(s), cached in memory" in trainer.about
    model = trainer.fit()
    losses = [r["loss"] for r in read_log(tmp_path / "run")]
    assert len(losses) == 8 and losses[-1] < 0.1 * losses[0], losses
    with Image.open(next((tmp_path / "run" / "samples").glob("*.png"))) as preview:  # 4 images of 16x32: 2 columns
        assert preview.size == (2 + 2 * 34, 2 + 2 * 18)
    out = sample_to_folder(str(model), 5, SamplingSettings(steps=10), out=tmp_path / "samples", npz=True, log=None)
    with Image.open(out / "00000.png") as im:
        assert im.size == (32, 16)
    assert np.load(out / "samples.npz")["arr_0"].shape == (5, 16, 32, 3)
    with pytest.raises(UsageError, match=r"data.image_size: \(16, 32\) -> \(32, 16\)"):
        build_trainer(config(tmp_path / "run", f"data.path={data}", "data.image_size=32x16", "train.steps=41"),
                      echo=lambda _m: None)
    again = build_trainer(config(tmp_path / "run", f"data.path={data}", "data.image_size=[16, 32]", "train.steps=41",
                                 "diffusion.prediction_type=sample", "train.lr=2e-3", "train.ema_decay=0.9",
                                 "train.log_every=5", "train.preview_every=40"), echo=lambda _m: None)
    assert again.step == 40
    again.close()


def test_the_demo_data_draws_non_square_shapes(tmp_path):
    trainer = build_trainer(config(tmp_path / "run", "data.image_size=16 24", "train.steps=1"), echo=lambda _m: None)
    try:
        images, _ = next(iter(trainer.batches))
        assert images.shape == (8, 3, 16, 24)
        assert "demo-shapes-16x24px-64" in trainer.about
    finally:
        trainer.close()


def test_an_unwritable_demo_folder_is_one_line_before_the_run_directory(tmp_path, monkeypatch):
    """The main process writes the demo images (every process learns whether it could): a cache that is a file
    stops the run with one line naming the folder and what to do, before the run directory is made."""
    from resdiff.errors import UsageError

    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RESDIFF_CACHE", str(blocker))
    with pytest.raises(UsageError, match=r"cannot write the demo images to .*cache/demo-shapes-16px-64 .*RESDIFF_CACHE"):
        build_trainer(config(tmp_path / "run", "train.steps=1"), echo=lambda _m: None)
    assert not (tmp_path / "run").exists()
