"""Child processes of the benchmarks: run one under a time limit, and read the one `RESULT {json}` line it prints.

A measurement runs in a process of its own where what it measures is process-wide (malloc settings, peak memory,
accelerate's one precision per process) or needs another Python environment (bench/peers.py). Standard library only:
bench/peers.py imports it in the peers' environment, bench/gpu_check.py before diffusers is installed.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULT = "RESULT "
TOKEN = "BENCH_RUN_"  # + the run's own id: every process a run starts inherits it, even in a new session or run


# While this file exists, every training clock of the benchmarks waits between two steps (the wait is not counted):
# another job (a test suite, a build) may then use the cores without its time landing on a contender's clock.
# tools/hold.sh CMD... holds them for the length of CMD. Each holder makes its own file (HOLD, or HOLD.PID), so two
# holders at once do not release each other: the clocks go on when the last one is gone.
HOLD = Path(os.environ.get("BENCH_HOLD", "/tmp/bench-hold"))


def holders() -> list[Path]:
    """The hold files that exist now: HOLD itself and every HOLD.SUFFIX (tools/hold.sh makes HOLD.PID)."""
    return sorted({*HOLD.parent.glob(glob.escape(HOLD.name) + ".*"), *([HOLD] if HOLD.exists() else [])})


def wait_while_held() -> None:
    """Call between two timed steps: returns at once, or when every hold file is gone."""
    if held := holders():
        print(f"held: waiting while {', '.join(map(str, held))} exist", flush=True)
        while holders():
            time.sleep(1)
        print("held: going on", flush=True)


def result_line(fields: dict) -> str:
    """The one machine-readable line a child ends with."""
    return RESULT + json.dumps(fields)


def parse_result(output: str) -> dict | None:
    """The fields of the last result line in ``output``, or None when there is none."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):]) if lines else None


@dataclass
class Finished:
    """How a command ended: its exit code (124 at the time limit, 128 + N when killed by signal N) and output."""

    code: int
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.code == 124


def _end_with_parent() -> None:
    """In a child, before it runs: Linux ends it when its parent dies, so that a restarted benchmark never finds an
    orphan still writing into the same folder."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def family(token: str) -> list[int]:
    """The live processes started by the run of ``token`` (read from /proc: launchers' workers included)."""
    mark, pids = f"{TOKEN}{token}=1".encode(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except (OSError, ValueError):
            pass
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def run(command: list[str], *, echo: bool = True, log: Path | None = None, timeout: float | None = None,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> Finished:
    """Run ``command`` (stdout and stderr together) to its end, its output passed through as it comes (progress bars
    included) when ``echo``, appended to ``log``, and returned.

    At ``timeout`` seconds every process of the run gets SIGABRT, so that Python prints each thread's stack
    (PYTHONFAULTHANDLER), and SIGKILL 10 s later; processes a finished command leaves behind are killed too."""
    token, env = uuid.uuid4().hex, dict(os.environ if env is None else env)
    path = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # `-m bench.NAME` from any folder
    env.update({TOKEN + token: "1", "PYTHONPATH": path, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"})
    start, text = time.monotonic(), []
    sink = open(log, "a") if log else None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=cwd, env=env, preexec_fn=_end_with_parent if sys.platform == "linux" else None)

    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := proc.stdout.read1(65536):
            text.append(decoder.decode(chunk))
            for out in ([sys.stdout] if echo else []) + ([sink] if sink else []):
                out.write(text[-1])
                out.flush()
        text.append(decoder.decode(b"", final=True))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal([proc.pid, *family(token)], signal.SIGABRT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        code = 124
    finally:  # also when the benchmark is interrupted: then so is the child
        seconds = time.monotonic() - start
        _signal(family(token), signal.SIGKILL)
        proc.kill()
        proc.wait()
        reader.join(10)
        if sink:
            sink.close()
    return Finished(code if code >= 0 else 128 - code, "".join(text), seconds)


def run_child(command: list[str], what: str, *, echo: bool = True, env: dict[str, str] | None = None) -> dict:
    """The fields of the result line of ``command``; one line naming ``what`` if it fails or prints none (its output
    is shown above that line: streamed when ``echo``, else its last lines)."""
    done = run(command, echo=echo, env=env)
    if done.code or parse_result(done.output) is None:
        if not echo:
            sys.stdout.write(done.output[-3000:])
        ended = f"failed with exit code {done.code}" if done.code else "ended without its result line"
        raise SystemExit(f"error: {what} {ended} (its output is above)")
    return parse_result(done.output)


def in_child(module: str, spec: dict, *, echo: bool = False, env: dict[str, str] | None = None) -> dict:
    """``python -m MODULE --child SPEC`` (whose main() answers with ``child``): one measurement in a fresh process."""
    return run_child([sys.executable, "-m", module, "--child", json.dumps(spec)], f"{module} {json.dumps(spec)}",
                     echo=echo, env=env)


def child(measure: Callable[..., dict], spec: str) -> None:
    """The child's side of ``in_child``: ``measure(**SPEC)`` printed as the result line."""
    print(result_line(measure(**json.loads(spec))), flush=True)


def torchrun(*args: str) -> list[str]:
    """The command line of torchrun (the one beside this Python, as a user types it) with ``args``."""
    beside = Path(sys.executable).parent / "torchrun"
    return [str(beside) if beside.exists() else "torchrun", *args]


def torchrun_env(**extra: str) -> dict[str, str]:
    """The environment of a torchrun: one thread per process, and a free port for its rendezvous (torchrun reads an
    option it is not given from PET_<OPTION>, so the command line stays the one users type)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(port), **extra}
