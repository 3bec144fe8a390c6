"""Timing, floors, correctness checks and reporting shared by every bench module.

A hot path's module ``bench_<stem>`` exposes ``cases(quick: bool, device: str)``, an iterable
of :class:`Case` (a generator keeps only one case's inputs alive). :func:`run` calls each of a
case's callables once, checks the result against the case's expected backend, times it, and
relates the time to the floors measured in the same run and to the fastest peer.

The GPU check (bench/gpu_check.sh, docs/gpu.md) runs the CUDA cases with ``--quick``; a case
may name GPU bars (:data:`GPU_BARS`: targets judged on its rows and printed beside the
figures). A dry run (``run(dry_run=True)``) builds the same GPU cases at tiny sizes on the CPU,
Triton in its interpreter, and times each callable once: it checks that they run, not how fast.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

import transferops
from transferops._info import info_dict

HOT_PATHS = ("merging", "transferability", "ot", "adapters", "dist")  # each names a module bench_<stem>, run in this order
VERSIONED = ("torch", "triton", "numpy", "transferops", "peft", "mergekit", "pot", "geomloss")
DTYPE_NAMES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
# (rtol, atol) against the expected result: peers in bf16/f16 round their intermediate sums too.
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (4e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}
# The reference backend is the readable spec, not a hot path: timing it is worth seconds, not minutes.
REFERENCE_MAX_CALL_S = 5.0


@dataclass(frozen=True)
class Settings:
    warmup: int  # untimed calls after the checking call, which already warmed up
    repeats: int
    min_repeats: int
    budget_s: float  # timed seconds per callable after which repeats stop (past min_repeats)


QUICK = Settings(warmup=0, repeats=10, min_repeats=3, budget_s=0.5)
FULL = Settings(warmup=1, repeats=50, min_repeats=5, budget_s=3.0)
DRY = Settings(warmup=0, repeats=1, min_repeats=1, budget_s=0.0)  # a dry run: one timed call each

_dry_run = False  # set by run(dry_run=True) while it runs


class DryRunError(RuntimeError):
    """A dry run that warned: a GPU case crashed or disagrees with its expected result."""


def dry_run() -> bool:
    """Whether the running bench is a dry run: the GPU check's cases, tiny, on the CPU."""
    return _dry_run


def gpu_cases(device: str) -> bool:
    """Whether ``device`` gets the GPU check's cases: on CUDA, and on the CPU in a dry run."""
    return _is_cuda(device) or _dry_run


@dataclass(frozen=True)
class Bar:
    """A target of the GPU check, judged on the rows of the case that names it (Case.bars)."""

    name: str
    hot_path: str
    text: str  # the target, as printed
    backend: str | None  # the row of ours judged; None: the fastest of ours but reference and native (CPU)
    # "floor": the case's floor time over ours (the fraction of the floor's speed reached);
    # "peer:<name>": that peer's time over ours; "time": our seconds.
    measure: str
    target: float  # "floor" and "peer:": at least this; "time": at most this


GPU_BARS = {bar.name: bar for bar in (
    Bar("sinkhorn-floor", "ot", "online Sinkhorn per iteration, N = M = 100k, d = 64: within 2x of the FLOP "
        "floor of recomputing the costs", "triton", "floor", 0.5),
    Bar("sinkhorn-geomloss", "ot", "online Sinkhorn per iteration, N = M = 100k, d = 64: >= 10x GeomLoss's "
        "online backend", "triton", "peer:geomloss-online", 10.0),
    Bar("merge-copy", "merging", "merge (TIES of state dicts): >= 70% of the device's copy bandwidth", None,
        "floor", 0.7),
    Bar("bottleneck-hbm", "adapters", "bottleneck adapter forward in bf16: >= 70% of HBM bandwidth (the copy "
        "floor)", None, "floor", 0.7),
    Bar("logme-20", "transferability", "LogME of 20 models, N = 10k, D <= 2048: under 0.5 s", None, "time", 0.5),
)}


@dataclass
class Case:
    """One op at one size: callables (no arguments, returning a tensor) that must agree.

    ``peers`` maps "peer:<package>" to a callable, or to None when the package is not installed
    (or to a string saying why the peer cannot run).
    """

    op: str
    size: str
    dtype: torch.dtype
    bytes: int  # the least the op must read and write
    ours: dict[str, Callable[[], torch.Tensor]]
    peers: dict[str, Callable[[], torch.Tensor] | str | None]
    flops: int | None = None
    expected: str = "reference"  # the key of ``ours`` whose result is the truth
    # Entries where implementations may legitimately differ are left out of the check: a
    # function returning the bool mask of entries to compare (None: all of them).
    comparable: Callable[[], torch.Tensor] | None = None
    # An op-specific floor measured in the same run, (name, callable): its median replaces the
    # bandwidth/GEMM model in the case's %floor (LogME: the Gram matrix + eigenvalues only).
    floor: tuple[str, Callable[[], object]] | None = None
    # (rtol, atol) of the agreement check where the dtype's default is wrong: iterative solvers
    # stopped at a tolerance agree to that tolerance, not to rounding.
    tolerance: tuple[float, float] | None = None
    # A measurement that is not a time (e.g. saved activation memory), printed as a note.
    note: Callable[[], str] | None = None
    # Times per iteration: a dict the callables fill as they run (name: iterations per call);
    # rows then hold the time of one iteration, and bytes and flops are those of one.
    iterations: dict[str, int] | None = None
    # Names of the GPU_BARS judged on this case's rows.
    bars: tuple[str, ...] = ()


@dataclass
class Row:
    op: str
    size: str
    backend_or_peer: str
    kind: str  # "ours", "peer" or "floor"
    device: str
    dtype: str
    p20: float  # seconds
    p50: float
    p80: float
    repeats: int
    gbps: float | None = None
    gflops: float | None = None
    floor_fraction: float | None = None  # floor time / p50
    ratio_to_best_peer: float | None = None  # best peer p50 / p50: > 1 is faster than every peer
    matches: bool | None = None  # agrees with the expected result; None where not checked


@dataclass
class Floors:
    copy_bps: float  # bytes read + written per second
    gemm_flops: dict[torch.dtype, float]

    def time(self, case: Case) -> float:
        t = case.bytes / self.copy_bps
        if case.flops:
            t = max(t, case.flops / self.gemm_flops.get(case.dtype, self.gemm_flops[torch.float32]))
        return t


def optional_import(module: str):
    """The module, or None when its package is not installed (the peer is then skipped)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _status_bytes(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> int | None:
    """Sets the process's peak resident memory (VmHWM) to its current one and returns that, in
    bytes, so that peak_rss() - reset_peak_rss() is what the code in between added at its peak
    (Linux 4.0 and later, through /proc/self/clear_refs); None elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def peak_rss() -> int | None:
    """The process's peak resident memory (VmHWM) in bytes since start or reset_peak_rss()."""
    return _status_bytes("VmHWM")


def train_steps(model: torch.nn.Module, loss_of: Callable, batches, lr: float) -> dict:
    """AdamW steps on ``model``'s trainable parameters, one per batch (``loss_of(batch)`` is the
    loss): the losses, the median step time, and the peak resident memory of the steps above
    what the process held before them (None where unmeasured)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, times = [], []
    before = reset_peak_rss()
    for batch in batches:
        t0 = time.perf_counter()
        loss = loss_of(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = peak_rss()
    return dict(losses=losses, step_s=sorted(times)[len(times) // 2],
                peak=None if before is None or peak is None else peak - before)


def in_own_process(module: str, args: list[str], env: dict | None = None) -> dict:
    """The JSON line ``python -m module *args`` prints last, run in a fresh interpreter (so that
    one run's freed memory does not serve another's), with ``env`` added to the environment."""
    command = [sys.executable, "-m", module, *args]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.splitlines()[-1])


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def timed_backends(device: str) -> list[str]:
    """The backends that run on ``device``, to time. On CPU, triton runs only interpreted
    (TRITON_INTERPRET=1), a test aid far too slow to time: only a dry run calls it."""
    return [b for b, why in transferops.available_backends(device).items()
            if why is None and (_is_cuda(device) or b != "triton" or _dry_run)]


def _sync(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _timer(fn, device: str):
    """A callable that runs ``fn()`` once and returns its seconds."""
    if _is_cuda(device):
        def once() -> float:
            # Events time the device between them (host launch gaps included), not host queueing.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return once

    def once() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return once


def time_interleaved(fns: dict, *, warmup: int, repeats: int, device: str, budget_s: float = 1.0,
                     min_repeats: int = 3, slow=frozenset()) -> dict:
    """{name: p20/p50/p80 seconds} of each ``fns[name]()``, timed in rounds of one call each in a
    rotating order, so that the machine's drifts (neighbours, clocks) fall on all of them alike
    and their ratios hold (on a shared VM, callables timed one after another catch different
    phases of its speed). Each callable takes ``warmup`` untimed calls, then stops after
    ``repeats`` timed ones, or once past ``min_repeats`` they add up to ``budget_s``; those in
    ``slow`` (already warmed by a call over a second) take no warmup and stop after 3."""
    once = {name: _timer(fn, device) for name, fn in fns.items()}
    _sync(device)
    for name, fn in fns.items():
        for _ in range(0 if name in slow else warmup):
            fn()
    samples: dict = {name: [] for name in fns}

    def running(name) -> bool:
        got, least = samples[name], min(3, min_repeats) if name in slow else min_repeats
        return len(got) < repeats and (len(got) < least or sum(got) < budget_s)

    rounds = 0
    while names := [n for n in fns if running(n)]:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(once[name]())
        rounds += 1
    stats = {}
    for name, got in samples.items():
        p20, p50, p80 = np.percentile(got, [20, 50, 80])
        stats[name] = {"p20": float(p20), "p50": float(p50), "p80": float(p80), "repeats": len(got)}
    return stats


def time_fn(fn, **kw) -> dict:
    """time_interleaved of one callable."""
    return time_interleaved({"fn": fn}, **kw)["fn"]


def measure_floors(device: str, quick: bool, s: Settings) -> tuple[Floors, list[Row]]:
    """Copy bandwidth and GEMM rate of ``device``, measured now so that they share the run's
    clocks, threads and neighbours."""
    cuda = _is_cuda(device)
    # Large enough to spill every cache, so the copy runs at memory speed.
    nbytes = 1 << 30 if cuda else (8 << 20 if _dry_run else 64 << 20 if quick else 256 << 20)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(functools.partial(dst.copy_, src), warmup=s.warmup + 1, repeats=s.repeats, device=device,
                budget_s=s.budget_s, min_repeats=s.min_repeats)
    del src, dst
    copy_bps = 2 * nbytes / t["p50"]
    rows = [Row("floor:copy", f"{nbytes >> 20} MiB", "torch", "floor", device, "f32", **t, gbps=copy_bps / 1e9)]
    n = 8192 if cuda else (256 if _dry_run else 1024 if quick else 2048)
    gemm = {}
    for dtype in (torch.bfloat16, torch.float32) if cuda else (torch.float32,):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        t = time_fn(lambda: torch.mm(a, b), warmup=s.warmup + 1, repeats=s.repeats, device=device,
                    budget_s=s.budget_s, min_repeats=s.min_repeats)
        gemm[dtype] = 2 * n**3 / t["p50"]
        rows.append(Row("floor:gemm", f"n={n} {DTYPE_NAMES[dtype]}", "torch", "floor", device, DTYPE_NAMES[dtype],
                        **t, gflops=gemm[dtype] / 1e9))
    return Floors(copy_bps, gemm), rows


def _agree(got: torch.Tensor, want: torch.Tensor | None, dtype: torch.dtype, what: str, warnings: list[str],
           comparable: torch.Tensor | None = None, tolerance: tuple[float, float] | None = None):
    if want is None:
        return None
    if got.shape != want.shape:
        warnings.append(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        return False
    rtol, atol = tolerance or TOLERANCE[dtype]
    got, want = got.double(), want.double()
    if comparable is not None:
        got, want = got[comparable], want[comparable]
    close = torch.isclose(got, want, rtol=rtol, atol=atol)
    if bool(close.all()):
        return True
    warnings.append(f"{what}: {int((~close).sum())} of {close.numel()} entries differ "
                    f"(max |diff| {float((got - want).abs().max()):.3g}, rtol {rtol:g}, atol {atol:g})")
    return False


def run_case(case: Case, device: str, floors: Floors, s: Settings, notes: list[str],
             warnings: list[str], bars: list[dict] | None = None) -> list[Row]:
    """Check and time every callable of ``case``; rows carry ratios and floor fractions. The
    judgments of the case's GPU bars are appended to ``bars`` (see :func:`judge_bar`)."""
    where = f"{case.op} {case.size} on {device}"
    callables = [(name, "ours", fn) for name, fn in case.ours.items()]
    callables.sort(key=lambda c: c[0] != case.expected)  # the expected result first: it checks the rest
    skipped: dict[str, str] = {}  # name: why it has no row
    for name, fn in case.peers.items():
        if fn is None or isinstance(fn, str):
            skipped[name] = f"unavailable ({fn or 'not installed'})"
            notes.append(f"{name} {skipped[name]}")
        else:
            callables.append((name, "peer", fn))
    expected, checked = None, []
    comparable = case.comparable() if case.comparable else None
    timed, slow = {}, set()
    for name, kind, fn in callables:
        try:
            t0 = time.perf_counter()
            result = fn()
            _sync(device)
            first_s = time.perf_counter() - t0
        except transferops.BackendUnavailable as e:
            skipped[name] = f"skipped: {e}"
            notes.append(f"{name} skipped at {where}: {e}")
            continue
        except Exception as e:  # a crashing callable is reported, the others still run
            skipped[name] = f"failed: {type(e).__name__}: {e}"
            warnings.append(f"{name} failed at {where}: {type(e).__name__}: {e}")
            continue
        if kind == "ours" and name == case.expected:
            expected, matches = result, None
        else:
            matches = _agree(result, expected, case.dtype, f"{name} vs {case.expected} at {where}", warnings,
                             comparable, case.tolerance)
        del result
        if name == "reference" and first_s > REFERENCE_MAX_CALL_S:
            skipped[name] = f"not timed: one call took {first_s:.1f} s"
            notes.append(f"reference not timed at {where}: one call took {first_s:.1f} s")
            continue
        if case.iterations is not None and not case.iterations.get(name):
            skipped[name] = "reported no iteration count"
            warnings.append(f"{name} at {where}: reported no iteration count, not timed")
            continue
        if first_s > 1.0:  # the checking call already warmed it; a few samples suffice
            slow.add(name)
        timed[name] = fn
        checked.append((name, kind, matches))
    floor_s = floors.time(case)
    if case.floor is not None:
        name, fn = case.floor
        fn()
        timed[name] = fn
        checked.append((name, "floor", None))
    t = time_interleaved(timed, warmup=s.warmup, repeats=s.repeats, device=device, budget_s=s.budget_s,
                         min_repeats=s.min_repeats, slow=slow)
    if case.iterations is not None:  # per iteration
        for name, n in case.iterations.items():
            if name in t:
                t[name] = {k: v / n if k != "repeats" else v for k, v in t[name].items()}
    rows = [Row(case.op, case.size, name, kind, device, DTYPE_NAMES[case.dtype], **t[name], matches=matches)
            for name, kind, matches in checked]
    if case.floor is not None:
        floor_s = t[case.floor[0]]["p50"]
    if case.note is not None:
        notes.append(f"{case.op} {case.size}: {case.note()}")
    # A peer that computes something else sets no bar.
    best = min((r.p50 for r in rows if r.kind == "peer" and r.matches is not False), default=None)
    for r in rows:
        r.gbps = case.bytes / r.p50 / 1e9
        r.gflops = case.flops / r.p50 / 1e9 if case.flops else None
        r.floor_fraction = floor_s / r.p50
        r.ratio_to_best_peer = best / r.p50 if best is not None else None
    if bars is not None:
        bars += [judge_bar(GPU_BARS[name], case, rows, skipped, floor_s, device) for name in case.bars]
    return rows


def judge_bar(bar: Bar, case: Case, rows: list[Row], skipped: dict[str, str], floor_s: float, device: str) -> dict:
    """A GPU bar judged on one case's rows: a dict with the bar, the case, the backend judged,
    its ``value`` (the measure), ``figure`` (the text printed beside the target) and ``met``:
    True, False, or None where it was not run (``figure`` says why) or in a dry run."""
    out = {"bar": bar.name, "hot_path": bar.hot_path, "text": bar.text, "measure": bar.measure, "target": bar.target,
           "op": case.op, "size": case.size, "dtype": DTYPE_NAMES[case.dtype], "device": device, "backend": None,
           "value": None, "met": None, "dry_run": _dry_run, "figure": None}
    # The CPU's native backend runs in a dry run only, and is no figure of the GPU.
    want = [bar.backend] if bar.backend else [n for n in case.ours if n.split()[0] not in ("reference", "native")]
    ours = [r for r in rows if r.kind == "ours" and r.backend_or_peer in want]
    if not ours:
        why = "; ".join(f"{n} {skipped[n]}" for n in want if n in skipped) or f"no row of {', '.join(want) or 'ours'}"
        out["figure"] = f"not run: {why}"
        return out
    r = min(ours, key=lambda r: r.p50)
    per = " per iteration" if case.iterations is not None else ""
    out["backend"] = r.backend_or_peer
    figure = f"{r.backend_or_peer} {_fmt_time(r.p50)}{per}"
    if bar.measure == "floor":
        out["value"] = r.floor_fraction
        figure += (f"; floor {_fmt_time(floor_s)}: {100 * r.floor_fraction:.3g}% of the floor's speed "
                   f"(target >= {100 * bar.target:.0f}%)")
    elif bar.measure == "time":
        out["value"] = r.p50
        figure += f" (target <= {_fmt_time(bar.target)})"
    else:
        peer = bar.measure
        theirs = next((p for p in rows if p.backend_or_peer == peer), None)
        if theirs is None:
            out["figure"] = f"{figure}; {peer} not run: {skipped.get(peer, 'no row')}"
            return out
        out["value"] = theirs.p50 / r.p50
        figure += f"; {peer} {_fmt_time(theirs.p50)}{per}: {_fmt_ratio(out['value'])} (target >= {bar.target:g}x)"
        if theirs.matches is False:
            figure += f" ({peer} disagrees)"
    if r.matches is False:
        out["figure"] = figure + f" (disagrees with {case.expected}: not met)"
        out["met"] = None if _dry_run else False
        return out
    out["figure"] = figure
    if not _dry_run:
        out["met"] = out["value"] <= bar.target if bar.measure == "time" else out["value"] >= bar.target
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_meta(devices: list[str], quick: bool) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "devices": {d: torch.cuda.get_device_name(d) if _is_cuda(d) else _cpu_model() for d in devices},
        "versions": _versions(),
        "transferops_info": info_dict(),
    }


def _fmt_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.{2 if x < 10 else 1}f}x"


def _cells(r: dict) -> tuple[str, ...]:
    frac = r["floor_fraction"]
    return (r["op"], r["size"], r["backend_or_peer"] + (" (!)" if r["matches"] is False else ""),
            _fmt_time(r["p50"]), _fmt_ratio(r["ratio_to_best_peer"]),
            "-" if frac is None else f"{100 * frac:.1f}%",
            "-" if r["gbps"] is None else f"{r['gbps']:.3g}")


def print_table(rows: list[dict], out=sys.stdout) -> None:
    """One fixed-width table per device, then that device's floors; fits 100 columns."""
    line = "{:<15} {:<20} {:<18} {:>9} {:>8} {:>7} {:>8}"
    for device in dict.fromkeys(r["device"] for r in rows):
        here = [r for r in rows if r["device"] == device]
        print(f"\n[{device}]", file=out)
        print(line.format("op", "size", "backend", "median", "vs peer", "%floor", "GB/s"), file=out)
        for r in here:
            print(line.format(*_cells(r)), file=out)
        floors = [f"copy {r['gbps']:.3g} GB/s" if r["op"] == "floor:copy"
                  else f"gemm {r['dtype']} {r['gflops']:.4g} GFLOP/s" for r in here if r["op"].startswith("floor:")]
        if floors:
            print(f"floors ({device}): " + ", ".join(floors), file=out)
    if any(r["matches"] is False for r in rows):
        print("(!) disagrees with the reference: see the warnings", file=out)


def write_json(rows: list[dict], meta: dict, path: str) -> None:
    """Write ``{"meta": ..., "rows": ...}`` to ``path`` atomically: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json.tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _bar_lines(judged: list[dict], names, dry: bool, missing: Callable[[Bar], str]) -> list[str]:
    """The bars section: each of ``names`` (GPU_BARS keys) with its judgments, or why none."""
    lines = ["", "GPU bars" + (" (dry run: figures from the Triton interpreter on the CPU at tiny sizes, not judged)"
                               if dry else "") + ":"]
    for name in names:
        bar = GPU_BARS[name]
        here = [j for j in judged if j["bar"] == name] or [None]
        for j in here:
            if j is None:
                verdict, figure = "NOT RUN", missing(bar)
            else:
                verdict = ("dry run" if j["dry_run"] else "NOT RUN" if j["met"] is None
                           else "met" if j["met"] else "NOT MET")
                size = j["size"] if j["dtype"] in j["size"].split() else f"{j['size']} {j['dtype']}"
                figure = f"{j['op']} {size} on {j['device']}: {j['figure']}"
            lines.append(f"  [{verdict}] {bar.text}")
            lines.append(f"      {figure}")
    return lines


def run(*, quick: bool = False, only: list[str] | None = None, device: str | None = None,
        json_path: str | None = None, results_dir: str | None = None, dry_run: bool = False,
        out=sys.stdout) -> list[dict]:
    """Measure floors, check and time every hot path's cases, print the table, optionally write
    JSON, and return the rows.

    ``only`` keeps the named hot paths (see ``HOT_PATHS``); ``device`` None means the CPU plus
    CUDA when available. ``results_dir`` appends the run to its machine kinds' JSON Lines files
    there (:mod:`transferops.bench.results`). ``json_path`` is rewritten after every case (its
    meta's ``complete`` false until the run ends), so a run killed by a time limit leaves the
    cases it finished. ``dry_run``: the GPU check's cases at tiny sizes on the CPU, the Triton
    ones in its interpreter (TRITON_INTERPRET=1 must be set before transferops.kernels is
    imported), each callable timed once; its figures say nothing about speed, and a warning
    (a case that crashed or disagrees) is an error.
    """
    global _dry_run
    only = [only] if isinstance(only, str) else only
    unknown = set(only or ()) - set(HOT_PATHS)
    if unknown:
        raise ValueError(f"only: unknown hot path(s) {sorted(unknown)}; expected some of {list(HOT_PATHS)}")
    if dry_run:
        from transferops._backend import triton_interpreted

        if device not in (None, "cpu"):
            raise ValueError(f"dry_run: runs on the CPU, got device={device!r}")
        if not triton_interpreted():
            raise ValueError("dry_run: set TRITON_INTERPRET=1 (before transferops.kernels is imported)")
        device, quick = "cpu", True
    stems = [stem for stem in HOT_PATHS if only is None or stem in only]
    devices = [device] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    s = DRY if dry_run else QUICK if quick else FULL
    started = time.perf_counter()
    rows: list[Row] = []
    hot_paths: list[str | None] = []  # each row's, None for the floors
    notes: list[str] = []
    warnings: list[str] = []
    judged: list[dict] = []
    meta = run_meta(devices, quick)
    meta.update(dry_run=dry_run, hot_paths=stems, complete=False)

    def finish(complete: bool) -> list[dict]:
        meta.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    elapsed_s=round(time.perf_counter() - started, 2), complete=complete,
                    notes=list(dict.fromkeys(notes)), warnings=list(dict.fromkeys(warnings)), bars=judged)
        dicts = [asdict(r) for r in rows]
        if json_path:
            write_json(dicts, meta, json_path)
        return dicts

    _dry_run = dry_run
    try:
        for dev in devices:
            floors, floor_rows = measure_floors(dev, quick, s)
            rows += floor_rows
            hot_paths += [None] * len(floor_rows)
            if json_path:  # a run ended before its first case still says it started
                finish(False)
            for stem in stems:
                module = importlib.import_module(f"{__package__}.bench_{stem}")
                for case in module.cases(quick, dev):
                    print(f"  {dev}: {case.op} {case.size}", file=sys.stderr, flush=True)  # progress
                    case_rows = run_case(case, dev, floors, s, notes, warnings, judged)
                    rows += case_rows
                    hot_paths += [stem] * len(case_rows)
                    if json_path:
                        finish(False)
    finally:
        _dry_run = False
    dicts = finish(True)
    machine = meta["machine"]
    mode = "dry run" if dry_run else "quick" if quick else "full"
    print(f"transferops.bench {mode}: {machine['cpu']}, {machine['cores']} cores, "
          f"{machine['torch_threads']} torch threads; {meta['elapsed_s']:.1f} s", file=out)
    print_table(dicts, out)
    for label, items in (("note", meta["notes"]), ("WARNING", meta["warnings"])):
        for item in items:
            print(f"{label}: {item}", file=out)
    bars = [name for name, bar in GPU_BARS.items() if bar.hot_path in stems]
    if bars and (dry_run or any(_is_cuda(d) for d in devices)):
        for line in _bar_lines(judged, bars, dry_run, lambda bar: "not run: no case of this run names it"):
            print(line, file=out)
    if dry_run and meta["warnings"]:
        raise DryRunError(f"dry run failed: {len(meta['warnings'])} warning(s) above (a GPU case crashed or "
                          "disagrees)")
    if results_dir:
        from .results import record  # results imports this module

        for path in record(dicts, meta, hot_paths, results_dir):
            print(f"recorded in {path}", file=out)
    return dicts


def report(paths: list[str], *, json_path: str | None = None, out=sys.stdout) -> dict:
    """Runs written by ``run(json_path=...)`` (one per hot path, say, each in its own process
    under its own time limit), printed as one report: each run's table, its notes and warnings,
    then every GPU bar with its figure, or why it has none (a run cut short, a missing file).
    With ``json_path``, writes them as one ``{"meta": {..., "runs": [...], "bars": [...]},
    "rows": [...]}``. Returns that dict."""
    runs, problems = [], []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "meta" not in data:
                raise ValueError("not a transferops bench --json file")
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {getattr(e, 'strerror', None) or e}")
            continue
        runs.append((path, data))
    rows, judged, dry = [], [], bool(runs) and all(d["meta"].get("dry_run") for _, d in runs)
    ran: dict[str, str] = {}  # hot path: how its run ended
    for path, data in runs:
        meta = data["meta"]
        state = "complete" if meta.get("complete", True) else "CUT SHORT (its time limit?)"
        for stem in meta.get("hot_paths") or []:
            ran[stem] = state
        devices = ", ".join(f"{d}: {name}" for d, name in meta.get("devices", {}).items())
        print(f"\n== {os.path.basename(str(path))}: {' '.join(meta.get('hot_paths') or ['?'])} on {devices}; {state}, "
              f"{meta.get('elapsed_s', 0):.1f} s ==", file=out)
        print_table(data["rows"], out)
        for label, key in (("note", "notes"), ("WARNING", "warnings")):
            for item in meta.get(key) or []:
                print(f"{label}: {item}", file=out)
        rows += data["rows"]
        judged += meta.get("bars") or []
    for problem in problems:
        print(f"\nWARNING: {problem}", file=out)

    def missing(bar: Bar) -> str:
        if bar.hot_path not in ran:
            return f"not run: no results of the {bar.hot_path} bench (see its log)"
        if ran[bar.hot_path] != "complete":
            return f"not run: the {bar.hot_path} bench was cut short before its case"
        return "not run: no case of its bench names it"
    for line in _bar_lines(judged, list(GPU_BARS), dry, missing):
        print(line, file=out)
    met = [j["met"] for j in judged]
    print(f"\nbars: {met.count(True)} met, {met.count(False)} not met, "
          f"{len(GPU_BARS) - met.count(True) - met.count(False)} not run or not judged", file=out)
    merged = {"meta": {"runs": [{"file": str(p), **d["meta"]} for p, d in runs], "bars": judged, "dry_run": dry,
                       "problems": problems}, "rows": rows}
    if json_path:
        write_json(rows, merged["meta"], json_path)
    return merged
