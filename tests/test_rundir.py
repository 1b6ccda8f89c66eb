"""The run directory's files (resdiff.rundir): leftovers of interrupted writes, the log trim, the model
export, the checks made before a run writes anything. The Trainer's use of them is in test_reliability."""

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from resdiff.config import load_config
from resdiff.errors import UsageError
from resdiff.checkpoint import checkpoint_bytes
from resdiff.rundir import (
    check_disk, check_same_model, export_model, human_size, remove_leftovers, trim_log, write_config,
    write_problem,
)
from resdiff.runlock import RunLock


def test_remove_leftovers_deletes_only_temporary_names(tmp_path):
    keep = [tmp_path / "checkpoints" / "step-0000004" / "state.json", tmp_path / "model" / "model_index.json",
            tmp_path / "samples" / "step-0000004.png", tmp_path / "config.yaml", tmp_path / "log.jsonl"]
    junk = [tmp_path / "checkpoints" / ".step-0000008.tmp" / "model.safetensors", tmp_path / ".model.tmp" / "x",
            tmp_path / "samples" / ".step-0000008.png.tmp", tmp_path / ".config.yaml.tmp", tmp_path / ".log.jsonl.tmp"]
    for path in keep + junk:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = remove_leftovers(tmp_path)
    assert sorted(removed) == sorted([".config.yaml.tmp", ".log.jsonl.tmp", ".model.tmp", "checkpoints/.step-0000008.tmp",
                                      "samples/.step-0000008.png.tmp"])
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in junk)
    assert remove_leftovers(tmp_path) == []


def test_trim_log_drops_records_past_the_step_and_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (2, 4, 6, 8)]
    log.write_text("".join(records) + "not json\n" + '{"step": 10, "lo')
    assert trim_log(tmp_path, 4) == 4
    assert log.read_text() == "".join(records[:2])
    assert trim_log(tmp_path, 4) == 0 and trim_log(tmp_path / "absent", 4) == 0


def test_export_model_replaces_the_folder_whole(tmp_path):
    for version in ("one", "two"):
        source = tmp_path / version
        (source / "unet").mkdir(parents=True)
        (source / "unet" / "weights").write_text(version)
        export_model(tmp_path, source)
        assert (tmp_path / "model" / "unet" / "weights").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "one", "two"]  # no .model.tmp / .model.old


def test_check_same_model_names_each_change(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "data.image_size=16"])
    write_config(tmp_path, cfg)
    check_same_model(tmp_path, cfg)  # unchanged: fine
    changed = load_config(None, ["model.preset=tiny", "data.image_size=32", "model.channels=64"])
    with pytest.raises(UsageError, match=r"changes the model \(.*model.channels.*data.image_size: 16 -> 32\)"):
        check_same_model(tmp_path, changed)


def test_check_disk_refuses_a_model_the_disk_cannot_hold_three_checkpoints_of(tmp_path):
    check_disk(tmp_path, 1000)
    with pytest.raises(UsageError, match=r"not enough free disk space in .* one checkpoint of this 10000000000.0M-parameter"):
        check_disk(tmp_path, 10**16)


def test_messages_name_sizes_and_errors_in_a_few_words():
    assert [human_size(n) for n in (512, 1500, 2.5e9, 3e15)] == ["512 bytes", "1.5 KB", "2.5 GB", "3000.0 TB"]
    assert write_problem(OSError(errno.ENOSPC, "No space left on device", "/run/x")) == "No space left on device: /run/x"
    assert write_problem(RuntimeError("torch.save\nfailed")) == "RuntimeError: torch.save failed"


def test_identity_changes_name_each_changed_key_and_ignore_unrecorded_ones(tmp_path):
    from resdiff.rundir import identity_changes, write_identity

    assert identity_changes(tmp_path, {"data.source": "/a"}) == []  # a run from before identities: nothing to compare
    write_identity(tmp_path, {"data.source": "/a/train", "data.image_size": (16, 16), "train.seed": 0})
    current = {"data.source": "/b/train", "data.image_size": (16, 16), "train.seed": 0, "diffusion.new_key": 1}
    assert identity_changes(tmp_path, current) == ["data.source: /a/train -> /b/train"]  # tuples compare as lists
    # a key recorded runs did not have yet compares with the value they all trained with (IDENTITY_BEFORE)
    assert identity_changes(tmp_path, {**current, "diffusion.schedule_shift": 1.0}) == ["data.source: /a/train -> /b/train"]
    assert identity_changes(tmp_path, {"diffusion.schedule_shift": 3.0}) == ["diffusion.schedule_shift: 1.0 -> 3.0"]
    (tmp_path / "identity.json").write_text("{not json")
    assert identity_changes(tmp_path, current)[0].startswith("identity.json: unreadable")


def test_earlier_training_is_a_model_or_a_log_that_reached_a_checkpoint(tmp_path):
    from resdiff.rundir import clear_run, earlier_training

    assert earlier_training(tmp_path, 5) is None
    (tmp_path / "log.jsonl").write_text('{"step": 4}\n{"step": 5, "lo')  # a torn last line is not a record
    assert earlier_training(tmp_path, 5) is None  # steps a crash lost before the first checkpoint
    (tmp_path / "log.jsonl").write_text('{"step": 4}\n{"step": 5}\n')
    assert earlier_training(tmp_path, 5) == "log.jsonl up to step 5"
    (tmp_path / "model").mkdir()
    assert earlier_training(tmp_path, 5) == "the exported model model/ and log.jsonl up to step 5"
    (tmp_path / "config.yaml").write_text("x: 1\n")
    assert clear_run(tmp_path) == ["model", "log.jsonl"] and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_checksums_catch_a_same_length_change_and_name_the_file(tmp_path):
    from resdiff.files import checksum_problem, write_checksums

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x01" * 10)
    assert checksum_problem(tmp_path) is None  # no sums yet: nothing to check
    write_checksums(tmp_path, skip=("sub",))
    assert (tmp_path / "SHA256SUMS").read_text().splitlines()[0].endswith("  a.bin")
    assert checksum_problem(tmp_path) is None
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x02" * 10)  # skipped: has sums of its own
    assert checksum_problem(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"\x00" * 99 + b"\x01")
    assert checksum_problem(tmp_path) == "a.bin does not match its SHA-256 in SHA256SUMS: the file is damaged"
    (tmp_path / "a.bin").unlink()
    assert checksum_problem(tmp_path) == "a.bin is missing (listed in SHA256SUMS)"


def test_check_disk_needs_room_for_the_kept_checkpoints_plus_the_one_being_written(tmp_path):
    """16 bytes a parameter per checkpoint, keep + 1 of them at the peak, plus the exported model twice (old and
    new, 4 bytes each): 72 bytes a parameter with the default keep of 3, not the 48 of three checkpoints."""
    assert checkpoint_bytes(1000) == (16_000, 4_000)
    parameters = shutil.disk_usage(tmp_path).free // 60  # room for 60 bytes a parameter: 48 fit, 72 do not
    with pytest.raises(UsageError) as info:
        check_disk(tmp_path, parameters, keep=3)
    message = str(info.value)
    assert "train.keep_checkpoints=3 of them are kept (0 now)" in message and "lower train.keep_checkpoints" in message
    assert f"needs about {human_size(72 * parameters)} more" in message and "\n" not in message
    check_disk(tmp_path, parameters, keep=1)  # 2 x 16 + 2 x 4 = 40 bytes a parameter
    for step in (3, 6, 9):  # a resumed run already holds three checkpoints and the model: one more of each
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    check_disk(tmp_path, parameters, keep=3)  # 16 + 4 = 20 bytes a parameter


# A process that takes a run's lock, forks a child that outlives it (as a DataLoader worker can for a moment), and
# waits; it prints its pid and the child's.
HOLDER = """
import os, sys, time
from resdiff.runlock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
ready, said = os.pipe()
child = os.fork()
if child == 0:  # the fork hooks (RunLock closes its copy of the lock file) ran before fork() returned here
    os.write(said, b"1")
    time.sleep(120)
    os._exit(0)
os.read(ready, 1)  # the child has let go of the lock file before the test kills this process
print(os.getpid(), child, flush=True)
time.sleep(120)
"""


def test_a_live_lock_is_refused_whatever_pid_and_host_its_file_names(tmp_path):
    """Two containers with one host name and separate PID namespaces: the pid a holder writes means nothing to
    the other, and may be dead or someone else there. The kernel lock decides: a live holder is refused however
    its file looks; once it is killed (its forked child still running) the lock is taken over with a warning."""
    lock = tmp_path / ".lock"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has now
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        pid, child = map(int, holder.stdout.readline().split())
        assert json.loads(lock.read_text())["pid"] == pid
        for owner in ({"host": socket.gethostname(), "pid": gone.pid}, {"host": "elsewhere", "pid": 1}, None):
            lock.write_text(json.dumps(owner) if owner else "")  # what another PID namespace (or a torn write) shows
            with pytest.raises(UsageError) as info:
                RunLock(tmp_path).acquire()
            who = f"pid {owner['pid']} on {owner['host']}" if owner else "another process"
            assert str(info.value) == (f"{tmp_path} is in use by {who}, which holds the lock on {lock}; "
                                       "wait for that run to end or stop it")
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
        holder.kill()
        holder.wait()
        assert psutil.pid_exists(child)  # the forked child lives on, and does not keep the lock
        printed = []
        mine = RunLock(tmp_path, warn=printed.append)
        mine.acquire()
        assert printed == [f"warning: {lock} was left by pid {gone.pid} on {socket.gethostname()}, which is no longer "
                           "running; taking it over"]
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        mine.release()
        assert not lock.exists()
    finally:
        holder.kill()
        holder.wait()
        with contextlib.suppress(ProcessLookupError, NameError):
            os.kill(child, signal.SIGKILL)
