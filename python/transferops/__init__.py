"""transferops: fast, exact hot paths of transfer learning.

Every op is one function with a ``backend=`` argument ("auto" by default); see
:func:`use_backend` and the ``TRANSFEROPS_BACKEND`` environment variable to force one.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

from . import merging, transferability
from ._backend import BACKENDS, BackendUnavailable, available_backends, use_backend
from ._info import info
from .transferability import hscore, leep, logme, nce

try:
    __version__ = _version("transferops")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "hscore", "info", "leep", "logme", "merging", "nce",
           "transferability", "use_backend"]
