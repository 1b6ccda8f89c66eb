"""Reliability and safety: damaged and half-written checkpoints, the run lock, disk problems, checks before
anything is written, hostile data and model folders, no code execution from model files, and real kills.

Everything is real: checkpoints damaged by truncating or deleting their files, a pickle that really runs
code when unpickled, a kernel-enforced file-size limit that makes a checkpoint write fail, other processes
holding the lock, and `python train.py` processes killed with SIGKILL at chosen moments. Runs are tiny
(16x16, 16 channels, batches of 8) and driven in-process except where the process boundary is the point.
"""

import gc
import json
import math
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from resdiff import UNet
from resdiff.checkpoint import checkpoint_problem, complete_checkpoints, latest_checkpoint, list_checkpoints
from resdiff.errors import TrainingError, UsageError, run_cli
from resdiff.files import write_checksums
from resdiff.build import build_trainer
from launch import free_port, launch_env, launcher, run_watched
from tiny_runs import ROOT, TINY, config, fit, load_script, read_log, write_pngs

SMALL = dict(sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), norm_groups=8)


train_script, sample_script = load_script("train_cli_rel", "train.py"), load_script("sample_cli_rel", "sample.py")


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


class Payload:
    """Unpickling this runs code: it writes a marker file (what a malicious model file would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def plant_pickle(path: Path, marker: Path, wrap: bool = False) -> Path:
    """A torch.save file (a zip with data.pkl, like a real .bin or optimizer.pt) that runs code when unpickled.
    In a checkpoint it also rewrites SHA256SUMS, as an attacker could, so that what is tested is torch.load's
    own refusal (the sums catch damage, not a forger)."""
    torch.save({"optimizer": Payload(marker), "lr_schedule": {}} if wrap else {"weight": Payload(marker)}, path)
    if (path.parent / "SHA256SUMS").is_file():
        write_checksums(path.parent, skip=("ema",))
    assert not marker.exists()
    return path


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("data") / "pngs", 32)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, pngs) -> Path:
    """4 steps with checkpoints at 2 and 4 (all kept). Tests copy it before damaging anything."""
    run = tmp_path_factory.mktemp("base") / "run"
    fit(run, f"data.path={pngs}", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002", "step-0000004"]
    return run


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run", symlinks=True))


def common(pngs: Path, *extra: str) -> list[str]:
    return [f"data.path={pngs}", "train.checkpoint_every=2", *extra]


# ----------------------------------------------------------------------------- damaged checkpoints

DAMAGE = {
    "state.json deleted": lambda c: (c / "state.json").unlink(),
    "state.json not JSON": lambda c: (c / "state.json").write_text('{"step": 4, "epo'),
    "state.json of another step": lambda c: (c / "state.json").write_text(
        json.dumps({**json.loads((c / "state.json").read_text()), "step": 3})),
    "weights deleted": lambda c: (c / "model.safetensors").unlink(),
    "weights truncated": lambda c: truncate(c / "model.safetensors"),
    "optimizer deleted": lambda c: (c / "optimizer.pt").unlink(),
    "optimizer truncated": lambda c: truncate(c / "optimizer.pt"),
    "EMA weights truncated": lambda c: truncate(c / "ema" / "unet" / "diffusion_pytorch_model.safetensors"),
    "EMA folder deleted": lambda c: shutil.rmtree(c / "ema"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_never_picked(damage, run_copy):
    DAMAGE[damage](ckpt(run_copy, 4))
    warnings = []
    assert latest_checkpoint(run_copy, warnings.append) == ckpt(run_copy, 2)
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipping checkpoint {ckpt(run_copy, 4)}: "), warnings
    assert checkpoint_problem(ckpt(run_copy, 2)) is None


def test_resume_falls_back_past_a_damaged_checkpoint_and_cleans_up_leftovers(run_copy, pngs):
    truncate(ckpt(run_copy, 4) / "model.safetensors")
    (run_copy / "checkpoints" / ".step-0000006.tmp").mkdir()  # a checkpoint write cut short
    (run_copy / "checkpoints" / ".step-0000006.tmp" / "model.safetensors").write_bytes(b"half")
    shutil.copytree(run_copy / "model", run_copy / ".model.tmp")  # an export cut short...
    os.replace(run_copy / "model", run_copy / ".model.old")  # ... after model/ was moved aside: no model/ now
    printed = fit(run_copy, *common(pngs, "train.steps=6", "train.keep_checkpoints=5"))

    removed = [m for m in printed if m.startswith("warning: removed")]
    assert removed == [f"warning: removed what an interrupted run left half-written in {run_copy}: "
                       ".model.old, .model.tmp, checkpoints/.step-0000006.tmp"]
    assert any(m.startswith(f"warning: skipping checkpoint {ckpt(run_copy, 4)}: model.safetensors is truncated") for m in printed)
    assert f"resumed from {ckpt(run_copy, 2)} (step 2)" in printed[-2] and printed[-1].startswith("done: 6 steps")
    assert checkpoint_problem(ckpt(run_copy, 6)) is None and (run_copy / "model" / "model_index.json").is_file()
    assert not list(run_copy.glob(".model*")) and not list(run_copy.glob("checkpoints/.*"))
    # Reaching step 4 again replaced the damaged checkpoint with a whole one.
    assert checkpoint_problem(ckpt(run_copy, 4)) is None
    assert [r["step"] for r in read_log(run_copy)] == [2, 4, 6]  # the lost step-4 record was replaced, not repeated


def test_a_checkpoint_that_fails_to_load_falls_back_with_a_warning(run_copy, pngs, tmp_path):
    """optimizer.pt passes the completeness check (a whole torch zip) but holds a pickle that would run
    code: torch.load(weights_only=True) refuses it, nothing runs, and the previous checkpoint is used."""
    marker = tmp_path / "marker"
    plant_pickle(ckpt(run_copy, 4) / "optimizer.pt", marker, wrap=True)
    assert checkpoint_problem(ckpt(run_copy, 4)) is None
    printed = []
    trainer = build_trainer(config(run_copy, *common(pngs, "train.steps=4")), echo=printed.append)
    trainer.close()
    assert not marker.exists()
    warning = [m for m in printed if m.startswith("warning: cannot load")]
    assert len(warning) == 1 and str(ckpt(run_copy, 4)) in warning[0] and "falling back" in warning[0]
    assert trainer.resumed_from == ckpt(run_copy, 2) and trainer.step == 2


def test_no_loadable_checkpoint_is_a_clear_error(run_copy, pngs, tmp_path):
    marker = tmp_path / "marker"
    shutil.rmtree(ckpt(run_copy, 2))
    plant_pickle(ckpt(run_copy, 4) / "optimizer.pt", marker, wrap=True)
    with pytest.raises(UsageError, match=r"cannot resume .*no checkpoint loads \(step-0000004: .*Weights only load failed") as info:
        build_trainer(config(run_copy, *common(pngs, "train.steps=6")), echo=lambda _: None)
    assert "\n" not in str(info.value) and not marker.exists() and not (run_copy / ".lock").exists()

    (ckpt(run_copy, 4) / "state.json").unlink()  # now no folder is even complete: do not silently start over
    with pytest.raises(UsageError, match=r"holds 1 checkpoint folder\(s\) but none is complete \(step-0000004: state.json is missing\)"):
        build_trainer(config(run_copy, *common(pngs, "train.steps=6")), echo=lambda _: None)


def test_keep_checkpoints_never_deletes_the_newest_complete_one(run_copy, pngs, tmp_path):
    """Rule: after step S is saved, the oldest complete checkpoints before S go until keep_checkpoints
    complete ones at or below S remain; later steps' checkpoints and damaged folders are not touched.

    Here step-8 looks complete but does not load, so the run resumes from step 4. With keep_checkpoints=1,
    naively keeping "the newest 1 folder" after saving step 6 would delete step 6 itself (and step 4)
    and keep only the broken step 8."""
    eight = ckpt(run_copy, 8)
    shutil.copytree(ckpt(run_copy, 4), eight)
    (eight / "state.json").write_text(json.dumps({**json.loads((eight / "state.json").read_text()), "step": 8}))
    plant_pickle(eight / "optimizer.pt", tmp_path / "marker", wrap=True)
    printed = fit(run_copy, *common(pngs, "train.steps=6", "train.keep_checkpoints=1"))
    assert f"resumed from {ckpt(run_copy, 4)} (step 4)" in "\n".join(printed)
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-0000006", "step-0000008"]
    assert [p.name for p in complete_checkpoints(run_copy)] == ["step-0000006", "step-0000008"]
    assert checkpoint_problem(ckpt(run_copy, 6)) is None and not (tmp_path / "marker").exists()


# ----------------------------------------------------------------------------- the lock


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(run_copy, pngs):
    """Ownership is the kernel lock a live run holds on .lock (test_rundir shows a holder whose file names a dead
    pid or another host is still refused); a file no process holds a lock on is taken over with a warning."""
    cfg = config(run_copy, *common(pngs, "train.steps=4"))
    lock = run_copy / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from resdiff.runlock import RunLock; "
                               "lock = RunLock(sys.argv[1]); lock.acquire(); print(flush=True); time.sleep(60)", str(run_copy)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        holder.stdout.readline()
        held = lock.read_text()
        with pytest.raises(UsageError) as info:
            build_trainer(cfg, echo=lambda _: None)
        assert str(info.value) == (f"{run_copy} is in use by pid {holder.pid} on {socket.gethostname()}, which holds "
                                   f"the lock on {lock}; wait for that run to end or stop it")
        assert lock.read_text() == held  # left alone
    finally:
        holder.kill()
        holder.wait()

    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # left by a run that no longer holds it
    printed = []
    first = build_trainer(cfg, echo=printed.append)
    assert printed[0] == f"warning: {lock} was left by pid 1 on elsewhere, which is no longer running; taking it over"
    owner = json.loads(lock.read_text())
    assert (owner["host"], owner["pid"]) == (socket.gethostname(), os.getpid())

    with pytest.raises(UsageError, match=f"in use by pid {os.getpid()} on"):  # a second Trainer in this process
        build_trainer(cfg, echo=lambda _: None)
    first.fit()
    assert not lock.exists()  # released when fit() ends

    second = build_trainer(cfg, echo=lambda _: None)  # never fitted: released when collected (or at exit)
    assert lock.exists()
    del second
    gc.collect()
    assert not lock.exists()


def test_lock_is_released_when_a_second_signal_stops_training_at_once(tmp_path, pngs):
    def term() -> None:  # a Python call: the first signal's handler runs before the second signal is sent
        os.kill(os.getpid(), signal.SIGTERM)

    def echo(message: str) -> None:
        if message.startswith("resdiff: training"):
            term()  # finish the step and checkpoint ...
            term()  # ... no: stop now
            for _ in range(1000):  # the second handler raises here
                pass

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(config(tmp_path / "run", f"data.path={pngs}", "train.steps=50"), echo=echo).fit()
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / "run" / ".lock").exists() and not list_checkpoints(tmp_path / "run")


def test_a_diverged_loss_stops_training_before_it_is_checkpointed(tmp_path, pngs, capsys):
    """lr=1e30: after one Adam step every weight is ~1e30 and the next loss overflows. Logging is off
    (every 1000 steps), so it is the checkpoint at step 2 that checks the loss, and refuses to save it."""
    run = tmp_path / "run"
    code, out, err = train_cli(["--data", pngs, "--out", run, "--steps", "4", *TINY, "train.lr=1e30",
                                "train.checkpoint_every=2"], capsys)
    assert code == 1, out + err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("train:")]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n"), err  # one line besides the progress bar, and last
    assert lines[0].startswith("error: loss is ") and "at step 2: training diverged; no checkpoint was written for it" in lines[0]
    assert list_checkpoints(run) == [] and not (run / "model").exists() and not (run / ".lock").exists()


# ----------------------------------------------------------------------------- disk


def test_not_enough_disk_space_is_refused_before_anything_is_written(tmp_path, pngs):
    """A model whose checkpoints need more than the disk has: the check uses the real free space, and the
    model is only ever built on the meta device, so this costs nothing."""
    free = shutil.disk_usage(tmp_path).free
    channels = 8 * math.ceil(math.sqrt(free / 50_000) / 8)  # ~2100 c^2 parameters x 16 bytes x 3 > free
    # The model would need gigabytes (a quarter of the disk's free space): this process may take 2 GB more than it
    # has, so building it for real fails with an allocation error instead of the refusal.
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (_data_bytes() + 2 * 2**30, hard))
    try:
        with pytest.raises(UsageError) as info:
            build_trainer(config(tmp_path / "run", f"data.path={pngs}", f"model.channels={channels}"),
                          echo=lambda _: None)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    message = str(info.value)
    assert message.startswith(f"not enough free disk space in {tmp_path / 'run'}: ") and "free some space" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def _data_bytes() -> int:
    """This process's data segment now (VmData: what RLIMIT_DATA limits)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmData:"))
    return int(line.split()[1]) * 1024


def test_a_run_directory_that_cannot_be_made_is_refused(tmp_path, pngs):
    (tmp_path / "file").write_text("a file where a folder should be")
    for out, message in ((tmp_path / "file" / "run", "cannot create run directory"), (tmp_path / "file", "is a file, not a folder")):
        with pytest.raises(UsageError, match=message):
            build_trainer(config(out, f"data.path={pngs}"), echo=lambda _: None)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, pngs):
    """A real failing write: RLIMIT_FSIZE caps the size of any file this process writes, so the kernel fails
    the write of model.safetensors (EFBIG, "File too large") exactly as a full disk fails it with ENOSPC.
    (Tests run as root, where chmod would not stop writes; mounting a small tmpfs needs privileges.)"""
    run = tmp_path / "run"
    args = common(pngs, "train.keep_checkpoints=1")
    fit(run, *args, "train.steps=2")
    before = (ckpt(run, 2) / "model.safetensors").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # model.safetensors is ~1.2 MB
    try:
        with pytest.raises(TrainingError) as info:
            fit(run, *args, "train.steps=4")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert message.startswith(f"cannot write the checkpoint of step 4 in {run / 'checkpoints'} (")
    assert "File too large" in message and f"the last complete checkpoint, {ckpt(run, 2)}, is intact" in message
    assert "\n" not in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # no temp folder left
    assert checkpoint_problem(ckpt(run, 2)) is None and (ckpt(run, 2) / "model.safetensors").read_bytes() == before
    assert not (run / ".lock").exists() and (run / "model" / "model_index.json").is_file()
    printed = fit(run, *args, "train.steps=4")  # with the space back, the same command carries on
    assert "(step 2)" in "\n".join(printed) and [p.name for p in list_checkpoints(run)] == ["step-0000004"]


@pytest.mark.slow
@pytest.mark.parametrize("blocked", ["log.jsonl", "samples"])
def test_a_write_only_the_main_process_does_stops_every_process_with_one_line(blocked, tmp_path, pngs):
    """The log and the preview grids are written by process 0 alone. When that fails, the other process must
    stop too, with its own one-line error, instead of dying in its next collective with a traceback."""
    run = tmp_path / "run"
    (run / blocked).mkdir(parents=True)  # a folder where the file should go, or ...
    if blocked == "samples":
        (run / blocked).rmdir()
        (run / blocked).write_text("")  # ... a file where the folder should go
    proc = run_watched(
        [launcher("torchrun"), "--nproc_per_node", "2", "train.py",
         *TINY, *common(pngs, f"out={run}", "train.steps=4", "train.log_every=2", "train.preview_every=2")],
        timeout=240, env=launch_env(free_port()),
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    what = f"cannot write {run / 'log.jsonl'} at step 2" if blocked == "log.jsonl" else "cannot write preview"
    assert sum(what in line for line in errors) == 1, proc.stderr[-3000:]
    assert sum("stopped at step 2: the main process could not write" in line for line in errors) == 1, proc.stderr[-3000:]
    assert "[rank1]: Traceback" not in proc.stderr and "[rank0]: Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- checks before writing


def train_cli(argv, capsys) -> tuple[int, str, str]:
    code = train_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


BEFORE_WRITING = {
    "GroupNorm cannot split the channels": (["model.channels=20"], "GroupNorm: 20 channels cannot be split into 8 groups"),
    "image size the U-Net cannot halve": (["data.image_size=18", "model.channel_mult=[1,2,2]"], "sample_size 18 is not divisible by 2**2 = 4"),
    "preview steps beyond the schedule": (["diffusion.num_train_timesteps=10", "train.preview_steps=20"],
                                          "train.preview_steps 20 is more than the 10 timesteps the model is trained with"),
    "zero preview steps": (["train.preview_steps=0"], "train.preview_steps must be > 0"),
    "negative batch": (["train.batch_size=-8"], "train.batch_size must be > 0"),
    "wrong type": (["train.checkpoint_every=often"], "train.checkpoint_every must be an integer"),
    "unknown model key": (["model.chanels=16"], "did you mean 'model.channels'?"),
    "resume from another run": (["--resume", "{other}/checkpoints/step-0000002"], "not a checkpoint of this run"),
}


@pytest.mark.parametrize("case", list(BEFORE_WRITING))
def test_mistakes_are_caught_before_the_run_directory_is_written(case, tmp_path, pngs, base_run, capsys):
    argv, message = BEFORE_WRITING[case]
    argv = ["--data", pngs, "--out", tmp_path / "run", "--steps", "2", *TINY, *[a.format(other=base_run) for a in argv]]
    code, out, err = train_cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, out + err
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists()


def test_a_second_trainer_with_another_precision_is_a_usage_error(tmp_path, pngs, base_run):
    build_trainer(config(tmp_path / "first", f"data.path={pngs}"), echo=lambda _: None).close()  # sets precision "no"
    with pytest.raises(UsageError, match=r"train.mixed_precision=bf16 differs from the 'no' an earlier Trainer set in this process"):
        build_trainer(config(tmp_path / "run", f"data.path={pngs}", "train.mixed_precision=bf16"), echo=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_resume_with_another_model_shape_and_no_config_file(run_copy, pngs):
    (run_copy / "config.yaml").unlink()  # the usual config comparison has nothing to compare with
    with pytest.raises(UsageError, match=r"checkpoint .*step-0000004 does not fit the configured model \(.*size mismatch"):
        build_trainer(config(run_copy, f"data.path={pngs}", "model.channels=32"), echo=lambda _: None)
    assert not (run_copy / ".lock").exists()


# ----------------------------------------------------------------------------- hostile data


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path) -> None:
    """A 100 000 x 100 000 PNG in a few bytes: the header is all a decompression bomb needs to be caught."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + png_chunk(b"IEND", b""))


def mixed_folder(root: Path) -> tuple[Path, list[str]]:
    """Good images in every awkward format, and bad files; returns the folder and the bad names."""
    write_pngs(root, 8)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)).save(root / "tiny.png")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(root / "sixteen-bit.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("P").save(root / "palette.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.new("RGBA", (20, 20), (255, 0, 0, 100)).save(root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (30, 20), (0, 200, 0)).save(root / "rotated.jpg", exif=exif)
    big = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(root / "cut.png")
    truncate(root / "cut.png")
    Image.fromarray(big).save(root / "cut.jpg", quality=95)
    truncate(root / "cut.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "words.png").write_text("I am a text file with an image's name")
    bomb_png(root / "bomb.png")
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "loop")  # sub/loop -> root -> sub -> ...
    return root, ["bomb.png", "cut.jpg", "cut.png", "empty.jpg", "words.png"]


def test_train_over_a_folder_of_good_and_bad_files(tmp_path, capsys):
    folder, bad = mixed_folder(tmp_path / "mixed")
    code, out, err = train_cli(["--data", folder, "--out", tmp_path / "run", "--steps", "1", *TINY], capsys)
    assert code == 0, out + err
    skips = [line for line in out.splitlines() if line.startswith("skipping ")]
    assert sorted(Path(line.split(":")[0].removeprefix("skipping ")).name for line in skips) == bad
    reasons = {Path(line.split(":")[0].removeprefix("skipping ")).name: line for line in skips}
    assert "decompression bomb" in reasons["bomb.png"] and "empty file (0 bytes)" in reasons["empty.jpg"]
    assert "truncated" in reasons["cut.png"] and "truncated" in reasons["cut.jpg"]
    assert "not an image file" in reasons["words.png"]
    assert f"skipped 5 of 19 files in {folder}" in out.splitlines()
    assert f"data:      {folder}: 14 images, 5 skipped" in out
    assert "Traceback" not in out + err


# ----------------------------------------------------------------------------- hostile model folders


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipe") / "good"
    DDPMPipeline(unet=UNet(**SMALL), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
BROKEN_MODELS = {  # name: (damage, the file the message names, what it says)
    "no weights": (lambda f: (f / WEIGHTS).unlink(), "unet", "has no .safetensors weights"),
    "no unet config": (lambda f: (f / "unet" / "config.json").unlink(), "", "unet/config.json is missing"),
    "no scheduler": (lambda f: shutil.rmtree(f / "scheduler"), "", "scheduler/scheduler_config.json is missing"),
    "no model index": (lambda f: (f / "model_index.json").unlink(), "", "is not a model"),
    "config not JSON": (lambda f: (f / "unet" / "config.json").write_text("{channels: 16"), "unet/config.json", "cannot read"),
    "unknown config field": (lambda f: edit_json(f / "unet" / "config.json", chanels=16), "unet/config.json",
                             "unknown field 'chanels' (did you mean 'channels'?)"),
    "wrong-typed config field": (lambda f: edit_json(f / "unet" / "config.json", channels="wide"), "unet/config.json",
                                 "field 'channels' is 'wide', which is not an integer"),
    "wrong-typed list field": (lambda f: edit_json(f / "unet" / "config.json", channel_mult=[1, "x"]), "unet/config.json",
                               "field 'channel_mult' is [1, 'x']"),
    "unbuildable config": (lambda f: edit_json(f / "unet" / "config.json", norm_groups=5), "unet/config.json",
                           "describes no buildable UNet: GroupNorm: 16 channels cannot be split into 5 groups"),
    "weights of another shape": (lambda f: edit_json(f / "unet" / "config.json", channels=32), WEIGHTS,
                                 "does not match"),
    "weights missing tensors": (lambda f: edit_json(f / "unet" / "config.json", num_res_blocks=2), WEIGHTS,
                                "tensor(s) missing"),
    "weights truncated": (lambda f: truncate(f / WEIGHTS), WEIGHTS, "is truncated"),
    "weights not safetensors": (lambda f: (f / WEIGHTS).write_bytes(os.urandom(4000)), WEIGHTS, "not a safetensors file"),
}


def sample_cli(argv, capsys) -> tuple[int, str, str]:
    code = sample_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_a_broken_model_folder_is_one_error_line_naming_the_file(case, pipeline, tmp_path, capsys):
    damage, named, message = BROKEN_MODELS[case]
    folder = Path(shutil.copytree(pipeline, tmp_path / "model"))
    damage(folder)
    code, out, err = sample_cli(["--model", folder, "-n", 2, "--steps", 2, "--out", tmp_path / "out"], capsys)
    assert code == 2, out + err
    assert err.startswith("error: ") and str(folder / named) in err and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in out + err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- no code from model files


def test_no_loading_path_runs_code_from_a_pickle(pipeline, tmp_path, capsys, base_run, pngs):
    marker = tmp_path / "marker"
    # The planted file is a real attack: loading it the unsafe way runs its code.
    plant_pickle(tmp_path / "probe.bin", marker)
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()

    folder = Path(shutil.copytree(pipeline, tmp_path / "model"))
    (folder / WEIGHTS).unlink()
    plant_pickle(folder / "unet" / "diffusion_pytorch_model.bin", marker)

    code, _, err = sample_cli(["--model", folder, "-n", 1, "--steps", 2, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "diffusion_pytorch_model.bin: pickle files" in err and err.count("\n") == 1, err
    with pytest.raises(FileNotFoundError, match=r"no .safetensors weights \(it has diffusion_pytorch_model.bin: pickle files"):
        UNet.from_pretrained(folder / "unet")
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        UNet.from_pretrained(folder, subfolder="unet")
    with pytest.raises(ValueError, match="safetensors weights only"):
        UNet.from_pretrained(folder / "unet", use_safetensors=False)

    run = Path(shutil.copytree(base_run, tmp_path / "run"))
    shutil.rmtree(ckpt(run, 2))
    plant_pickle(ckpt(run, 4) / "optimizer.pt", marker, wrap=True)
    code, _, err = train_cli(["--data", pngs, "--out", run, "--steps", "6", "--resume-anyway", *TINY], capsys)
    assert code == 2 and "cannot resume" in err and "Weights only load failed" in err and err.count("\n") == 1, err
    assert not marker.exists()


# ----------------------------------------------------------------------------- real kills


def launch(run: Path, data: Path, log: Path) -> subprocess.Popen:
    """`python train.py` for 15 steps, checkpointing every 3, output to ``log``."""
    argv = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--out", str(run), "--steps", "15", *TINY,
            "train.log_every=1", "train.checkpoint_every=3", "train.keep_checkpoints=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=run.parent)


def logged_steps(run: Path) -> list[int]:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]  # not a line cut off mid-write


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 90):
    """Poll tightly (a checkpoint is on disk under its temporary name for well under a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.001)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def resumed_step(output: str) -> int:
    line = next(line for line in output.splitlines() if "run dir:" in line)
    return int(line.rsplit("(step ", 1)[1].rstrip(")")) if "resumed from" in line else 0


@pytest.mark.slow
def test_killed_runs_resume_to_the_end(tmp_path, pngs):
    """A 15-step run (checkpoint every 3) is stopped four times and resumed each time with the same command:
    SIGTERM (a clean stop), SIGKILL right after a logged step, SIGKILL while a checkpoint is being written;
    then it runs to the end. No damaged checkpoint is ever chosen and no kill loses more than one
    checkpoint interval of work."""
    run = tmp_path / "run"
    outputs = [tmp_path / f"out{i}.txt" for i in range(4)]

    # 1. SIGTERM after step 4 is logged: finishes its step, checkpoints it, exits 0 with a clear message.
    proc = launch(run, pngs, outputs[0])
    wait_for(lambda: any(s >= 4 for s in logged_steps(run)), proc, "step 4 was logged")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, outputs[0].read_text()
    text = outputs[0].read_text()
    stopped = int(text.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert f"stopped by signal 15 at step {stopped}; checkpoint saved, resume with the same command" in text
    assert stopped >= 4 and checkpoint_problem(ckpt(run, stopped)) is None and not (run / ".lock").exists()

    # 2. SIGKILL right after a step between checkpoints is logged.
    proc = launch(run, pngs, outputs[1])
    target = wait_for(lambda: next((s for s in logged_steps(run) if s > stopped + 1 and s % 3), None), proc, "a step between checkpoints")
    proc.kill()
    proc.wait()
    complete = latest_checkpoint(run)
    assert resumed_step(outputs[1].read_text()) == stopped
    assert target - int(complete.name[5:]) <= 3  # lost at most one checkpoint interval

    # 3. SIGKILL while a checkpoint is being written (its temporary folder exists).
    proc = launch(run, pngs, outputs[2])
    tmp = wait_for(lambda: next(iter((run / "checkpoints").glob(".step-*.tmp")), None), proc, "a checkpoint being written")
    proc.kill()
    proc.wait()
    text = outputs[2].read_text()
    assert f"warning: {run / '.lock'} was left by pid" in text  # the killed run's lock, taken over
    assert resumed_step(text) == int(complete.name[5:])  # it resumed from the newest complete checkpoint
    complete = latest_checkpoint(run)
    being_written = int(tmp.name[6:13])
    assert being_written - int(complete.name[5:]) <= 3
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(run))  # the cut-short one has no final name

    # 4. Run to the end.
    proc = launch(run, pngs, outputs[3])
    assert proc.wait(timeout=120) == 0, outputs[3].read_text()
    text = outputs[3].read_text()
    assert resumed_step(text) == int(complete.name[5:])
    assert "warning: removed what an interrupted run left half-written" in text and tmp.name in text
    assert json.loads((ckpt(run, 15) / "state.json").read_text())["step"] == 15
    assert logged_steps(run) == list(range(1, 16))  # every step once: work lost to a kill is logged once, when redone
    assert [p.name for p in list_checkpoints(run)] == ["step-0000012", "step-0000015"]
    assert not (run / ".lock").exists() and not list(run.glob(".model*")) and not list(run.glob("checkpoints/.*"))
    assert (run / "model" / "model_index.json").is_file()


# ----------------------------------------------------------------------------- runs that cannot silently go wrong


def flip_a_bit(file: Path) -> None:
    """Change one bit near the end of a file (inside the tensor data): the length, the header and the zip
    directory stay whole, so only a content checksum can tell."""
    data = bytearray(file.read_bytes())
    data[len(data) - 64] ^= 0x10
    file.write_bytes(bytes(data))


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory (but its lock), to show a refusal changed nothing."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_the_readme_default_out_refuses_another_dataset_of_the_same_folder_name(tmp_path, monkeypatch, capsys):
    """`--data cifar10/train` and `--data other/train` both default to runs/train: the second must not continue
    the first run's weights. Refused in one line naming what differs and both ways on, with nothing written;
    --resume-anyway continues deliberately."""
    monkeypatch.chdir(tmp_path)
    first, second = write_pngs(tmp_path / "cifar10" / "train", 32), write_pngs(tmp_path / "other" / "train", 30, seed=1)
    assert train_cli(["--data", first, "--steps", "2", *TINY], capsys)[0] == 0
    run = tmp_path / "runs" / "train"
    before = snapshot(run)
    code, out, err = train_cli(["--data", second, "--steps", "4", *TINY], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in out + err, out + err
    assert f"data.source: {first} -> {second}" in err and "data.listing: 32 files, sha256 " in err and "-> 30 files" in err
    assert "another --out" in err and "--resume-anyway" in err
    assert snapshot(run) == before  # no log trimmed, no config or identity rewritten

    code, out, err = train_cli(["--data", second, "--steps", "4", "--resume-anyway", *TINY], capsys)
    assert code == 0, err
    assert "warning: --resume-anyway" in out and "(step 2)" in out
    assert json.loads((run / "identity.json").read_text())["data.source"] == str(second)  # the new identity is recorded


@pytest.mark.parametrize("change", ["diffusion.prediction_type=epsilon", "diffusion.beta_schedule=linear",
                                    "diffusion.num_train_timesteps=500", "data.random_flip=false", "train.seed=5"])
def test_a_resume_that_changes_what_is_learned_is_refused(change, run_copy, pngs):
    key = change.split("=")[0]
    with pytest.raises(UsageError, match=rf"cannot resume .*: it was trained with other data or settings \({key}: ") as info:
        build_trainer(config(run_copy, *common(pngs, "train.steps=6", change)), echo=lambda _: None)
    assert "\n" not in str(info.value) and not (run_copy / ".lock").exists()
    # What may change on resume (the end, the learning rate, clipping, checkpointing) still resumes.
    trainer = build_trainer(config(run_copy, *common(pngs, "train.steps=6", "train.lr=1e-4", "train.grad_clip=0.5")),
                            echo=lambda _: None)
    trainer.close()
    assert trainer.step == 4


def test_a_run_whose_checkpoints_were_deleted_is_not_started_over_unasked(run_copy, pngs, capsys):
    """Deleting checkpoints to save space must not make the same command start over, wiping the log and
    replacing the finished model at its first checkpoint. --start-over does so when asked."""
    shutil.rmtree(run_copy / "checkpoints")
    before = snapshot(run_copy)
    argv = ["--data", pngs, "--out", run_copy, "--steps", "2", *TINY, "train.checkpoint_every=2"]
    code, out, err = train_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in out + err, err
    assert "holds earlier training (the exported model model/ and log.jsonl up to step 4)" in err and "--start-over" in err
    assert snapshot(run_copy) == before
    shutil.rmtree(run_copy / "model")  # the log alone says checkpoints were written
    code, _, err = train_cli(argv, capsys)
    assert code == 2 and "holds earlier training (log.jsonl up to step 4)" in err and snapshot(run_copy) != before

    code, out, err = train_cli([*argv, "--start-over"], capsys)
    assert code == 0, err
    assert "note: --start-over: removed samples, log.jsonl, identity.json" in out and "(new run)" in out
    assert [r["step"] for r in read_log(run_copy)] == [2] and [p.name for p in list_checkpoints(run_copy)] == ["step-0000002"]


def test_a_run_killed_before_its_first_checkpoint_simply_starts_again(tmp_path, pngs):
    """Steps logged before the first checkpoint are work a crash lost: the same command (or an elastic
    restart) starts again from step 0 without asking, and the log keeps each step once."""
    run = tmp_path / "run"
    build_trainer(config(run, f"data.path={pngs}", "train.steps=3", "train.checkpoint_every=5"), echo=lambda _: None).close()
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    printed = fit(run, f"data.path={pngs}", "train.steps=2", "train.checkpoint_every=5", "train.log_every=1")
    assert any("dropped 3 record(s) past step 0" in m for m in printed)
    assert [r["step"] for r in read_log(run)] == [1, 2]


def test_checkpoints_and_the_model_carry_checksums_sha256sum_can_check(base_run):
    for folder in (ckpt(base_run, 4), ckpt(base_run, 4) / "ema", base_run / "model"):
        listed = [line.split("  ")[1] for line in (folder / "SHA256SUMS").read_text().splitlines()]
        assert "model_index.json" in listed or "state.json" in listed
        assert not any(name.startswith("ema/") for name in listed)  # ema/ has sums of its own
        if shutil.which("sha256sum"):
            check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
    assert {"model.safetensors", "optimizer.pt", "rng-0.pt", "state.json"} <= {
        line.split("  ")[1] for line in (ckpt(base_run, 4) / "SHA256SUMS").read_text().splitlines()}


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt", "ema/unet/diffusion_pytorch_model.safetensors"])
def test_a_bit_flipped_checkpoint_falls_back_with_one_line_naming_the_file(file, run_copy, pngs):
    flip_a_bit(ckpt(run_copy, 4) / file)
    assert checkpoint_problem(ckpt(run_copy, 4)) is None  # whole by every structural check
    printed = []
    trainer = build_trainer(config(run_copy, *common(pngs, "train.steps=4")), echo=printed.append)
    trainer.close()
    warnings = [m for m in printed if m.startswith("warning: cannot load")]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"{ckpt(run_copy, 4)} ({file} does not match its SHA-256 in SHA256SUMS: the file is damaged)" in warnings[0]
    assert trainer.resumed_from == ckpt(run_copy, 2) and trainer.step == 2


def test_a_bit_flipped_exported_model_is_one_line_exit_2(base_run, tmp_path, capsys):
    model = Path(shutil.copytree(base_run / "model", tmp_path / "model"))
    flip_a_bit(model / WEIGHTS)
    code, out, err = sample_cli(["--model", model, "-n", 1, "--steps", 2, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in out + err, err
    assert f"{model}/{WEIGHTS} does not match its SHA-256 in SHA256SUMS: the file is damaged" in err
    assert not (tmp_path / "out").exists()


class Recorder:
    """An in-training evaluator of one's own (the Trainer's documented protocol): it records the steps it ran
    at, and sends this process SIGTERM the first time, as a preemption during an evaluation would."""

    def __init__(self, every: int):
        self.every, self.steps, self.trainer = every, [], None

    def __call__(self, model, scheduler_config, **_context):
        from resdiff.quality import Evaluation

        self.steps.append(self.trainer.step)
        if len(self.steps) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return Evaluation({"probe": 1.0}, images=1)


def test_a_signal_checkpoints_first_and_skips_previews_and_evaluations(tmp_path, pngs):
    """A SIGTERM during step 1's evaluation: step 2 is trained, checkpointed and the run stops; neither the
    preview nor the evaluation of the stopping step runs (a launcher kills ~30 s after SIGTERM)."""
    run = tmp_path / "run"
    trainer = build_trainer(config(run, f"data.path={pngs}", "train.steps=50", "train.preview_every=1"), echo=lambda _: None)
    trainer.evaluator = recorder = Recorder(every=1)
    recorder.trainer = trainer
    trainer.fit()
    assert recorder.steps == [1]
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000001.png"]


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path, pngs):
    """accelerate gives CPU runs no GradScaler (fp16 autocast is a GPU feature there), so a real
    torch.amp.GradScaler is put where accelerate keeps it, moved off its defaults by a real overflow, and must
    come back from the checkpoint through Trainer.state, RunDir and Trainer.load_state."""
    trainer = build_trainer(config(tmp_path / "run", f"data.path={pngs}", "train.steps=2"), echo=lambda _: None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for value in (1.0, float("inf"), 1.0):  # a finite step, an overflow (the scale backs off), a finite step
        optimizer.zero_grad()
        scaler.scale((weight * value).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0**11 and saved["_growth_tracker"] == 1
    trainer.accelerator.scaler = scaler
    path = trainer.save_checkpoint()
    trainer.close()

    again = build_trainer(config(tmp_path / "run", f"data.path={pngs}", "train.steps=2"), echo=lambda _: None)
    again.accelerator.scaler = torch.amp.GradScaler("cpu")
    again.load_state(path, *again.run.load_checkpoint(path, rank=0, world=1, device=torch.device("cpu")))
    again.close()
    assert again.accelerator.scaler.state_dict() == saved


def torchrun_train(run: Path, data: Path, steps: int, *extra: str) -> list[str]:
    """The README's two-process line for train.py."""
    return [launcher("torchrun"), "--nproc_per_node", "2", "train.py", "--data", str(data), "--out", str(run),
            "--steps", str(steps), "--batch-size", "8", *TINY, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_signal_stops_within_one_step_checkpoint_first(processes, tmp_path, pngs):
    """SIGTERM to `python train.py`, or to torchrun (what Kubernetes and SLURM signal) while two processes
    train: they agree to stop at the step the signal arrived in, checkpoint it, draw no preview, and exit."""
    run = tmp_path / "run"
    extra = ("train.log_every=1", "train.checkpoint_every=1000", "train.preview_every=1000")
    cmd = torchrun_train(run, pngs, 400, *extra)
    if processes == 1:
        cmd = [sys.executable, *cmd[cmd.index("train.py"):]]

    def on_start(proc):
        deadline = time.monotonic() + 150
        while not any(s >= 3 for s in logged_steps(run)):
            assert time.monotonic() < deadline and proc.poll() is None, "the run never reached step 3"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)

    done = run_watched(cmd, timeout=240, env=launch_env(free_port(), PYTHONPATH=str(ROOT)), on_start=on_start)
    text = done.stdout + done.stderr
    assert processes == 2 or done.returncode == 0, text[-3000:]
    arrived = int(text.split("signal 15: finishing step ")[1].split(",")[0])  # rank 0's handler
    stopped = int(text.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert arrived - 1 <= stopped <= arrived, text[-3000:]
    assert [p.name for p in list_checkpoints(run)] == [f"step-{stopped:07d}"]
    assert checkpoint_problem(ckpt(run, stopped)) is None and logged_steps(run)[-1] == stopped
    assert not (run / "samples").exists()  # no preview before (or instead of) the checkpoint


@pytest.mark.slow
def test_resume_on_another_number_of_processes_continues_the_same_data(tmp_path, pngs):
    """Steps 1-2 on two processes (torchrun), 3-4 on one, 5-6 on two again, global batch 8 throughout: each
    resume loads, says so, and continues at the same place of the same epoch's order, as a straight run would
    ((epoch, batch) (0, 2), (0, 4), then (1, 2): 32 images are 4 batches per epoch)."""
    run = tmp_path / "run"
    extra = ("train.log_every=1", "train.checkpoint_every=2")
    one = [sys.executable, "train.py", "--data", str(pngs), "--out", str(run), "--steps", "4", "--batch-size", "8", *TINY, *extra]
    outputs = []
    for cmd in (torchrun_train(run, pngs, 2, *extra), one, torchrun_train(run, pngs, 6, *extra)):
        done = run_watched(cmd, timeout=240, env=launch_env(free_port(), PYTHONPATH=str(ROOT)))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    assert "resuming on 1; training continues at the same place in the data" in outputs[1]
    assert "written by 1 process(es), resuming on 2; training continues at the same place in the data" in outputs[2]
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and [r["world_size"] for r in log] == [2, 2, 1, 1, 2, 2]
    positions = {s: json.loads((ckpt(run, s) / "state.json").read_text()) for s in (4, 6)}
    assert (positions[4]["epoch"], positions[4]["batch"], positions[4]["world_size"]) == (0, 4, 1)
    assert (positions[6]["epoch"], positions[6]["batch"], positions[6]["world_size"]) == (1, 2, 2)
