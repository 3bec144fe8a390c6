"""Several ranks of a torch.distributed gloo group on this machine, each a fresh (spawned)
process, bounded in time. The rendezvous is a file in a fresh temporary folder, so no port is
chosen here (gloo's own connections take ports the OS hands out): parallel test workers
cannot collide."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import NamedTuple


class Outcome(NamedTuple):
    rank: int
    exitcode: int | None  # None: still running at the deadline (then killed)
    value: object  # what the target returned
    error: str | None  # the exception's traceback, where it raised


def _child(target, rank, world, init_file, threads, results, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        value, error = target(rank, world, *args), None
    except BaseException:  # noqa: BLE001 (reported to the parent, which fails the test)
        value, error = None, traceback.format_exc()
    # pickled here, by value: the queue's own pickler would share tensors through file
    # descriptors that die with this process, which exits right away
    results.put(pickle.dumps((rank, value, error)))
    results.close()
    results.join_thread()
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0 if error is None else 1)


def spawn_ranks(target, world: int, *args, timeout: float = 120.0, threads: int = 1) -> list[Outcome]:
    """Run ``target(rank, world, *args)`` (a module-level function of an importable module) in
    ``world`` processes joined in a gloo group; their outcomes in rank order. Processes still
    running after ``timeout`` seconds are killed (exitcode None)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_child, args=(target, r, world, os.path.join(tmp, "rendezvous"), threads,
                                                  results, args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        got: dict[int, tuple] = {}
        # every process polled each round: that reaps a dead one, so that its peers, which
        # look for its pid, find it gone (a zombie would answer as alive)
        while time.monotonic() < deadline and (len(got) < world and any([p.is_alive() for p in procs])
                                                or not results.empty()):
            try:
                rank, value, error = pickle.loads(results.get(timeout=0.1))
                got[rank] = (value, error)
            except queue.Empty:
                pass
        outcomes = []
        for r, p in enumerate(procs):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
                code = None
            else:
                code = p.exitcode
            value, error = got.get(r, (None, None))
            outcomes.append(Outcome(r, code, value, error))
    return outcomes


def run_ranks(target, world: int, *args, timeout: float = 120.0, threads: int = 1) -> list:
    """:func:`spawn_ranks`, every rank bound to succeed: the values in rank order, or an
    AssertionError with every failed rank's traceback."""
    outcomes = spawn_ranks(target, world, *args, timeout=timeout, threads=threads)
    bad = [o for o in outcomes if o.error is not None or o.exitcode != 0]
    if bad:
        raise AssertionError("\n".join(f"rank {o.rank}: exit code {o.exitcode}\n{o.error or ''}" for o in bad))
    return [o.value for o in outcomes]
