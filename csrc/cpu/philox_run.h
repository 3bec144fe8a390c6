// Philox draws (common/philox.h) for runs of consecutive element indices on the CPU: the AVX2
// build takes eight counters per register (32 draws), the baseline build one at a time. Both
// give the same bits as transferops.kernels.philox and transferops._philox, so masks match
// every backend.
#pragma once
#include <algorithm>
#include <cstdint>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "common/philox.h"
#include "cpu/isa.h"

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {

#ifdef __AVX2__
// Philox4x32-10 of eight counters (c0 lanes, c1, c2, c3): on return c0..c3 hold the four words
// of each lane. _mm256_mul_epu32 forms the 32x32->64 products of the even lanes, the odd lanes'
// after a shift.
inline void philox8(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, uint32_t k0, uint32_t k1) {
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  for (int round = 0; round < 10; ++round) {
    const __m256i p0_even = _mm256_mul_epu32(c0, m0), p0_odd = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
    const __m256i p1_even = _mm256_mul_epu32(c2, m1), p1_odd = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0_even, 32), p0_odd, 0xAA);
    const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1_even, 32), p1_odd, 0xAA);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
    c1 = _mm256_blend_epi32(p1_even, _mm256_slli_epi64(p1_odd, 32), 0xAA);
    c3 = _mm256_blend_epi32(p0_even, _mm256_slli_epi64(p0_odd, 32), 0xAA);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}
#endif

// out[l] for l < n: the draws of element indices index + l, element i taking word i mod 4 of
// Philox4x32-10 at counter (i div 4 as two 32-bit halves, task, stream), key seed.
inline void philox_run(uint64_t index, uint32_t task, uint32_t stream, uint64_t seed, int64_t n, uint32_t* out) {
  // One evaluation per counter, its words from element index + l on up to out[end).
  const auto scalar = [&](int64_t l, int64_t end) {
    while (l < end) {
      const uint64_t q = (index + uint64_t(l)) >> 2;
      uint32_t words[4];
      philox4(uint32_t(q), uint32_t(q >> 32), task, stream, uint32_t(seed), uint32_t(seed >> 32), words);
      for (uint64_t w = (index + uint64_t(l)) & 3; w < 4 && l < end; ++w) out[l++] = words[w];
    }
  };
  int64_t l = std::min<int64_t>(n, (4 - int64_t(index & 3)) & 3);  // to the first whole counter
  scalar(0, l);
#ifdef __AVX2__
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; l + 32 <= n; l += 32) {
    const uint64_t q = (index + uint64_t(l)) >> 2;
    if (uint32_t(q) > 0xFFFFFFF8u) break;  // the counters' low halves wrap inside these eight
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(q))), lanes);
    __m256i c1 = _mm256_set1_epi32(int(uint32_t(q >> 32))), c2 = _mm256_set1_epi32(int(task));
    __m256i c3 = _mm256_set1_epi32(int(stream));
    philox8(c0, c1, c2, c3, k0, k1);
    // Lanes hold one word of eight counters; memory wants the four words of each counter in
    // turn: a 4 x 8 transpose of 32-bit words.
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* o = reinterpret_cast<__m256i*>(out + l);
    _mm256_storeu_si256(o, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
#endif
  scalar(l, n);
}

}  // namespace TRANSFEROPS_ISA
}  // namespace transferops::cpu
