"""What this installation can do: versions, backends, threads."""
from __future__ import annotations

import platform
import sys

import torch

from ._backend import BACKENDS, _import, backend_reason


def info_dict() -> dict:
    from . import __version__

    native, native_err = _import("transferops._native")
    triton, _ = _import("triton")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "transferops": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "cuda_runtime": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native_module": native.__file__ if native else f"unavailable ({native_err})",
        "native_openmp": bool(native and native.has_openmp),
        "native_cuda": bool(native and native.has_cuda),
        "omp_threads": native.omp_max_threads() if native else None,
        "native_cpu_isa": native.cpu_isa() if native else None,
        "torch_threads": torch.get_num_threads(),
        "backends": {dev: {b: backend_reason(b, torch.device(dev)) or "available" for b in BACKENDS}
                     for dev in devices},
    }


def info(file=None) -> dict:
    """Print version, available backends (with the reason for each one that is not), threads
    and CUDA/Triton versions; return the same as a dict."""
    d = info_dict()
    lines = [f"{k:>14}: {v}" for k, v in d.items() if k != "backends"]
    for dev, backends in d["backends"].items():
        lines.append(f"{'backends (' + dev + ')':>14}:")
        lines += [f"{'':>16}{b:<10} {why}" for b, why in backends.items()]
    print("\n".join(lines), file=file or sys.stdout)
    return d
