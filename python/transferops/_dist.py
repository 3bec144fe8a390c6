"""torch.distributed plumbing of the ops that scale out (ranking, merging, Sinkhorn): the
``group`` argument, sums across ranks, a balanced split of work, the CLI's set-up under
``torchrun``, and agreement on success that names a rank that failed or died.

Ranks are named by their rank in the default group (what ``torchrun`` prints). Agreement goes
through the rendezvous store rather than a collective: a collective with a dead member blocks
some ranks until the group's timeout, whereas a store answers every rank that is still alive,
so each can tell which of its peers reported and which are gone.
"""
from __future__ import annotations

import itertools
import os
import socket
import time
from datetime import timedelta

import torch

# The CLI's group timeout and agreement wait: long enough for a rank that merges a large
# tensor more than its peers, short enough that a hung peer does not hold a cluster for hours.
TIMEOUT_S = float(os.environ.get("TRANSFEROPS_DIST_TIMEOUT", "600"))


class RankFailure(RuntimeError):
    """Another rank (or this one) failed; the message names the ranks and why."""


def group_of(group, name: str = "group"):
    """``group`` checked: None (one process) or a torch.distributed process group that this
    process belongs to (``torch.distributed.group.WORLD`` for all ranks)."""
    if group is None:
        return None
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialized; call torch.distributed."
                         "init_process_group first (torchrun sets its environment), or pass group=None")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: expected a torch.distributed ProcessGroup (torch.distributed.group.WORLD for "
                        f"all ranks), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process (rank {dist.get_rank()}) is not a member of the group")
    return group


def rank(group) -> int:
    return 0 if group is None else torch.distributed.get_rank(group)


def world(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


def all_sum(t: torch.Tensor, group) -> torch.Tensor:
    """t summed over the ranks, in place (every rank gets the same sum)."""
    if world(group) > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t


def all_sum_each(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Each of ``tensors`` (of one dtype, on one device) summed over the ranks by one all-reduce
    of them all: flat tensors, in their order."""
    return list(all_sum(torch.cat([t.reshape(-1) for t in tensors]), group).split([t.numel() for t in tensors]))


def gather(t: torch.Tensor, group) -> torch.Tensor:
    """[world, *t.shape]: every rank's t, in rank order (reductions over it are then the same
    on every rank, bit for bit, whatever order the collective summed in)."""
    if world(group) == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(world(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def split_balanced(sizes, parts: int) -> list[int]:
    """The part (0 .. parts - 1) of every item, largest items first onto the least loaded part
    (ties: the lower part), so that the parts' total sizes differ by at most the largest item;
    the same on every rank."""
    owner = [0] * len(sizes)
    load = [0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        p = min(range(parts), key=lambda p: (load[p], p))
        owner[i] = p
        load[p] += sizes[i]
    return owner


def process_group(device: torch.device | str = "cpu"):
    """The default group of a script or command started by ``torchrun`` (WORLD_SIZE > 1 in the
    environment), initialized here if need be (NCCL for a CUDA device, each rank on its
    LOCAL_RANK's GPU; else gloo); None when it runs on its own. Pass it as the ops' ``group=``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    dist = torch.distributed
    device = torch.device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=TIMEOUT_S))
    return dist.group.WORLD


_calls: dict[tuple[int, ...], itertools.count] = {}  # agreements so far, per group (its ranks)


def store():
    """The rendezvous store of the default group (a peer's death cannot block it)."""
    return torch.distributed.distributed_c10d._get_default_store()


def announce(group) -> None:
    """Record this process's host and pid, so that a peer that finds it silent in
    :func:`agree` can tell, on the same host, that it died rather than runs late. Collective:
    call it on every rank at the start of the work."""
    if world(group) > 1:
        store().set(f"transferops/process/{torch.distributed.get_rank()}", f"{socket.gethostname()} {os.getpid()}")


def _why_lost(kv, r: int) -> str | None:
    """Why rank ``r`` of the default group is known dead (it announced itself on this host, and
    its process is gone), or None."""
    key = f"transferops/process/{r}"
    if not kv.check([key]):
        return None
    host, pid = kv.get(key).decode().split()
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"its process {pid} is gone (killed?)"
    except PermissionError:
        pass
    return None


def lost() -> list[str]:
    """"rank N was lost: ..." for each announced rank of the default group whose process is
    known dead (same host): why torchrun stops this one (it SIGTERMs the others when one dies)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return []
    kv, out = store(), []
    for r in range(torch.distributed.get_world_size()):
        why = _why_lost(kv, r)
        if why is not None:
            out.append(f"rank {r} was lost: {why}")
    return out


def agree(group, error: str | None, *, timeout_s: float | None = None) -> None:
    """Every rank of ``group`` says whether its part succeeded (``error``: None, or what went
    wrong); returns on every rank if all did, else raises :class:`RankFailure` on every rank
    still alive, naming each rank that failed (with its message), died or did not report within
    ``timeout_s``. Collective: every rank must call it, the same number of times."""
    if world(group) == 1:
        if error is not None:
            raise RankFailure(error)
        return
    dist = torch.distributed
    me = dist.get_rank()
    ranks = [dist.get_global_rank(group, r) for r in range(world(group))]
    call = next(_calls.setdefault(tuple(ranks), itertools.count()))
    prefix = f"transferops/agree/{'-'.join(map(str, ranks))}"
    kv = store()
    kv.set(f"{prefix}/{call}/{me}", "" if error is None else "!" + error)
    deadline = time.monotonic() + (TIMEOUT_S if timeout_s is None else timeout_s)
    said: dict[int, str] = {}
    lost: dict[int, str] = {}
    while True:
        for r in ranks:
            if r in said or r in lost:
                continue
            key = f"{prefix}/{call}/{r}"
            if kv.check([key]):
                said[r] = kv.get(key).decode()
            elif (why := _why_lost(kv, r)) is not None:
                lost[r] = why
        if len(said) + len(lost) == len(ranks) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    problems = [f"rank {r} failed: {said[r][1:]}" for r in ranks if said.get(r, "").startswith("!")]
    problems += [f"rank {r} was lost: {lost[r]}" for r in ranks if r in lost]
    problems += [f"rank {r} did not report within {timeout_s or TIMEOUT_S:g} s" for r in ranks
                 if r not in said and r not in lost]
    if problems:
        raise RankFailure("; ".join(problems))
    if call:  # every rank has set this call's key, so has read the last call's: drop this rank's
        kv.delete_key(f"{prefix}/{call - 1}/{me}")


def reason(e: BaseException) -> str:
    """What a rank reports of its exception: a user's error as its message (which names the
    argument or file), anything else with its type."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, (ValueError, TypeError, OSError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def agreed(group, work):
    """``work()`` on this rank; with several ranks, an exception on any of them raises
    :class:`RankFailure` on every one (naming the ranks and their messages; chained to this
    rank's own exception) before the collectives that follow, which a failed rank would never
    join. Collective."""
    if world(group) == 1:
        return work()
    value = cause = None
    try:
        value = work()
    except Exception as e:  # noqa: BLE001 (reported to every rank, then raised here too)
        cause = e
    try:
        agree(group, None if cause is None else reason(cause))
    except RankFailure as failure:
        raise failure from cause
    return value


def gather_objects(obj, group) -> list:
    """Every rank's picklable ``obj``, in rank order (tensors in it should be on the CPU)."""
    if world(group) == 1:
        return [obj]
    out = [None] * world(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


EXIT_WAIT_S = 10.0  # how long a failing rank of a command waits for its peers to exit too


def failed(line: str) -> int:
    """A command's end after a RankFailure: print ``line`` and return the exit status 2 or,
    under torchrun, exit with it at the same moment as every other live rank. torchrun stops
    the remaining ranks (SIGTERM) as soon as one exits with an error, which would cut their own
    error line (and cleanup) short: so SIGTERM is ignored from here on, the ranks meet in the
    rendezvous store (those that died are not waited for past EXIT_WAIT_S), and each leaves by
    os._exit, without the interpreter's teardown, whose length varies by rank (and whose gloo
    threads may abort it).
    The caller has cleaned up: a merge removed its output before raising."""
    import signal
    import sys
    import threading

    if "TORCHELASTIC_RUN_ID" not in os.environ or not torch.distributed.is_initialized():  # no torchrun agent
        print(line, file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():  # where Python sets handlers
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    # One write: the ranks share torchrun's stderr, and a line written in parts can interleave.
    os.write(sys.stderr.fileno(), f"{line}\n".encode())
    try:
        kv = store()
        if kv.add("transferops/exit", 1) >= torch.distributed.get_world_size() - len(lost()):  # the living
            kv.set("transferops/exit/all", "")
        kv.wait(["transferops/exit/all"], timedelta(seconds=EXIT_WAIT_S))
    except RuntimeError:  # a peer that died, or the store with it (its rank 0): leave now
        pass
    os._exit(2)
