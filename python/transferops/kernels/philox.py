"""Philox4x32-10 in Triton, shared by the kernels that draw masks (merging's DARE, adapter
dropout); python/transferops/_philox.py and csrc/common/philox.h compute the same words."""
import triton
import triton.language as tl

# The draws' integer arguments, for @triton.jit(do_not_specialize=...) of a kernel that takes
# them: Triton specializes an integer argument equal to 1 into a constant, on which .to() does
# not compile, and the seed words and the stream take any value.
SEED_ARGS = ["seed_lo", "seed_hi", "stream"]


@triton.jit
def philox_draw(lo, hi, c2, c3, k0, k1):
    # The draw of element index (lo, hi as uint32 halves): word index mod 4 of Philox4x32-10
    # (Salmon et al., SC 2011) at counter (index div 4, c2, c3), key (k0, k1); uint32 lanes.
    c0 = (lo >> 2) | (hi << 30)
    c1 = hi >> 2
    word = lo & 3
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))
