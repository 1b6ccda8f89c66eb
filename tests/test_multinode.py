"""Two machines simulated on one: two torchrun agents (``--nnodes 2``, one process each) meet through torchrun's
c10d rendezvous on 127.0.0.1, exactly as the README's multi-node lines do on two hosts, and train.py runs
across them; then one worker is killed with SIGKILL and torchrun's elastic restart (``--max-restarts 1``)
has to finish the run from its last checkpoint with no help."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launch import free_port, launch_env, launcher, run_watched, workers
from tiny_runs import TINY, read_log, write_pngs

STEPS = 30  # long enough that a kill after the first checkpoint lands mid-run, short enough to stay quick


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("data") / "pngs", 32)


def agent(port: int, run_id: str, *args: str) -> list[str]:
    """One machine's torchrun line of the README's multi-node section (here both "machines" are 127.0.0.1)."""
    return [launcher("torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "--local-addr", "127.0.0.1", *args]


def two_agents(run: Path, pngs: Path, *, restarts: int, on_start=None) -> list:
    """Start both agents at once (each under the watchdog) and return their finished processes."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    train = ["train.py", "--data", str(pngs), "--out", str(run), "--steps", str(STEPS), *TINY,
             "train.log_every=1", "train.checkpoint_every=3", "train.timeout_s=30"]
    cmd = agent(port, run_id, "--max-restarts", str(restarts), *train)
    env = launch_env(GLOO_SOCKET_IFNAME="lo", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_watched, cmd, timeout=240, env=env, on_start=on_start if k == 0 else None)
                   for k in range(2)]
        procs = [f.result() for f in futures]
    for k, proc in enumerate(procs):  # kept beside the run, to read when an assertion fails
        (run.parent / f"agent{k}.txt").write_text(f"{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return procs


def check_finished(run: Path, procs: list) -> None:
    """Both agents exit 0; every step is logged once, at world size 2; one set of checkpoints, one model."""
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # what an uninterrupted run logs
    assert {r["world_size"] for r in log} == {2}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000024", "step-0000027", "step-0000030"]
    assert (run / "model" / "model_index.json").is_file() and not (run / ".lock").exists()
    assert not list(run.glob(".*")) and not list(run.glob("*/.*"))  # no temporary leftovers of either agent
    assert sum(p.stdout.count("resdiff: training a DDPM") for p in procs) >= 1
    assert sum(p.stdout.count("done: 30 steps") for p in procs) == 1  # the main process's closing line, once


@pytest.mark.slow
def test_two_nodes_train_one_run_and_a_killed_worker_is_restarted_and_resumes_by_itself(tmp_path, pngs):
    """Two agents, one process each, start a new run as one world of two (one run directory, one exported
    model). Then SIGKILL the main process (rank 0, which holds the run's lock) once a checkpoint exists:
    torchrun restarts both workers, resdiff resumes from the newest complete checkpoint with the dead process's
    lock released by the kernel, drops the log records past it, and ends with the log of an uninterrupted run.
    (One launch proves both: a separate clean two-node run would repeat the same rendezvous and training.)"""
    run = tmp_path / "run"
    killed = []

    def kill_rank0(proc) -> None:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / "step-0000003").is_dir():
            assert time.monotonic() < deadline and proc.poll() is None, "the run never reached its first checkpoint"
            time.sleep(0.05)
        for p in workers_of_both(proc):
            if p.environ().get("RANK") == "0":
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)

    procs = two_agents(run, pngs, restarts=1, on_start=kill_rank0)
    assert len(killed) == 1
    check_finished(run, procs)
    out = "".join(p.stdout for p in procs)
    assert "world:     2 process(es)" in out and "(new run)" in out  # the first attempt: a new run of two
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and str(run / "checkpoints" / "step-") in resumed[0], out[-3000:]
    assert "is in use by" not in out + "".join(p.stderr for p in procs)


def workers_of_both(proc) -> list:
    """The train.py workers of both agents: this one's, and the other agent's (the sibling torchrun process
    started from the same test with the same command line)."""
    import psutil

    found = list(workers(proc, "train.py"))
    me = psutil.Process(proc.pid)
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != proc.pid and p.info["cmdline"] == me.cmdline():
            found += [c for c in p.children(recursive=True) if any(a.endswith("train.py") for a in c.cmdline())]
    return found
