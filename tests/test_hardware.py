"""The machine (resdiff/hardware.py): keeping freed memory for reuse on a CPU."""

import os
import subprocess
import sys

import pytest

from tiny_runs import ROOT

# Allocates, fills and frees a 64 MB tensor ten times and prints the page faults the last eight took (the heap
# grows to its size in the first two). glibc's
# default serves a block that large from a fresh mmap each time: 64 MB / 4 KB = 16,384 faults apiece.
FAULTS = """
import resource, sys, torch
setup = sys.argv[1]
if setup == "reuse":
    import resdiff.unet  # the model's code loaded, as in any resdiff process (before the package was lazy, the
    resdiff.unet.UNet    # import below did this): with torch alone, glibc still faults blocks in (open question)
    from resdiff.hardware import reuse_freed_memory
    print(reuse_freed_memory())
elif setup == "trainer":
    import tempfile
    from resdiff.build import build_trainer
    from resdiff.config import load_config
    out = tempfile.mkdtemp()
    build_trainer(load_config(None, ["model.channels=16", "data.image_size=8", "data.demo_images=8",
                                                   "train.batch_size=4",
                                                   f"out={out}/run", "data.num_workers=0"]), echo=lambda _: None)
    print(True)
else:
    print(False)
for _ in range(2):
    torch.empty(16 << 20).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 << 20).fill_(1)  # 16 Mi float32: 64 MB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setup: str, **env: str) -> tuple[str, int]:
    proc = subprocess.run([sys.executable, "-c", FAULTS, setup], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    applied, count = proc.stdout.split()[-2:]
    return applied, int(count)


linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                                 reason="glibc's malloc only")


@linux_glibc
def test_reuse_freed_memory_stops_the_page_faults_of_each_new_block():
    _, default = faults("default")
    applied, reused = faults("reuse")
    assert applied == "True"
    assert default > 8 * 16384 * 0.9  # each 64 MB block faulted in anew
    assert reused < default / 4, (reused, default)  # at most one block faulted in again, not eight


@linux_glibc
def test_a_cpu_trainer_keeps_freed_memory():
    _, default = faults("default")
    _, after_trainer = faults("trainer")
    assert after_trainer < default / 4, (after_trainer, default)


@linux_glibc
def test_the_environment_turns_reuse_off():
    applied, count = faults("reuse", RESDIFF_KEEP_FREED_MEMORY="0")
    assert applied == "False" and count > 8 * 16384 * 0.9
