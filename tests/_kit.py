"""Checking any backend against the float64 reference: inputs, tolerances, poisoning, reports."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.deterministic

from transferops._backend import backend_reason

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# CI installs the test extra and lays shared/ beside its clone: there, what a test needs and
# cannot find fails the test instead of skipping it.
IN_CI = os.environ.get("CI") == "true"

_ROOT = Path(__file__).resolve().parents[1]
# shared/ lies beside the checkout (developers, CI) or inside it (runs on a lent GPU).
GOLDEN = next((p for p in (_ROOT.parent / "shared", _ROOT / "shared") if p.is_dir()), _ROOT.parent / "shared") \
    / "golden"

# |out - ref| <= atol + rtol * |ref|, ref computed in float64 from the same (rounded) inputs.
# Low-precision outputs are rounded once from an fp32 accumulator: 2 ulps of the output dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5),
    torch.float16: dict(rtol=2 ** -10, atol=1e-5),
}


def peer(name: str):
    """Import ``name``, a library that the test extra installs (a peer to compare with, or a file
    format's reader). Where it is missing the test is skipped, except under CI=true, where a
    missing or broken peer fails the test."""
    if IN_CI:
        return importlib.import_module(name)
    return pytest.importorskip(name)


def golden_file(name: str) -> Path:
    """The path of ``name`` in the golden data (shared/golden: the peers' own outputs). Where it
    is missing the test is skipped, except under CI=true, where it fails."""
    path = GOLDEN / name
    if not path.exists():
        why = f"golden data not found at {path}"
        if IN_CI:
            pytest.fail(f"{why} (CI=true: CI lays shared/ beside its clone)", pytrace=False)
        pytest.skip(why)
    return path


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu")


def require_backend(backend: str) -> torch.device:
    """The device to test ``backend`` on; skips the test with the reason if it cannot run."""
    device = device_for(backend)
    why = backend_reason(backend, device)
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    return device


def backend_cases(backends, shapes, interpreted_shapes, *, pairwise=False) -> list:
    """(backend, dtype, shape) to parametrize with: every backend on every dtype and shape, except
    the Triton interpreter (no GPU), which runs one program per row of a pass, each of its ops a
    numpy call: it takes ``interpreted_shapes`` (fewer rows, still several, leading dimensions and
    an odd row length) and, with ``pairwise``, every dtype on the last of them and every one of
    them in float32: what a kernel does by dtype (loads, stores, the accumulation, the radix
    select's key width) and by shape (rows, leading dimensions, the column mask) each runs, in
    well under half the interpreted items. On a GPU every backend takes ``shapes``."""
    cases = []
    for backend in backends:
        interpreted = backend == "triton" and not torch.cuda.is_available()
        for dtype in DTYPES:
            for shape in interpreted_shapes if interpreted else shapes:
                if interpreted and pairwise and dtype != torch.float32 and shape != interpreted_shapes[-1]:
                    continue
                cases.append(pytest.param(backend, dtype, shape, id=f"{dtype}-{backend}-{shape}"))
    return cases


def randn(shape, dtype, gen, *, device="cpu", zeros=0.0, noncontig=False) -> torch.Tensor:
    """Normal values with a fraction ``zeros`` of exact zeros; ``noncontig`` returns a strided
    view (a column slice of a wider buffer) holding the same values."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if zeros:
        x = x * (torch.rand(shape, generator=gen, dtype=torch.float64) >= zeros)
    x = x.to(dtype)
    if noncontig:
        x = noncontiguous(x)
    return x.to(device)


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (a strided slice of a wider buffer)."""
    if x.dim() == 0:
        return x
    wide = torch.full((*x.shape[:-1], x.shape[-1] * 2 + 3), float("nan"), dtype=x.dtype, device=x.device)
    view = wide[..., 3::2] if x.shape[-1] > 1 else wide[..., 3:4]
    view.copy_(x)
    assert not view.is_contiguous() or x.numel() <= 1
    return view


@contextlib.contextmanager
def poisoned_outputs():
    """Inside, torch.empty fills new float tensors with NaN, so an output element an
    implementation never writes shows up as NaN."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


@contextlib.contextmanager
def native_isa(isa: str):
    """Inside, the native CPU kernels run the build for ``isa`` (skips where this build did not
    compile it or this CPU does not run it); the default is restored after."""
    from transferops._backend import native_module

    native = native_module()
    if native is None or isa not in native.cpu_isas():
        pytest.skip(f"this CPU or build has no {isa} kernels")
    default = native.cpu_isa()
    native.set_cpu_isa(isa)
    try:
        yield
    finally:
        native.set_cpu_isa(default)


def outputs_per_isa(run) -> dict:
    """{isa: run()} for each native CPU build this CPU runs, lowest first; skips with fewer than
    two, since there is nothing to compare."""
    from transferops._backend import native_module

    native = native_module()
    isas = native.cpu_isas() if native is not None else []
    if len(isas) < 2:
        pytest.skip("this CPU or build has one native ISA")
    outs = {}
    for isa in isas:
        with native_isa(isa):
            outs[isa] = run()
    return outs


def guarded_empty(shape, dtype, device="cpu", guard=64):
    """An output view with NaN guard regions on both sides; call the returned check after the
    kernel ran to assert nothing was written outside the view."""
    n = int(torch.Size(shape).numel())
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype, device=device)
    view = buf[guard:guard + n].view(shape)

    def check():
        assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[guard + n:]).all(), \
            "kernel wrote outside its output"
    return view, check


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "output", **override):
    """Compare ``out`` with the float64 reference under ``dtype``'s tolerances, with a report of
    how many elements are off, where, and NaN/Inf counted separately."""
    tol = {**TOLERANCES[dtype], **override}
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().cpu().double(), ref.detach().cpu().double()
    nonfinite_out, nonfinite_ref = (~torch.isfinite(o)).sum().item(), (~torch.isfinite(r)).sum().item()
    err = (o - r).abs()
    bad = ~(err <= tol["atol"] + tol["rtol"] * r.abs())  # NaN compares False, so counts as bad
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = torch.where(torch.isfinite(err), err, torch.zeros_like(err)).max().item()
        lines = [f"{name}: {int(bad.sum())} of {bad.numel()} elements off ({dtype}, {tol})",
                 f"  NaN/Inf in output: {nonfinite_out}, in reference: {nonfinite_ref}",
                 f"  max finite abs error: {worst:.3e}",
                 *(f"  at {tuple(i)}: got {o[tuple(i)].item()!r}, expected {r[tuple(i)].item()!r}" for i in idx)]
        raise AssertionError("\n".join(lines))


def to_float64(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().double()
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_float64(t) for t in tree)
    return tree


def assert_matches_reference(fn, inputs: tuple, kwargs: dict, *, backend: str, dtype: torch.dtype, **tol):
    """Run ``fn(*inputs, backend=backend, **kwargs)`` with poisoned outputs and compare it with
    ``fn`` on the float64 copies of the inputs under the reference backend."""
    ref = fn(*to_float64(inputs), backend="reference", **kwargs)
    with poisoned_outputs():
        out = fn(*inputs, backend=backend, **kwargs)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert_close(out, ref, dtype, name=f"{getattr(fn, '__name__', fn)}[{backend}]", **tol)
    return out


def require_thp() -> Path:
    """The THP mode file; skips the test unless Linux offers transparent huge pages."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not Path("/proc/self/smaps").exists() or not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("needs Linux with transparent huge pages")
    return mode


def thp_eligible(t: torch.Tensor) -> bool:
    """Whether the mapping holding t's data may take transparent huge pages (/proc smaps)."""
    addr, mapping = t.data_ptr(), None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            mapping = lo <= addr < hi
        elif mapping and head == "THPeligible:":
            return line.split()[1] == "1"
    raise AssertionError("no mapping holds the tensor")


def load_folder(folder: Path) -> dict:
    """Every tensor of the safetensors files in ``folder``, read by the safetensors library."""
    from safetensors.torch import load_file

    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def merge_both_ways(tmp_path: Path, text: str) -> tuple[dict, dict]:
    """A mergekit YAML merged by mergekit itself and by ``transferops merge --config``, into
    tmp_path/mk and tmp_path/ours: (mergekit's tensors, ours), the same names."""
    mergekit = pytest.importorskip("mergekit.merge")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from transferops.cli import main

    mergekit.run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
                       MergeOptions(quiet=True))
    (tmp_path / "c.yaml").write_text(text)
    assert main(["merge", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "ours"), "-q"]) == 0
    theirs, ours = load_folder(tmp_path / "mk"), load_folder(tmp_path / "ours")
    assert sorted(theirs) == sorted(ours)
    return theirs, ours


def at_a_cut(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Entries whose magnitude equals one at a rank where mergekit's trim cuts (the largest
    int(gamma n) dropped, the next int(density n) kept): which of them it keeps is arbitrary."""
    mags = tau.abs().flatten()
    ranked = mags.sort(descending=True).values
    n, top, keep = mags.numel(), int(gamma * mags.numel()), int(density * mags.numel())
    cuts = [ranked[i] for i in {top - 1, top, top + keep - 1, top + keep} if 0 <= i < n]
    return torch.stack([tau.abs() == c for c in cuts]).any(0) if cuts else torch.zeros(tau.shape, dtype=torch.bool)


__all__ = ["DTYPES", "TOLERANCES", "assert_close", "assert_matches_reference", "at_a_cut", "golden_file",
           "guarded_empty", "load_folder", "merge_both_ways", "noncontiguous", "peer", "poisoned_outputs", "randn", "require_backend"]


class _StaysOnDevice(torch.overrides.TorchFunctionMode):
    """See :func:`stays_on_device`."""

    HOST_COPIES = {torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.tolist}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # .to(x.device) of an input x is no copy on a GPU; it cannot be told from .to(torch.device
        # ("cpu")) here, so only a device named by a string counts (and any move off the device)
        to_cpu = func is torch.Tensor.to and any(
            (isinstance(a, str) or args[0].device.type != "cpu") and torch.device(a).type == "cpu"
            for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device)))
        if (func in self.HOST_COPIES or to_cpu) and not _in_triton_interpreter():
            raise AssertionError(f"a host copy on a device path: Tensor.{func.__name__}")
        return func(*args, **kwargs)


def _in_triton_interpreter() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith("triton/runtime/interpreter.py"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def stays_on_device():
    """A device-checking mock for machines without a GPU: inside it, CPU inputs stand for CUDA
    ones. A host copy (Tensor.numpy, .cpu, .tolist, .to("cpu")) raises, except inside the Triton
    interpreter, which runs kernels on host arrays by design; and tensors made without a device
    go to "meta", so an op that builds a tensor on the default device (CPU, where a GPU run
    would need the inputs' device) and combines it with the inputs fails. Scalar syncs
    (.item(), bool()) are allowed."""
    with _StaysOnDevice(), torch.device("meta"):
        yield
