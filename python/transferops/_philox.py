"""Counter-based random numbers in torch (Philox4x32-10, Salmon et al., SC 2011), mirroring
csrc/common/philox.h and the Triton kernels: a draw is a pure function of (seed, stream, task,
element index), so masks are identical on every backend and are recomputed, never stored."""
from __future__ import annotations

import torch

U32 = 0xFFFFFFFF


def philox4(c0, c1, c2, c3, k0: int, k1: int):
    """The four output words of Philox4x32-10 on int64 tensors holding uint32 values. The
    products wrap modulo 2^64 in int64, which keeps their low 64 bits exact."""
    for _ in range(10):
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = ((p1 >> 32) & U32) ^ c1 ^ k0, p1 & U32, ((p0 >> 32) & U32) ^ c3 ^ k1, p0 & U32
        k0, k1 = (k0 + 0x9E3779B9) & U32, (k1 + 0xBB67AE85) & U32
    return c0, c1, c2, c3


def draws(count: int, *, seed: int, stream: int, task: int = 0, offset: int = 0, device="cpu") -> torch.Tensor:
    """The draws of flat element indices i = offset .. offset + count - 1: word i mod 4 of
    Philox4x32-10 at counter (i div 4 as two 32-bit halves, task, stream), key seed mod 2^64 (a
    seed >= 2^63 that crossed a custom op as an int64, its two's complement, keys the same)."""
    seed %= 2**64
    first, last = offset >> 2, (offset + count - 1) >> 2
    q = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(q)
    words = torch.stack(philox4(q & U32, q >> 32, zeros + task, zeros + stream, seed & U32, seed >> 32), 1)
    return words.flatten()[offset & 3:(offset & 3) + count]
