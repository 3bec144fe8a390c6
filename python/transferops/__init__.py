"""transferops: fast, exact hot paths of transfer learning.

Every op is one function with a ``backend=`` argument ("auto" by default); see
:func:`use_backend` and the ``TRANSFEROPS_BACKEND`` environment variable to force one.
"""
from __future__ import annotations

import importlib as _importlib
import os as _os

# Native LogME alternates scipy's OpenBLAS with OpenMP work (torch's and ours). OpenBLAS's idle
# workers spin for ~2^28 cycles after each call and starve those threads on small machines.
# Read once, when OpenBLAS loads, so it has no effect if the caller loaded scipy first, and a
# caller's own setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# The public names load on first access (PEP 562): `import transferops` imports neither torch
# nor numpy, so the CLI's --help and tools that only import the package start fast. Each name
# maps to the module that defines it; a submodule maps to itself.
_LAZY = {
    **{name: f".{name}" for name in ("adapters", "merging", "nn", "ot", "transferability")},
    **dict.fromkeys(("BACKENDS", "BackendUnavailable", "available_backends", "use_backend"), "._backend"),
    "info": "._info",
    "process_group": "._dist",
    **dict.fromkeys(("add_adapters", "load_adapters", "save_adapters"), ".integrations.transformers"),
    **dict.fromkeys(("bottleneck_adapter", "ia3_linear", "lora_linear"), ".adapters"),
    **dict.fromkeys(("SinkhornResult", "sinkhorn", "sinkhorn_cost_matrix", "sinkhorn_divergence", "sinkhorn_loss"),
                    ".ot"),
    "dataset_distance": "._otdd",
    "rank_models": ".transferability_models",
    **dict.fromkeys(("etran", "ncti"), ".transferability_collapse"),
    **dict.fromkeys(("LogMEStream", "gbc", "hscore", "leep", "logme", "nce", "otce", "sfda", "tmi", "transrate"),
                    ".transferability"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name == "__version__":
        # importlib.metadata alone costs ~40 ms.
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("transferops")
        except PackageNotFoundError:  # running from a source tree that was never installed
            value = "0+unknown"
    elif name in _LAZY:
        module = _importlib.import_module(_LAZY[name], __name__)
        value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | {"__version__"})
