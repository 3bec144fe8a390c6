"""Timing, floors, correctness checks and reporting shared by every bench module.

A hot path's module ``bench_<stem>`` exposes ``cases(quick: bool, device: str)``, an iterable
of :class:`Case` (a generator keeps only one case's inputs alive). :func:`run` calls each of a
case's callables once, checks the result against the case's expected backend, times it, and
relates the time to the floors measured in the same run and to the fastest peer.
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

HOT_PATHS = ("merging", "transferability", "ot", "adapters")  # each names a module bench_<stem>, run in this order
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


@dataclass
class Case:
    """One op at one size: callables (no arguments, returning a tensor) that must agree.

    ``peers`` maps "peer:<package>" to a callable, or to None when the package is not installed.
    """

    op: str
    size: str
    dtype: torch.dtype
    bytes: int  # the least the op must read and write
    ours: dict[str, Callable[[], torch.Tensor]]
    peers: dict[str, Callable[[], torch.Tensor] | None]
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
    (TRITON_INTERPRET=1), a test aid far too slow to time."""
    return [b for b, why in transferops.available_backends(device).items()
            if why is None and (_is_cuda(device) or b != "triton")]


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
    nbytes = 1 << 30 if cuda else (64 << 20 if quick else 256 << 20)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(functools.partial(dst.copy_, src), warmup=s.warmup + 1, repeats=s.repeats, device=device,
                budget_s=s.budget_s, min_repeats=s.min_repeats)
    del src, dst
    copy_bps = 2 * nbytes / t["p50"]
    rows = [Row("floor:copy", f"{nbytes >> 20} MiB", "torch", "floor", device, "f32", **t, gbps=copy_bps / 1e9)]
    n = 8192 if cuda else (1024 if quick else 2048)
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
             warnings: list[str]) -> list[Row]:
    """Check and time every callable of ``case``; rows carry ratios and floor fractions."""
    where = f"{case.op} {case.size} on {device}"
    callables = [(name, "ours", fn) for name, fn in case.ours.items()]
    callables.sort(key=lambda c: c[0] != case.expected)  # the expected result first: it checks the rest
    for name, fn in case.peers.items():
        if fn is None:
            notes.append(f"{name} unavailable (not installed)")
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
            notes.append(f"{name} skipped at {where}: {e}")
            continue
        except Exception as e:  # a crashing callable is reported, the others still run
            warnings.append(f"{name} failed at {where}: {type(e).__name__}: {e}")
            continue
        if kind == "ours" and name == case.expected:
            expected, matches = result, None
        else:
            matches = _agree(result, expected, case.dtype, f"{name} vs {case.expected} at {where}", warnings,
                             comparable, case.tolerance)
        del result
        if name == "reference" and first_s > REFERENCE_MAX_CALL_S:
            notes.append(f"reference not timed at {where}: one call took {first_s:.1f} s")
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
    return rows


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


def run(*, quick: bool = False, only: list[str] | None = None, device: str | None = None,
        json_path: str | None = None, results_dir: str | None = None, out=sys.stdout) -> list[dict]:
    """Measure floors, check and time every hot path's cases, print the table, optionally write
    JSON, and return the rows.

    ``only`` keeps the named hot paths (see ``HOT_PATHS``); ``device`` None means the CPU plus
    CUDA when available. ``results_dir`` appends the run to its machine kinds' JSON Lines files
    there (:mod:`transferops.bench.results`).
    """
    only = [only] if isinstance(only, str) else only
    unknown = set(only or ()) - set(HOT_PATHS)
    if unknown:
        raise ValueError(f"only: unknown hot path(s) {sorted(unknown)}; expected some of {list(HOT_PATHS)}")
    stems = [stem for stem in HOT_PATHS if only is None or stem in only]
    devices = [device] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    s = QUICK if quick else FULL
    started = time.perf_counter()
    rows: list[Row] = []
    hot_paths: list[str | None] = []  # each row's, None for the floors
    notes: list[str] = []
    warnings: list[str] = []
    for dev in devices:
        floors, floor_rows = measure_floors(dev, quick, s)
        rows += floor_rows
        hot_paths += [None] * len(floor_rows)
        for stem in stems:
            module = importlib.import_module(f"{__package__}.bench_{stem}")
            for case in module.cases(quick, dev):
                print(f"  {dev}: {case.op} {case.size}", file=sys.stderr, flush=True)  # progress
                case_rows = run_case(case, dev, floors, s, notes, warnings)
                rows += case_rows
                hot_paths += [stem] * len(case_rows)
    meta = run_meta(devices, quick)
    meta["elapsed_s"] = round(time.perf_counter() - started, 2)
    meta["notes"], meta["warnings"] = list(dict.fromkeys(notes)), list(dict.fromkeys(warnings))
    dicts = [asdict(r) for r in rows]
    machine = meta["machine"]
    print(f"transferops.bench {'quick' if quick else 'full'}: {machine['cpu']}, {machine['cores']} cores, "
          f"{machine['torch_threads']} torch threads; {meta['elapsed_s']:.1f} s", file=out)
    print_table(dicts, out)
    for label, items in (("note", meta["notes"]), ("WARNING", meta["warnings"])):
        for item in items:
            print(f"{label}: {item}", file=out)
    if json_path:
        write_json(dicts, meta, json_path)
    if results_dir:
        from .results import record  # results imports this module

        for path in record(dicts, meta, hot_paths, results_dir):
            print(f"recorded in {path}", file=out)
    return dicts
