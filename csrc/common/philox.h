// Counter-based random numbers (Philox4x32-10, Salmon et al., SC 2011): the draw for an element
// is a pure function of (seed, stream, task, element index), so DARE and dropout masks are
// identical on every backend, chunking and thread count, and are never stored. Mirrored in torch by
// transferops._philox and in Triton by transferops.kernels.philox; the CPU kernels draw runs of it
// eight counters (32 draws) at a time (cpu/philox_run.h).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define TRANSFEROPS_HD __host__ __device__ __forceinline__
#else
#define TRANSFEROPS_HD inline
#endif

namespace transferops {

// The four 32-bit outputs of Philox4x32-10 with counter (c0, c1, c2, c3) and key (k0, k1),
// written to out[0..3]. The draw of element i is word i mod 4 at counter (i div 4 as two 32-bit
// halves, task, stream), key seed: four consecutive elements share one evaluation, a quarter of
// the work of taking one word per element. cpu/philox_run.h runs eight counters per AVX2
// register.
TRANSFEROPS_HD void philox4(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                            uint32_t* out) {
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

}  // namespace transferops
