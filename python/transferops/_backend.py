"""Backends, and how one is chosen for each call.

Order of precedence: the op's ``backend=`` argument, then ``use_backend(...)``, then the
``TRANSFEROPS_BACKEND`` environment variable, then the op's own priority list ("auto").
A backend that was asked for and cannot run raises :class:`BackendUnavailable` with its
reason; "auto" skips it quietly and, if nothing can run, raises with every backend's reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

BACKENDS = ("reference", "native", "triton", "cuda")
ENV_VAR = "TRANSFEROPS_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("transferops_backend", default=None)


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run this call; the message says why."""


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{what}: expected one of {('auto',) + BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op called inside the block onto backend ``name`` ("auto" lifts the force)."""
    token = _forced.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend(explicit: str | None = "auto") -> str | None:
    """The backend this call is forced onto, or None for automatic choice."""
    if explicit is not None and _check_name(explicit, "backend") != "auto":
        return explicit
    ctx = _forced.get()
    if ctx is not None:
        return None if ctx == "auto" else ctx
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        env = _check_name(env, ENV_VAR)
        return None if env == "auto" else env
    return None


@functools.lru_cache(maxsize=None)
def _import(module: str):
    """(module, None) or (None, why it cannot be imported)."""
    try:
        return importlib.import_module(module), None
    except ImportError as e:  # a missing or broken build says so here, once
        return None, f"{type(e).__name__}: {e}"


def native_module():
    """The compiled CPU/CUDA module, or None if it is not built or cannot load."""
    return _import("transferops._native")[0]


def native_buffer(t: torch.Tensor):
    """A zero-copy buffer of CPU tensor ``t`` for the native module (bf16 as int16 words)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


@functools.lru_cache(maxsize=None)
def _blas_capsules() -> dict:
    """scipy's GEMMs as capsules (scipy.linalg.cython_blas): the module links no BLAS of its own."""
    from scipy.linalg import cython_blas

    return {name: cython_blas.__pyx_capi__[name] for name in ("sgemm", "dgemm")}


@functools.lru_cache(maxsize=None)
def _blas_libraries() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded now (later loads are not seen:
    scipy's is loaded first)."""
    from threadpoolctl import ThreadpoolController

    _blas_capsules()
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[dict]:
    """BLAS limited to one thread inside the block, for kernels whose OpenMP threads each call
    BLAS on their own tiles; yields scipy's GEMM capsules (scipy's LAPACK runs on the same
    OpenBLAS). Sets the libraries' thread counts directly, where entering
    threadpoolctl.threadpool_limits would rescan the loaded libraries on every call."""
    libs = _blas_libraries()
    before = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(1)
    try:
        yield _blas_capsules()
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_reason(name: str, device: torch.device, *, auto: bool = False) -> str | None:
    """Why backend ``name`` cannot run on tensors of ``device`` (None if it can)."""
    if name == "reference":
        return None
    if name in ("native", "cuda"):
        mod, err = _import("transferops._native")
        if mod is None:
            return f"the native module is not built or failed to load ({err}); reinstall transferops"
        if name == "native":
            return None if device.type == "cpu" else f"native runs on CPU tensors, got {device.type}"
        if not mod.has_cuda:
            return "the native module was built without CUDA (rebuild with TRANSFEROPS_CUDA=ON and nvcc)"
        if device.type != "cuda":
            return f"cuda runs on CUDA tensors, got {device.type}"
        return None
    if name == "triton":
        mod, err = _import("triton")
        if mod is None:
            return f"triton is not installed (pip install 'transferops[triton]'): {err}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            # The interpreter is a testing aid, orders of magnitude slower than native.
            return "auto never picks the Triton interpreter for CPU tensors" if auto else None
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    raise ValueError(f"unknown backend {name!r}")


@dataclass
class Op:
    """One op's implementations, declared once; ``select`` picks the one to run.

    ``order`` is the auto priority, fastest first. ``limits`` maps a backend to a function of
    the call's arguments that returns why that backend cannot take them (or None).
    """

    name: str
    order: tuple[str, ...] = ("cuda", "triton", "native", "reference")
    impls: dict[str, Callable] = field(default_factory=dict)
    dtypes: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    limits: dict[str, Callable[..., str | None]] = field(default_factory=dict)

    def register(self, backend: str, *, dtypes: tuple[torch.dtype, ...], limit=None):
        _check_name(backend, f"{self.name}.register")

        def deco(fn):
            self.impls[backend] = fn
            self.dtypes[backend] = dtypes
            if limit is not None:
                self.limits[backend] = limit
            return fn

        return deco

    def reason(self, backend: str, device: torch.device, dtype: torch.dtype, args, *, auto=False, name=None):
        name = name or self.name
        if backend not in self.impls:
            return f"{name} has no {backend} implementation"
        why = backend_reason(backend, device, auto=auto)
        if why is None and dtype not in self.dtypes[backend]:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes[backend])
            why = f"{backend} {name} takes {names}, got {str(dtype).removeprefix('torch.')}"
        if why is None and backend in self.limits:
            why = self.limits[backend](*args)
        return why

    def select(self, backend: str | None, device: torch.device, dtype: torch.dtype, args=(), name=None):
        """(backend name, implementation) for this call; ``name`` is the public function that
        messages name (default: the op's)."""
        name = name or self.name
        forced = forced_backend(backend)
        if forced is not None:
            why = self.reason(forced, device, dtype, args, name=name)
            if why is not None:
                raise BackendUnavailable(f"{name}: backend {forced!r} cannot run: {why}")
            return forced, self.impls[forced]
        reasons = []
        for b in self.order:
            why = self.reason(b, device, dtype, args, auto=True, name=name)
            if why is None:
                return b, self.impls[b]
            reasons.append(f"  {b}: {why}")
        raise BackendUnavailable(f"{name}: no backend can run this call:\n" + "\n".join(reasons))

    def __call__(self, backend, device, dtype, *args, name=None):
        _, impl = self.select(backend, device, dtype, args, name=name)
        return impl(*args)


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Each backend mapped to None if it can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    return {name: backend_reason(name, device) for name in BACKENDS}
