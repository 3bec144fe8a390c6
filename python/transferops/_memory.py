"""Fresh CPU outputs backed by transparent huge pages.

A merge or an adapter pass writes its result once, at memory speed, so the kernel's
first-touch faults on a fresh 4 KB-paged output can cost as much as the pass itself: each
page is faulted and zeroed on its own, where a 2 MB page takes one fault for 512 of them.
Large outputs are therefore mapped privately and advised
MADV_HUGEPAGE, which takes effect where the system's THP mode is ``madvise`` or ``always``
(the common defaults) and is a no-op elsewhere. ``TRANSFEROPS_HUGEPAGES=0`` turns it off, for
systems where direct compaction stalls the faults instead.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

# Below this the faults are a small share of the call, and smaller tensors keep the allocator's
# memory reuse: glibc hands freed outputs of a few tens of MB back without faults, where fresh
# huge pages can stall on compaction.
HUGE_MIN_BYTES = 32 << 20


def _enabled() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("TRANSFEROPS_HUGEPAGES", "1") != "0"


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor, on huge pages when it is large."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_MIN_BYTES or not _enabled():
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP compiled out or disabled: ordinary pages
        pass
    # The tensor holds the mapping alive through its storage's reference to the buffer.
    return torch.frombuffer(region, dtype=dtype).view(shape)

