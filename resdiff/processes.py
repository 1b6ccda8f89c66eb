"""The launched processes (torchrun, accelerate launch, or just this one): who am I, my share of the work,
gathering the shares, the main process acting for all, and leaving the group.

Work over items 0..n-1 is split without any collective: process ``rank`` of ``world`` takes
``range(n)[rank::world]`` (``share``), so a process's share depends only on (n, rank, world). ``gather_shares``
puts the shares back in item order. ``on_main`` runs a step only the main process may run (a file write, a
folder check) and carries its error to every process, so all of them stop with the same one-line message
instead of the others dying later in a collective with a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from .errors import UsageError, one_line

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

__all__ = ["Processes", "join", "rank_world", "share", "gather_shares", "on_main", "main_writes", "all_agree",
           "StopVote", "end_training", "lost_contact", "why_lost", "handle_stop_signals"]

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the current process group; (0, 1) without one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def share(n: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """This process's items of 0..n-1: ``range(n)[rank::world]`` (rank and world default to the current group's)."""
    if rank is None or world is None:
        rank, world = rank_world()
    return list(range(n))[rank::world]


def gather_shares(local: torch.Tensor, n: int) -> torch.Tensor:
    """Items 0..n-1 in order, on every process, from each process's ``share(n)`` (``local``, (len(share), ...), in
    that order): one all-gather of the shares padded to one length. On the CPU. The main process's share, never
    empty, sets the item shape and dtype, so an empty share may be any tensor (``torch.zeros(0, 0)``)."""
    _, world = rank_world()
    if world == 1:
        return local.cpu()
    shape, dtype = on_main(lambda: (tuple(local.shape[1:]), local.dtype))
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL gathers CUDA tensors only; gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    per_rank = -(-n // world)
    padded = torch.zeros((per_rank, *shape), dtype=dtype, device=device)
    padded[: len(local)] = local.to(device, dtype).reshape(len(local), *shape)
    shares = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(shares, padded)
    # item i is share i % world, row i // world
    return torch.stack(shares).cpu().transpose(0, 1).reshape(world * per_rank, *shape)[:n]


def on_main(
    work: Callable[[], T], *, errors: tuple[type[Exception], ...] = (UsageError,), share_result: bool = True,
    elsewhere: str | None = None,
) -> T | None:
    """``work()`` on the main process only. An error of ``errors`` there is raised on every process (same type,
    same message, or ``elsewhere`` on the other processes: the cause is then printed once, by the main one);
    the result is returned on every process (``share_result``) or on the main one (None elsewhere).
    Every process must call it at the same point: with several, it is one broadcast."""
    rank, world = rank_world()
    value, error = None, None
    if rank == 0:
        try:
            value = work()
        except errors as err:
            error = (type(err), str(err))
    if world > 1:
        box = [(value if share_result else None, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        value, error = box[0] if rank != 0 else (value, box[0][1])
    if error is not None:
        kind, message = error
        raise kind(message if rank == 0 or elsewhere is None else elsewhere)
    return value


def main_writes(write: Callable[[], object], what: str, step: int) -> None:
    """Run a write of training's that only the main process does (``what``, at ``step``). If it fails, every process
    stops with one TrainingError line (the main one with its cause, the others pointing to it), instead of the others
    dying in their next collective with a traceback."""
    from .errors import TrainingError

    on_main(write, errors=(TrainingError,), share_result=False,
            elsewhere=f"stopped at step {step}: the main process could not write {what} (its error says why)")


def handle_stop_signals(handler: Callable[[int, object], None]) -> dict:
    """``handler`` for SIGTERM and SIGINT (what launchers, Kubernetes, SLURM and Ctrl-C send); returns the handlers
    it replaced, for ``signal.signal`` to put back. Outside the main thread (a notebook worker) nothing changes."""
    import signal

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old = signal.signal(sig, handler)
            if old is not None:  # None: a handler not set from Python, which cannot be put back
                previous[sig] = old
    except ValueError:  # not the main thread: keep the defaults
        pass
    return previous


@dataclass
class Processes:
    """The launched processes as this one sees them (accelerate's ``PartialState``), and whether ``join`` made
    their process group (then ``leave`` destroys it; a group someone else made is theirs to end)."""

    state: "PartialState"
    owns_group: bool

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def world(self) -> int:
        return self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def device(self) -> torch.device:
        return self.state.device

    def share(self, n: int) -> list[int]:
        """This process's items of 0..n-1."""
        return share(n, self.rank, self.world)

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def say(self, log: Callable[[str], None] | None) -> Callable[[str], None]:
        """``log`` on the main process; a no-op elsewhere (and when ``log`` is None)."""
        return log if (log is not None and self.is_main) else (lambda _msg: None)

    def leave(self) -> None:
        """Destroy the process group if ``join`` made it (the end of a sample.py or evaluate.py job)."""
        if self.world > 1 and self.owns_group:
            self.state.destroy_process_group()


def join(device: torch.device | None = None, timeout_s: float = 1800.0) -> Processes:
    """Join the launched processes (torchrun / accelerate launch, or just this one).

    Without CUDA (or with a CPU ``device``), cpu=True is what makes accelerate join the processes over gloo;
    otherwise each would silently be a world of one and all of them would do the same work. ``timeout_s``: how
    long a process waits for the others at a barrier before it gives up (a peer that died). A CPU process keeps
    freed memory for reuse (``hardware.reuse_freed_memory``)."""
    from datetime import timedelta

    from accelerate import PartialState

    from .hardware import reuse_freed_memory

    cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))
    if state.device.type == "cpu":
        reuse_freed_memory()
    return Processes(state, owns_group=not had_group)


# ----------------------------------------------------------------------------- agreeing, stopping, ending


def all_agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """Whether every process's ``ok`` is True (one all-reduce when there are several; ``device`` is where the
    default group's backend takes tensors: the GPU for NCCL)."""
    if rank_world()[1] == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    torch.distributed.all_reduce(flag)
    return not bool(flag.item())


class StopVote:
    """Whether any process wants to stop, asked by every process at the same points (each training step).

    A preempted run must stop within one step on every process (a launcher sends SIGKILL ~30 s after SIGTERM),
    so the processes vote every step: one all-reduce of a CPU integer, microseconds. On a GPU backend the vote
    goes through a gloo side group made here, so it never waits for the GPU."""

    def __init__(self, timeout_s: float = 600.0):
        self.timeout_s, self.group = timeout_s, None
        world = rank_world()[1]
        if world > 1 and torch.distributed.get_backend() != "gloo":
            self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.world = world

    def __call__(self, mine: bool) -> bool:
        if self.world == 1:
            return mine
        votes = torch.tensor([int(mine)])
        torch.distributed.all_reduce(votes, group=self.group)  # None: the default group, gloo on CPUs
        return bool(votes.item())


def end_training(accelerator: "Accelerator") -> None:
    """Tear down DDP and the process group in the one order that cannot deadlock. The caller first drops every
    reference it holds to the DDP wrapper (``model = accelerator.unwrap_model(model)``), as the Trainer does.

    accelerate's ``end_training`` destroys the process group while the DDP wrapper still holds it, which
    leaves DDP's C++ ``Reducer`` as the group's last owner. The Reducer is freed with the GIL held (its
    Python binding keeps it), so ``~ProcessGroupGloo`` then joins gloo's worker threads while holding the
    GIL. A worker that has just finished the last collective is still dropping that work object, whose
    tensors have Python wrappers: to free them it waits for the GIL, and the join waits for it: both
    processes hang after the last step (bench/multiprocess_exit.py repeats the run to show it). So the DDP
    wrapper is dropped first, while torch.distributed still owns the group, and only then is the group
    destroyed: its last reference then goes through torch's binding for process groups, which releases the
    GIL before ``~ProcessGroupGloo`` runs.
    """
    if accelerator.num_processes > 1:
        accelerator.free_memory()  # accelerate's own references to the wrapper, then a garbage collection
    accelerator.end_training()  # trackers, then the process group (a no-op with one process)


def lost_contact(err: RuntimeError, step: int, timeout_s: float | None = None) -> "TrainingError | None":
    """The one-line error to stop with when ``err`` is a collective failing at ``step`` because another process died
    or timed out (``timeout_s``: train.timeout_s, named in the message); None for any other error."""
    from .errors import TrainingError

    text = str(err).lower()
    rank, world = rank_world()
    if world == 1 or not (isinstance(err, torch.distributed.DistError) or any(
            word in text for word in ("gloo", "nccl", "timed out"))):
        return None
    within = f"train.timeout_s={timeout_s:g} s" if timeout_s is not None else "the timeout"
    return TrainingError(
        f"process {rank} lost contact with the others at step {step} ({why_lost(err)}): another process died, or "
        f"did not answer within {within}; see its output above. Resume from the last checkpoint with the same command")


def why_lost(err: RuntimeError) -> str:
    """The gist of a backend's error: without its source-file prefixes and its boilerplate advice."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", one_line(err, 1000))
    return one_line(text.split(". ")[0].strip(" ."), 120)
