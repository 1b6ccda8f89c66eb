"""resdiff.processes: each process's share of the work, the shares gathered back in order, and the main
process's error carried to every process; one process here, two under torchrun."""

import pytest
import torch

from resdiff.errors import TrainingError, UsageError
from resdiff.processes import gather_shares, on_main, rank_world, share

from launch import free_port, launch_env, launcher, run_watched

WORKER = '''
import torch
from resdiff.errors import TrainingError
from resdiff.processes import gather_shares, join, on_main, share

procs = join(torch.device("cpu"), 120)
mine = procs.share(7)
items = gather_shares(torch.tensor(mine)[:, None] * 10, 7)  # item i is 10 * i
assert items[:, 0].tolist() == [10 * i for i in range(7)], items
assert on_main(lambda: procs.rank + 5) == 5  # the main process's value, on every process
assert on_main(lambda: "written", share_result=False) == ("written" if procs.is_main else None)

def fail():
    raise TrainingError("the disk is full")

try:
    on_main(fail, errors=(TrainingError,))
except TrainingError as err:
    print(f"rank {procs.rank} of {procs.world}: share {mine}, caught {err}", flush=True)
try:
    on_main(fail, errors=(TrainingError,), elsewhere="stopped: the main process says why")
except TrainingError as err:
    print(f"rank {procs.rank} then caught {err}", flush=True)
procs.leave()
'''


def test_shares_split_the_items_without_overlap():
    assert share(10, 1, 3) == [1, 4, 7]
    shares = [share(10, r, 3) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(10))
    assert share(2, 2, 3) == []  # more processes than items: some get none
    assert rank_world() == (0, 1) and share(4) == [0, 1, 2, 3]  # no process group: one process does it all


def test_one_process_gathers_its_own_share_and_raises_the_main_error():
    local = torch.arange(5)[:, None]
    assert torch.equal(gather_shares(local, 5), local)
    with pytest.raises(UsageError, match="bad folder"):
        on_main(lambda: (_ for _ in ()).throw(UsageError("bad folder")))
    with pytest.raises(UsageError, match="bad folder"):  # the main process itself says the cause
        on_main(lambda: (_ for _ in ()).throw(UsageError("bad folder")), elsewhere="see the main process")
    with pytest.raises(ValueError):  # an error not listed is not caught: it is a bug, with its traceback
        on_main(lambda: int("x"), errors=(TrainingError,))


@pytest.mark.slow
def test_two_processes_gather_in_order_and_both_raise_the_main_error(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = run_watched([launcher("torchrun"), "--nproc_per_node", "2", str(script)], timeout=120,
                       env=launch_env(free_port()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 of 2: share [0, 2, 4, 6], caught the disk is full" in proc.stdout
    assert "rank 1 of 2: share [1, 3, 5], caught the disk is full" in proc.stdout
    # with ``elsewhere``, the cause is said once: by the main process; the others say where to look
    assert "rank 0 then caught the disk is full" in proc.stdout
    assert "rank 1 then caught stopped: the main process says why" in proc.stdout
