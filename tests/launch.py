"""Launch the README's multi-process command lines under a watchdog.

A launched run that does not exit within its bound fails the test with the Python stacks of every
process it started (and their native stacks where py-spy is installed), instead of hanging CI:
the workers run with PYTHONFAULTHANDLER=1, so SIGABRT makes each print all its threads' stacks
before it dies. The tests' own: bench/ runs its processes with bench/runner.py (neither imports the other).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's torchrun and accelerate live beside its python


class Hang(AssertionError):
    """A launched command did not exit in time; the message holds every process's stacks."""


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's rendezvous, so concurrent suites never collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(name: str) -> str:
    """The path of a launcher script (torchrun, accelerate) of this interpreter's environment."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


def launch_env(port: int | None = None, **extra: str) -> dict[str, str]:
    """The environment for a launched run: one thread per process, stacks on SIGABRT, torchrun's port.

    torchrun reads every option it lacks from ``PET_<OPTION>``, so the port is chosen without changing
    the command line the README shows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1", **extra}
    if port is not None:
        env["PET_MASTER_PORT"] = str(port)
    return env


def _stacks(pids: list[int]) -> str:
    """Native stacks from py-spy, where it is installed."""
    spy = shutil.which("py-spy") or (str(BIN / "py-spy") if (BIN / "py-spy").exists() else None)
    if spy is None:
        return "(py-spy is not installed: Python stacks only, from the processes' stderr below)\n"
    out = []
    for pid in pids:
        try:
            dump = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
            out.append(dump.stdout + dump.stderr)
        except (OSError, subprocess.TimeoutExpired) as err:
            out.append(f"py-spy on {pid}: {err}\n")
    return "".join(out)


def run_watched(
    cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT,
    on_start=None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a launcher and its workers) to completion within ``timeout`` seconds, or raise Hang.

    ``on_start(proc)`` is called once the launcher has started, for tests that act on a live run.
    stdout and stderr go through temporary files, so a chatty run can never block on a full pipe."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or launch_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, text=True)
        try:
            if on_start is not None:
                on_start(proc)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            family = _family(proc.pid)
            native = _stacks([p.pid for p in family])
            for p in family:  # faulthandler prints each worker's Python stacks on SIGABRT
                if p.pid != proc.pid:
                    _signal(p, signal.SIGABRT)
            time.sleep(2)
            _kill_group(proc)
            out.seek(0), err.seek(0)
            raise Hang(
                f"{' '.join(cmd)} did not exit within {timeout:.0f} s.\n--- native stacks ---\n{native}"
                f"--- stderr (Python stacks at the end) ---\n{err.read()[-20000:]}\n--- stdout ---\n{out.read()[-3000:]}"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def workers(proc: subprocess.Popen, script: str) -> list[psutil.Process]:
    """The live worker processes a launcher started for ``script``."""
    found = []
    for p in _family(proc.pid)[1:]:
        try:
            if any(arg.endswith(script) for arg in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    for p in reversed(_family(proc.pid)):
        _signal(p, signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
