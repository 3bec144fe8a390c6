"""transferops: fast, exact hot paths of transfer learning.

Every op is one function with a ``backend=`` argument ("auto" by default); see
:func:`use_backend` and the ``TRANSFEROPS_BACKEND`` environment variable to force one.
"""
from __future__ import annotations

import os as _os
from importlib.metadata import PackageNotFoundError, version as _version

# Native LogME alternates scipy's OpenBLAS with OpenMP work (torch's and ours). OpenBLAS's idle
# workers spin for ~2^28 cycles after each call and starve those threads on small machines.
# Read once, when OpenBLAS loads, so it has no effect if the caller loaded scipy first, and a
# caller's own setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import adapters, merging, nn, ot, transferability
from ._backend import BACKENDS, BackendUnavailable, available_backends, use_backend
from ._info import info
from .adapters import bottleneck_adapter, ia3_linear, lora_linear
from .ot import SinkhornResult, dataset_distance, sinkhorn, sinkhorn_cost_matrix, sinkhorn_divergence, sinkhorn_loss
from .transferability import LogMEStream, gbc, hscore, leep, logme, nce, otce, sfda, tmi, transrate

try:
    __version__ = _version("transferops")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["BACKENDS", "BackendUnavailable", "LogMEStream", "SinkhornResult", "adapters", "available_backends",
           "bottleneck_adapter", "dataset_distance", "gbc", "hscore", "ia3_linear", "info", "leep", "logme",
           "lora_linear", "merging", "nce", "nn", "ot", "otce",
           "sfda", "sinkhorn", "sinkhorn_cost_matrix", "sinkhorn_divergence", "sinkhorn_loss", "tmi",
           "transferability", "transrate", "use_backend"]
