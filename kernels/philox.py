"""Philox4x32-10 in Triton, shared by the kernels that draw masks (merging's DARE, adapter
dropout); python/transferops/_philox.py and csrc/common/philox.h compute the same words."""
import triton
import triton.language as tl


@triton.jit
def philox_first(c0, c1, c2, c3, k0, k1):
    # Philox4x32-10 (Salmon et al., SC 2011), first output word; uint32 lanes.
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0
