"""Prepared datasets: python -m resdiff.prepare, PreparedImages, and training from them."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from resdiff.autoencoder import LatentNorm, load_autoencoder
from resdiff.batches import ShardedBatches
from resdiff.data import ImageFolder, to_model_range
from resdiff.errors import UsageError
from resdiff.files import cache_root
from resdiff.prepare import PreparedImages, latent_cache, main as prepare_main, prepare, prepare_latents
from launch import free_port, launch_env, launcher, run_watched
from tiny_models import tiny_autoencoder
from tiny_runs import ROOT, TINY, fit, write_pngs


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """40 random 20x30 PNGs in two class folders, plus two files training cannot read."""
    root = tmp_path_factory.mktemp("data") / "pics"
    rng = np.random.default_rng(0)
    for i in range(40):
        sub = root / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(sub / f"p{i:02d}.png")
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, folder) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "pics16x8"
    prepare(folder, out, (16, 8), 3, class_cond=True, warn=lambda _m: None)
    return out


def test_prepared_images_equal_the_folder_and_unreadable_files_are_named_and_skipped(tmp_path, folder):
    warned: list[str] = []
    data = prepare(folder, tmp_path / "out", (16, 8), 3, class_cond=True, warn=warned.append,
                   shard_bytes=7 * 3 * 16 * 8)  # 7 images per shard: 6 shards, the last one short
    assert sorted(p.name for p in (tmp_path / "out").glob("images-*.npy")) == [f"images-0000{k}.npy" for k in range(6)]
    assert [w for w in warned if w.startswith("skipping")] == [
        f"skipping {folder / 'cats' / 'broken.png'}: " + next(w for w in warned if "broken" in w).split(": ", 1)[1],
        f"skipping {folder / 'dogs' / 'empty.jpg'}: empty file (0 bytes)",
    ]
    assert warned[-1] == f"skipped 2 of 42 files in {folder}"
    assert [p.name for p, _ in data.skipped] == ["broken.png", "empty.jpg"]
    reference = ImageFolder(folder, (16, 8), 3, class_cond=True, warn=lambda _m: None)
    assert data.files == reference.files and data.labels == reference.labels and data.classes == ["cats", "dogs"]
    assert all(torch.equal(data[i][0], reference[i][0]) for i in range(len(data)))
    assert data[0][0].shape == (3, 16, 8) and data[0][0].dtype == torch.uint8
    # Plain NumPy reads every shard: a prepared dataset is usable without resdiff.
    assert sum(len(np.load(p, mmap_mode="r")) for p in (tmp_path / "out").glob("images-*.npy")) == 40


def test_prepared_and_folder_give_identical_batches_for_the_same_seed(folder, prepared):
    """The same seed gives the same batches, flips included, from the folder and from its prepared dataset."""
    sources = [ImageFolder(folder, (16, 8), class_cond=True, warn=lambda _m: None),
               PreparedImages(prepared, (16, 8), 3)]
    drawn = []
    for dataset in sources:
        torch.manual_seed(5)
        batches = iter(ShardedBatches(dataset, 4, 1, 2, seed=3, loader_kwargs={}, flip=True))
        drawn.append([next(batches) for _ in range(7)])  # over an epoch boundary (5 batches per epoch)
    for (xa, la), (xb, lb) in zip(*drawn):
        assert torch.equal(xa, xb) and torch.equal(la, lb)


def test_training_from_a_prepared_dataset_resumes_bitwise(tmp_path, prepared):
    common = [f"data.path={prepared}", "data.image_size=16x8", "data.class_cond=true", "train.checkpoint_every=3",
              "train.batch_size=8", "train.log_every=1", "data.num_workers=auto"]
    printed = fit(tmp_path / "straight", *common, "train.steps=6")
    assert f"prepared, memory-mapped from {prepared}" in printed[0]
    assert "0 worker process(es) (auto: the images are prepared" in printed[0]
    fit(tmp_path / "split", *common, "train.steps=3")
    fit(tmp_path / "split", *common, "train.steps=6")
    a, b = (tmp_path / run / "checkpoints" / "step-0000006" / "model.safetensors" for run in ("straight", "split"))
    x, y = load_file(a), load_file(b)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_the_cli_prepares_with_a_config_and_flags(tmp_path, folder, capsys):
    prepare_main([str(folder), str(tmp_path / "out"), "--config", "cifar10",
                  "--image-size", "8x12", "--channels", "1"])
    said = capsys.readouterr().out
    assert "prepared 40 images, 2 skipped at 8x12, 1 channel(s)" in said and "data.image_size=8x12" in said
    data = PreparedImages(tmp_path / "out")
    assert data[3][0].shape == (1, 8, 12) and data.classes == []
    with pytest.raises(UsageError, match="already exists"):
        prepare_main([str(folder), str(tmp_path / "out")])
    with pytest.raises(UsageError, match=r"was prepared at 8x12, but data.image_size is 16; set data.image_size=8x12"):
        PreparedImages(tmp_path / "out", 16, 1)
    with pytest.raises(UsageError, match="data.random_crop needs the image folder"):
        fit(tmp_path / "run", f"data.path={tmp_path / 'out'}", "data.image_size=8x12", "data.image_channels=1",
            "data.random_crop=true")
    with pytest.raises(UsageError, match="was prepared without classes, but data.class_cond is true"):
        fit(tmp_path / "run", f"data.path={tmp_path / 'out'}", "data.image_size=8x12", "data.image_channels=1",
            "data.class_cond=true")


def _damage(root: Path, how: str) -> Path:
    """Damage one file of a prepared dataset; returns the file."""
    shard = root / "images-00000.npy"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
        return shard
    if how == "header":
        data = bytearray(shard.read_bytes())
        data[:6] = b"garbag"
        shard.write_bytes(bytes(data))
        return shard
    if how == "labels":
        (root / "labels.npy").write_bytes((root / "labels.npy").read_bytes()[:40])
        return root / "labels.npy"
    index = root / "index.json"
    index.write_text(index.read_text()[:-30])
    return index


@pytest.mark.parametrize("how", ["truncated", "header", "labels", "index"])
def test_a_damaged_prepared_dataset_is_one_error_line_naming_the_file(tmp_path, folder, how):
    out = tmp_path / "out"
    prepare(folder, out, 8, 3, warn=lambda _m: None)
    bad = _damage(out, how)
    with pytest.raises(UsageError, match=f"prepared dataset file {bad} is"):
        PreparedImages(out, 8, 3)
    if how == "truncated":  # through the real script: one line, exit code 2
        proc = subprocess.run(
            [sys.executable, "train.py", "--data", str(out), "--out", str(tmp_path / "run"), *TINY, "data.image_size=8"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: prepared dataset file {bad} is ") and "truncated" in lines[0]


HELPER = '''
"""Under torchrun: train one epoch from a prepared dataset, read all of it, and report the indices this process
loaded and how much of the mapped shard is in its memory, and shared."""
import json, sys
from pathlib import Path

import torch

from resdiff.config import load_config
from resdiff.build import build_trainer, model_keys
from tiny_runs import Seen  # tests/ is on PYTHONPATH


def mapping(name):
    """Rss and Pss (kB) of the mapping of the file ``name`` in this process (/proc/self/smaps)."""
    found, sizes = False, {}
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[0].isupper():  # a mapping's header line: address range, ..., path
            found = line.rstrip().endswith(name)
        elif found and line.split(":")[0] in ("Rss", "Pss"):
            key, value = line.split(":")
            sizes[key] = sizes.get(key, 0) + int(value.split()[0])
    return sizes


out = Path(sys.argv[1])
trainer = build_trainer(load_config(None, sys.argv[2:], model_keys=model_keys()))
data, acc = trainer.batches.dataset, trainer.accelerator
total = sum(int(data[i][0].sum()) for i in range(len(data)))  # every page of the map, in both processes
acc.wait_for_everyone()
sizes = mapping("images-00000.npy")  # both processes hold the whole map now
acc.wait_for_everyone()
trainer.batches.dataset = seen = Seen(data)
trainer.fit()  # ends the process group
(out / f"seen{trainer.rank}.json").write_text(json.dumps({"indices": seen.indices, "total": total, **sizes}))
'''


@pytest.mark.slow
def test_two_processes_read_disjoint_slices_of_one_shared_map(tmp_path):
    """torchrun, two CPU processes, one epoch of a prepared dataset: each loads its own half, together every image
    once; after both read all of it, each maps the whole shard but owns only half of it (Pss), because the
    pages are the page cache's, shared, not private copies."""
    pngs = write_pngs(tmp_path / "pngs", 64, size=64)
    out = tmp_path / "prepared"
    prepare(pngs, out, 64, 3, warn=lambda _m: None)  # 64 images x 12 KiB: 768 KiB, 192 pages
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    cmd = [launcher("torchrun"), "--nproc_per_node", "2", str(helper), str(tmp_path), *TINY, f"data.path={out}",
           "data.image_size=64", "model.channel_mult=[1, 2]", "model.attention_resolutions=[]", "train.steps=8",
           f"out={tmp_path / 'run'}"]
    proc = run_watched(cmd, timeout=300, env=launch_env(free_port(), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}"))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]["indices"]) == len(seen[1]["indices"]) == 32  # 8 steps x 4 per process: one epoch
    assert sorted(seen[0]["indices"] + seen[1]["indices"]) == list(range(64))
    assert seen[0]["total"] == seen[1]["total"]
    file_kb = (out / "images-00000.npy").stat().st_size / 1024
    for s in seen:
        assert s["Rss"] >= 0.9 * file_kb, s  # the whole shard is mapped into each process
        assert s["Pss"] <= 0.6 * s["Rss"], s  # and each owns about half of it: one copy, shared by two


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs) at tmp_path/disk; skipped where mounting one is not allowed (not root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _prepare_cli(folder: Path, out: Path, size: str) -> subprocess.CompletedProcess:
    """`python -m resdiff.prepare` as a user runs it, with at most 4 GB of address space (so a check that is
    missing fails fast instead of filling memory)."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    return subprocess.run([sys.executable, "-m", "resdiff.prepare", str(folder), str(out), "--image-size", size],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=cap,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_disk_without_room_is_one_line_and_leaves_nothing(small_disk, folder):
    """42 image files at 160x160 (3 MB of shards) on a 2 MB disk: refused before anything is written. Without
    the check the memory-mapped shards die with SIGBUS and leave a hidden temporary folder."""
    proc = _prepare_cli(folder, small_disk / "data" / "pics", "160")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: not enough free disk space for {small_disk / 'data' / 'pics'}: ")
    assert "42 image files at 160x160, 3 channel(s) take about 3.3 MB" in proc.stderr and proc.stderr.count("\n") == 1
    assert list(small_disk.iterdir()) == []
    assert _prepare_cli(folder, small_disk / "data" / "pics", "64").returncode == 0  # 42 x 12 KB fit


def test_a_dataset_larger_than_the_free_space_is_refused_before_decoding(tmp_path, folder):
    """The same check on the real disk, where no small one can be mounted: an image size whose shards exceed
    the free space (decoding even one such image would take more memory than the process is allowed)."""
    side = math.isqrt(shutil.disk_usage(tmp_path).free // (40 * 3)) + 64
    proc = _prepare_cli(folder, tmp_path / "pics", str(side))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: not enough free disk space for {tmp_path / 'pics'}: ")
    assert list(tmp_path.iterdir()) == []


FILL_AFTER_CHECK = """
import sys
from pathlib import Path
from resdiff.errors import UsageError
from resdiff.prepare import prepare
folder, disk = Path(sys.argv[1]), Path(sys.argv[2])

def fill(message):  # the first warning comes after the free-space check, before the first shard
    filler = disk / "filler"
    if not filler.exists():
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(4096))
            except OSError:
                f.truncate(f.tell() - 65536)  # leave 64 KB: room for a shard's header and last page, not its images

try:
    prepare(folder, disk / "pics", 64, warn=fill)
except UsageError as err:
    print(err)
"""


def test_a_disk_that_fills_up_while_preparing_is_one_line_and_leaves_nothing(small_disk, folder):
    """Another job fills the disk after the check passed: the shard's blocks are reserved when it is created, so
    this is an error to report, not SIGBUS in a write to the memory map, and the temporary folder goes."""
    proc = subprocess.run([sys.executable, "-c", FILL_AFTER_CHECK, str(folder), str(small_disk)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == (f"cannot write the prepared dataset {small_disk / 'pics'} (No space left on device); "
                           "nothing was kept; free some space there or choose another OUT\n")
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


# ----------------------------------------------------------------------------- latent datasets


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory) -> Path:
    """A random diffusers AutoencoderTiny (8x, 4 latent channels) saved to a folder: an autoencoder SPEC."""
    return tiny_autoencoder("tiny", tmp_path_factory.mktemp("ae") / "tiny")


def _latent_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_a_latent_dataset_holds_the_latents_of_the_images_and_of_their_mirror_images(tmp_path, folder, tiny_ae):
    warned: list[str] = []
    data = prepare_latents(folder, tmp_path / "out", (16, 32), tiny_ae, class_cond=True, warn=warned.append,
                           shard_bytes=7 * 4 * 2 * 4 * 2, progress=False)  # 7 latents (4, 2, 4) per shard: 6 shards
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", "labels.npy", *(f"{kind}-0000{k}.npy" for kind in ("images", "flipped") for k in range(6))])
    assert warned[-1] == f"skipped 2 of 42 files in {folder}"
    reference = ImageFolder(folder, (16, 32), 3, class_cond=True, warn=lambda _m: None)
    assert data.files == reference.files and data.labels == reference.labels and data.classes == ["cats", "dogs"]
    assert (data.shape, data.channels, data.item_shape, data.dtype) == ((16, 32), 3, (4, 2, 4), np.float16)
    shard = np.load(out / "images-00000.npy", mmap_mode="r")
    assert shard.dtype == np.float16 and shard.shape == (7, 4, 2, 4)  # plain NumPy reads it

    ae = load_autoencoder(tiny_ae)
    pixels = torch.stack([to_model_range(reference[i][0]) for i in range(len(reference))])
    latents, mirrored = ae.encode_many(pixels), ae.encode_many(pixels.flip(3))
    x, label = data[5]
    assert x.dtype == torch.float16 and x.shape == (4, 2, 4) and label == reference.labels[5]
    assert all(torch.equal(data.stored(i), latents[i].half()) for i in range(len(data)))
    assert all(torch.equal(data.stored(i, flipped=True), mirrored[i].half()) for i in range(len(data)))

    index = json.loads((out / "index.json").read_text())
    record = index["latent"]
    assert index["version"] == 2 and record["shape"] == [4, 2, 4] and record["dtype"] == "float16"
    assert record["autoencoder"] == ae.record() == data.autoencoder and record["autoencoder"]["spec"] == str(tiny_ae)
    assert [s["count"] for s in record["flips"]["shards"]] == [s["count"] for s in index["shards"]]
    rule = "row i of flipped-K.npy is the latent of the mirrored image of row i of images-K.npy"
    assert rule in record["flips"]["rule"]
    # The normalisation training uses: a diffusers autoencoder's own (its pipelines apply it, so the model exports
    # as one); the one measured over every stored latent, mirror images included, in float64, is kept beside it.
    assert record["norm"]["use"] == "autoencoder" and data.norm == ae.own_norm
    measured = LatentNorm.from_dict(record["norm"]["data"])
    stored = torch.cat([latents.half(), mirrored.half()]).double().transpose(0, 1).reshape(4, -1)
    np.testing.assert_allclose(measured.shift, stored.mean(1), rtol=1e-10)
    np.testing.assert_allclose(measured.scale, stored.std(1, unbiased=False), rtol=1e-10)
    assert LatentNorm.from_dict(record["norm"]["autoencoder"]) == ae.own_norm
    assert data.mode.startswith(f"prepared latents of {tiny_ae}, memory-mapped from {out}")

    assert torch.equal(data.flipped(0)[0], data.stored(0, flipped=True)) and data.flipped(0)[1] == data[0][1]
    from resdiff.batches import ShardedBatches

    latents, _ = next(iter(ShardedBatches(data, len(data), 0, 1, 0, {}, flip=True)))  # the batches choose the flips
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    kinds = {torch.equal(x, data.stored(i, flipped=True)) for x, i in zip(latents, order)}
    assert kinds == {True, False} and all(torch.equal(x, data.stored(i)) or torch.equal(x, data.stored(i, flipped=True))
                                          for x, i in zip(latents, order))
    with pytest.raises(UsageError, match=r"was prepared at 16x32, but data.image_size is 2x4"):
        PreparedImages(out, (2, 4), 3)  # the sizes are the images', not the latents'


def test_an_interrupted_latent_prepare_continues_to_the_same_bytes(tmp_path, tiny_ae):
    """Ctrl-C in the second chunk of 64 files, then the same call again: it continues after the first chunk (in
    the middle of a shard) and ends with the bytes of a run that was never interrupted. A finished dataset is
    opened, not made again; another dataset in its place is refused."""
    pngs = write_pngs(tmp_path / "pngs", 70, size=24)
    (pngs / "img066-broken.png").write_bytes(b"not a png")  # file 67 of 71
    kwargs = dict(shard_bytes=10 * 4 * 3 * 3 * 2, batch_size=8, progress=False)  # 10 latents (4, 3, 3) per shard
    straight = prepare_latents(pngs, tmp_path / "straight", 24, tiny_ae, warn=lambda _m: None, **kwargs)

    def interrupt(message: str) -> None:
        if message.startswith("skipping"):
            raise KeyboardInterrupt

    out = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        prepare_latents(pngs, out, 24, tiny_ae, warn=interrupt, **kwargs)
    partial = tmp_path / ".split.partial"
    assert not out.exists() and (partial / "progress.jsonl").is_file()
    with open(partial / "progress.jsonl", "a") as log:
        log.write('{"next": 71, "kept"')  # a line torn by a crash while it was written: not a commit
    warned: list[str] = []
    resumed = prepare_latents(pngs, out, 24, tiny_ae, warn=warned.append, **kwargs)
    assert warned[0] == f"resuming: 64 of 71 image files of {pngs} are done in {partial}"
    assert len(resumed) == len(straight) == 70 and not partial.exists()
    a, b = _latent_files(tmp_path / "straight"), _latent_files(out)
    assert a.keys() == b.keys() and len(a) == 2 * 7 + 2
    assert {name for name in a if a[name] != b[name]} == set()

    before = (out / "index.json").stat().st_mtime_ns
    again = prepare_latents(pngs, out, 24, tiny_ae, warn=warned.append, **kwargs)
    assert again.root == out and (out / "index.json").stat().st_mtime_ns == before
    with pytest.raises(UsageError, match=f"{out} already exists and is not the latent dataset asked for"):
        prepare_latents(pngs, out, 16, tiny_ae, **kwargs)


def test_processes_preparing_the_same_latents_wait_for_the_one_writing_them(tmp_path, tiny_ae):
    """A second caller (here a thread: flock locks open files, not processes) waits while the folder is locked,
    then finds the work to do or the finished dataset."""
    import fcntl
    import threading

    pngs = write_pngs(tmp_path / "pngs", 8, size=16)
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is writing
    heard: list[str] = []
    done: list = []
    worker = threading.Thread(target=lambda: done.append(
        prepare_latents(pngs, tmp_path / "out", 16, tiny_ae, warn=heard.append, progress=False)))
    worker.start()
    for _ in range(600):  # until it reaches the lock (it loads the autoencoder and lists the files first)
        if heard:
            break
        worker.join(timeout=0.1)
    assert heard == [f"waiting for another process that is preparing {partial} ..."]
    worker.join(timeout=0.5)
    assert worker.is_alive()  # still waiting
    os.close(fd)  # the other process is gone
    worker.join(timeout=60)
    assert len(done[0]) == 8 and not partial.exists()


def test_the_cli_prepares_latents_without_flips(tmp_path, folder, tiny_ae, capsys):
    prepare_main([str(folder), str(tmp_path / "out"), "--image-size", "16", "--autoencoder", str(tiny_ae),
                  "--no-flip", "--batch-size", "5", "--device", "cpu"])
    said = capsys.readouterr().out
    assert f"prepared 40 images, 2 skipped at 16 as 4x2x2 latents of {tiny_ae}, into {tmp_path / 'out'}" in said
    data = PreparedImages(tmp_path / "out", 16, 3)
    assert not data.flips_stored and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "images-00000.npy", "index.json", "labels.npy"]
    measured = json.loads((tmp_path / "out" / "index.json").read_text())["latent"]["norm"]["data"]
    assert "mirror" not in measured["source"]  # no mirror images were measured
    with pytest.raises(ValueError, match="holds no flipped latents"):
        data.flipped(0)
    with pytest.raises(UsageError, match="image size 20x20 is not a multiple of the autoencoder's downsampling factor"):
        prepare_main([str(folder), str(tmp_path / "other"), "--image-size", "20", "--autoencoder", str(tiny_ae)])
    with pytest.raises(UsageError, match="an autoencoder takes RGB images, but channels is 1"):
        prepare_main([str(folder), str(tmp_path / "other"), "--image-size", "16", "--channels", "1",
                      "--autoencoder", str(tiny_ae)])
    assert not (tmp_path / "other").exists()


def test_a_folder_gets_one_latent_cache_per_listing_and_autoencoder(tmp_path, tiny_ae):
    pngs = write_pngs(tmp_path / "pngs", 8, size=16)
    first = latent_cache(pngs, 16, tiny_ae, progress=False)
    assert first.root.parent == cache_root() / "latents" and first.root.name.startswith("pngs-16-")
    assert latent_cache(pngs, 16, tiny_ae, progress=False).root == first.root
    write_pngs(pngs, 1, size=16, seed=5)  # img000.png rewritten: another listing
    assert latent_cache(pngs, 16, tiny_ae, progress=False).root != first.root
    kl = tiny_autoencoder("kl", tmp_path / "kl")
    other = latent_cache(pngs, 16, kl, progress=False)
    assert other.root != first.root and other.item_shape == (4, 8, 8)
