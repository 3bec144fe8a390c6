"""Scale-out on torch.distributed: each op with 2 gloo ranks against 1 on this machine, the same
cores in all (1 rank of T threads against 2 ranks of T / 2), so the ratio says what splitting
the work costs or saves before a second machine adds any: the collectives, the imbalance, the
per-rank fixed costs. Ranks are processes spawned once per group size and kept (a pool), so a
timed call is the op alone, as in a long-running job. Rows: ``2 ranks``; ``peer:1 rank``, the
same code on a group of one (its "vs peer" ratio: the speed-up of 2 ranks); ``group=None``,
the one-process op a user runs today.

- sinkhorn: ``sinkhorn(x_rows, y, group=)`` on clustered clouds (bench_ot's), N = M, d = 64,
  float32, eps = 0.05, a fixed ITERATIONS iterations (tol unreachable), so that both do the
  same work (the one-process solver takes Anderson steps, other iterates: its rows are
  bench_ot's). Values agree to float32 rounding (tiles summed in float32, split elsewhere).
- logme stream: ``LogMEStream(group=)`` fed each rank's shard of N samples for 4 models
  (D = 256 .. 1024), then ``score()`` (all-reduced statistics): scores to 1e-10.
- merge ties: ``merge_files(..., group=)`` of 3 fine-tuned checkpoints into a fresh folder (TIES,
  density 0.2), tensors split across ranks by bytes: the merged tensors bit for bit.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import shutil
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from .harness import Case, dry_run

ITERATIONS = 20
EPS = 0.05


class RankPool:
    """``world`` spawned processes joined in a gloo group (file rendezvous: no port chosen),
    each with ``threads`` torch threads, kept alive to run one call after another: calling the
    pool runs ``fn(*args)`` on every rank and returns rank 0's result."""

    def __init__(self, world: int, threads: int):
        ctx = multiprocessing.get_context("spawn")
        self.folder = tempfile.mkdtemp(prefix="transferops-ranks-")
        self.conns, self.procs = [], []
        # OMP_NUM_THREADS as torchrun sets it (1 for several ranks), read when the child's OpenMP
        # runtimes load: torch.set_num_threads alone leaves the native kernels' threads spinning
        # beside the other ranks'
        before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            for rank in range(world):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(rank, world, self.folder, threads, theirs), daemon=True)
                proc.start()
                self.conns.append(mine)
                self.procs.append(proc)
        finally:
            if before is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = before
        atexit.register(self.close)

    def __call__(self, fn, *args):
        for conn in self.conns:
            conn.send((fn, args))
        answers = [conn.recv() for conn in self.conns]
        for rank, (ok, value) in enumerate(answers):
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
        return answers[0][1]

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                conn.send(None)
                proc.join(10)
        self.conns, self.procs = [], []
        shutil.rmtree(self.folder, ignore_errors=True)


def _serve(rank: int, world: int, folder: str, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=300))
    while (message := conn.recv()) is not None:
        fn, args = message
        try:
            conn.send((True, fn(*args)))
        except Exception:  # noqa: BLE001 (sent to the caller, which raises it)
            conn.send((False, traceback.format_exc()))
    torch.distributed.destroy_process_group()


@functools.lru_cache(maxsize=None)
def pool(world: int) -> RankPool:
    return RankPool(world, max(1, torch.get_num_threads() // world))


def _group(world: int):
    return None if world == 0 else torch.distributed.group.WORLD


def _share(n: int) -> slice:
    """This rank's block of n rows (the whole on a group of one, or with no group)."""
    if not torch.distributed.is_initialized():
        return slice(0, n)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    block = torch.arange(n).tensor_split(world)[rank]
    return slice(int(block[0]), int(block[-1]) + 1)


# The inputs, made once per process: the timed calls are the op alone.
@functools.lru_cache(maxsize=2)
def _clouds(N: int):
    from .bench_ot import _clouds

    return _clouds(1, N, N, 64, torch.float32, "cpu")


@functools.lru_cache(maxsize=2)
def _features(N: int, widths: tuple[int, ...]):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (N,), generator=g)
    return [torch.randn(N, D, generator=g) + torch.nn.functional.one_hot(labels, D).float() for D in widths], labels


def _sinkhorn(N: int, sharded: bool):
    import warnings

    from transferops.ot import sinkhorn

    x, y = _clouds(N)
    rows = _share(N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # not converged: the count is fixed
        r = sinkhorn(x[0, rows], y[0], eps=EPS, tol=1e-30, max_iter=ITERATIONS, progress=False,
                     group=torch.distributed.group.WORLD if sharded else None)
    return r.ot_eps


def _logme(N: int, widths: tuple[int, ...], sharded: bool):
    from transferops import LogMEStream

    feats, labels = _features(N, widths)
    rows = _share(N)
    stream = LogMEStream(group=torch.distributed.group.WORLD if sharded else None)
    for chunk in torch.arange(rows.start, rows.stop).split(4096):
        stream.update([f[chunk] for f in feats], labels[chunk])
    return stream.score()


def _merge(inputs: list[str], sharded: bool):
    from safetensors.torch import load_file

    from transferops.merging_models import merge_files

    out = Path(inputs[0]).parent / "merged"  # calls never overlap: one folder serves them all
    merge_files(inputs[0], inputs[1:], out, method="ties", density=0.2, overwrite=True,
                group=torch.distributed.group.WORLD if sharded else None)
    if sharded and torch.distributed.get_rank():
        return None
    merged = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    return torch.cat([merged[k].flatten() for k in sorted(merged)])


def _checkpoints(folder: Path, mb: int) -> list[str]:
    """A base and 3 fine-tuned checkpoints of ``mb`` MiB each (float32 tensors of a LLaMA-like
    shape mix), saved with safetensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    width = 512
    shapes = {f"layers.{i}.{name}": shape for i in range(max(1, mb // 6))
              for name, shape in (("attn.weight", (width, width)), ("mlp.weight", (4 * width, width)),
                                  ("norm.weight", (width,)))}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = []
    for m in range(4):
        tensors = base if m == 0 else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        path = folder / f"model{m}.safetensors"
        save_file(tensors, str(path))
        paths.append(str(path))
    return paths


def _case(op: str, size: str, fn, *args, alone: bool = True, **kw) -> Case:
    """``fn(*args, sharded)`` on 2 ranks (the result the others must match), against 1 rank (the
    peer: its time over 2 ranks' is the ratio printed), and with ``alone`` group=None in this
    process."""
    ours = {"2 ranks": functools.partial(pool(2), fn, *args, True)}
    if alone:
        ours["group=None"] = functools.partial(fn, *args, False)
    return Case(op=op, size=size, dtype=torch.float32, ours=ours, peers={"peer:1 rank": functools.partial(
        pool(1), fn, *args, True)}, expected="2 ranks", **kw)


def cases(quick: bool, device: str):
    if device != "cpu" or not torch.distributed.is_available():
        return
    N = 256 if dry_run() else 3000 if quick else 6000
    # float32 tiles: sums split at other places agree to float32 rounding
    yield _case("dist sinkhorn", f"N=M={N} d=64 {ITERATIONS} it", _sinkhorn, N, alone=False, bytes=2 * N * 64 * 4,
                flops=4 * N * N * 64 * ITERATIONS, tolerance=(1e-6, 0.0))
    n = 512 if dry_run() else 20000 if quick else 50000
    widths = (32, 64) if dry_run() else (256, 512, 768, 1024)
    yield _case("dist logme stream", f"N={n} D={min(widths)}..{max(widths)}", _logme, n, widths,
                bytes=n * sum(widths) * 4, flops=n * sum(d * d for d in widths) * 2, tolerance=(1e-10, 0.0))
    folder = Path(tempfile.mkdtemp(prefix="transferops-bench-dist-"))
    atexit.register(shutil.rmtree, folder, True)
    inputs = _checkpoints(folder, 6 if dry_run() else 48 if quick else 96)
    size = sum(Path(p).stat().st_size for p in inputs)
    yield _case("dist merge ties", f"4 x {size // 4 >> 20} MiB", _merge, inputs, bytes=size * 5 // 4,
                tolerance=(0.0, 0.0))
