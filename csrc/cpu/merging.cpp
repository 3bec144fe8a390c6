#include "cpu/merging.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/abs_key.h"
#include "cpu/blocks.h"
#include "cpu/philox_run.h"

#ifdef __AVX512BW__
#include <immintrin.h>
#endif

// This file is compiled three times on x86-64 (see cpu/isa.h); its entry points pick one build at
// run time. All use -ffp-contract=off and the same per-element order of operations, so their
// results are bit-identical.

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {
namespace {

// Columns handled per work item: the per-column accumulators stay in L1 and the inner loops
// over them vectorize. Such stack arrays are declared 64-byte aligned: GCC 12's AVX-512 build
// can place them off a 32-byte boundary and still store to them with aligned 32-byte moves.
constexpr int64_t kBlock = 512;

// n values from q widened into out: a base's block, read once per task by the loops after it.
template <class S>
inline void widen_block(const S* q, int64_t n, acc_t<S>* out) {
  prefetching(q, 0, n, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) out[j] = widen(q[j]);
  });
}

// x where c holds, else +0, by a bit mask: GCC vectorizes it to one and, where `c ? x : 0`
// added into an accumulator became two additions and a blend (adding +0 changes a -0).
template <class A>
inline A kept_if(bool c, A x) {
  using K = typename AbsKey<A>::K;
  K bits;
  std::memcpy(&bits, &x, sizeof(x));
  bits &= K(0) - K(c);
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// n + 1 where c holds. AVX-512 adds under a mask in one instruction; AVX2 has no masked add, and
// adds the 0 or 1.
template <class I>
TRANSFEROPS_INLINE inline I counted_if(bool c, I n) {
#ifdef __AVX512F__
  return c ? n + 1 : n;
#else
  return n + c;
#endif
}

template <class S, SignRule rule, bool elect, bool wbefore, bool dare, bool diff>
MergeResult merge_typed(const std::vector<View2D>& tvs, const View2D* base, const View2D& out,
                        const double* weights, const double* scales, const Trim* trims, const Dare* dr,
                        MergeSpec spec) {
  using A = acc_t<S>;
  using K = typename AbsKey<A>::K;
  // PEFT's denominators count the agreeing tasks: integers, which the loop adds as masks.
  using Den = std::conditional_t<wbefore, A, std::make_signed_t<K>>;
  const int T = int(tvs.size());
  const A inf = std::numeric_limits<A>::infinity();
  const K inf_key = abs_key(inf);
  // Per task: the weight of its kept values (w_t * scale_t), that of its votes in mergekit's
  // denominator (w_t), its trim, and DARE's keep test and divisor.
  std::vector<A> w(T, A(1)), den_w(T, A(1)), rescale(T, A(1));
  std::vector<Trim> tr(T, Trim{0, 0, 0, inf, inf, 0});
  std::vector<uint32_t> keep_below(T, 0);
  std::vector<uint8_t> keep_all(T, 1);
  double weight_sum = 0;
  for (int t = 0; t < T; ++t) {
    const double wt = weights ? weights[t] : 1.0;
    weight_sum += wt;
    w[t] = A(wt * (scales ? scales[t] : 1.0));
    den_w[t] = A(wt);
    if (trims) tr[t] = trims[t];
    if constexpr (dare) {
      keep_all[t] = dr->keep_below[t] >= (uint64_t(1) << 32);
      keep_below[t] = keep_all[t] ? 0u : uint32_t(dr->keep_below[t]);
      rescale[t] = A(dr->rescale[t]);
    }
  }
  const Dare d = dare ? *dr : Dare{0, 0, nullptr, nullptr, 0};
  const A lam = A(spec.lam);
  // mergekit's sum with normalize: divided by the weights' sum, unless that is about 0.
  const A sum_divisor = std::abs(weight_sum) < 1e-8 ? A(1) : A(weight_sum);
  const bool normalize = spec.normalize;
  const A keep_den = normalize ? A(1) : A(0), sum_by = normalize ? sum_divisor : A(1);  // see finish
  const bool zero_elects_plus = spec.zero_sign > 0;
  const bool store = out.data != nullptr;
  const Blocks b(tvs[0], kBlock);
  const int64_t cols = tvs[0].cols;
  int64_t nonfinite = 0, sign_sum = 0;
#ifdef __AVX512F__
  // Whether the pass runs the loop written with intrinsics (below).
  constexpr bool intrinsic = elect && rule == SignRule::sum && !wbefore && !dare &&
                             (std::is_same_v<S, float> || std::is_same_v<S, bf16>);
#else
  constexpr bool intrinsic = false;
#endif
  // The most tasks one sweep takes (below). The intrinsic loop keeps eight tasks' kept values in
  // its 32 registers, so eight tasks take one sweep rather than two groups of four; GCC's code
  // for the generic loop holds four.
  constexpr int one_sweep_max = intrinsic ? 8 : 4;

#pragma omp parallel for schedule(static) reduction(+ : nonfinite, sign_sum) \
    if (b.rows * b.cols > kParallelMinElements)
  for (int64_t item = 0; item < b.count(); ++item) {
    const int64_t r = b.row(item), c0 = b.col(item), n = b.len(item);
    const int64_t flat0 = r * cols + c0;
    alignas(64) A base_row[diff ? kBlock : 1];  // widened once, not once per task
    if constexpr (diff) widen_block(base->row<S>(r) + c0, n, base_row);
    const uint64_t index0 = uint64_t(d.offset + flat0);
    // Up to one_sweep_max tasks (`whole`, the common case) go in one sweep that keeps each
    // entry's accumulators in registers: the votes first, then the sum over the elected side only.
    // Per-entry arrays would be zeroed, stored and reloaded: 24 bytes of L1 traffic per element
    // beside T = 2 bf16 models' 6 of input. More tasks go four per sweep (then one by one) over
    // arrays of both sides' sums, loaded and stored once per sweep, not per task, so that their
    // traffic stays below the inputs'. Either way the additions keep task order, so results do
    // not depend on grouping.
    // The block is swept in segments between the trims' cuts, inside each of which every task
    // keeps |v| in one [bound, drop): the cuts fall in one block per task in the tensor, and
    // spare every element an index compare and select.
    const bool whole = T <= one_sweep_max;
    alignas(64) A vote[kBlock], pos_sum[kBlock], neg_sum[kBlock];
    alignas(64) Den pos_den[kBlock], neg_den[kBlock];
    alignas(64) K top[kBlock];
    if (!whole) {
      for (int64_t j = 0; j < n; ++j) {
        vote[j] = pos_sum[j] = neg_sum[j] = A(0);
        pos_den[j] = neg_den[j] = Den(0);
        top[j] = K(0);
      }
    }
    // The block's results in the accumulation type: one loop after either way of sweeping
    // rounds them to S and stores them (none in a counting pass).
    alignas(64) A merged[kBlock];
    const A zero_vote = zero_elects_plus ? A(1) : A(-1);
    auto elects_plus = [&](A vt) TRANSFEROPS_INLINE { return (vt == A(0) ? zero_vote : vt) > A(0); };
    // Entry j from the elected side's sum and denominator (all tasks' sum without an election):
    // an election divides by den (1 where it is 0), a sum by `by`. MergeSpec::normalize false
    // comes as keep = 0, which makes every den 0 and so 1, and as by = 1: exact divisions by 1.
    // No bool and no branch: with either, GCC leaves most instances of the loops scalar. Both
    // come in as the caller's locals: read through this lambda's captures inside the loops,
    // they would be loads that might alias `merged`, with the same effect.
    auto finish = [&](int64_t j, A sum, A den, A keep, A by) TRANSFEROPS_INLINE {
      const A kept = den * keep;
      A m = sum / (elect ? (kept == A(0) ? A(1) : kept) : by);
      if constexpr (diff) m = lam * m + base_row[j];
      return m;
    };
    int32_t bad = 0, signs = 0;  // per block: 32-bit counts vectorize without widening
    auto sweep = [&](int t0, auto group, auto one_sweep, int j0, int j1) TRANSFEROPS_INLINE {
      constexpr int G = decltype(group)::value;
      constexpr bool W = decltype(one_sweep)::value;
      const S* p[G];
      const A keep = keep_den, by = sum_by;
      A wt[G], dw[G], bound[G], drop[G], rs[G];
      uint32_t below[G];
      bool all[G];
      for (int g = 0; g < G; ++g) {
        const Trim& m = tr[t0 + g];
        p[g] = tvs[t0 + g].row<S>(r) + c0;
        wt[g] = w[t0 + g];
        dw[g] = wbefore ? den_w[t0 + g] : A(1);
        rs[g] = rescale[t0 + g], below[g] = keep_below[t0 + g], all[g] = keep_all[t0 + g];
        bound[g] = A(flat0 + j0 < m.cut ? m.lo : m.hi);
        drop[g] = A(flat0 + j0 < m.drop_cut ? m.drop_lo : m.drop_hi);
      }
      // DARE's draws for the segment, 32 per AVX2 block of eight Philox counters, rather than a
      // Philox per element inside the loop.
      alignas(64) uint32_t draw[dare ? G : 1][dare ? kBlock : 1];
      if constexpr (dare) {
        for (int g = 0; g < G; ++g) {
          philox_run(index0 + uint64_t(j0), uint32_t(t0 + g), d.stream, d.seed, j1 - j0, draw[g] + j0);
        }
      }
      // Branch-free selects only, so GCC vectorizes this loop under -fno-trapping-math (check
      // with -fopt-info-vec). No software prefetching: the loop reads its tasks in turn 32-64
      // bytes at a time, short enough for the hardware prefetcher.
      int32_t segment_bad = 0, segment_signs = 0;  // local, so that their sums vectorize
      int64_t j = j0;
#ifdef __AVX512F__
      // PEFT's TIES over float32 or bf16 tasks, written with intrinsics: GCC's code for the
      // loop below spends 27 instructions per task and 16 entries in groups (two loads of each
      // bf16 vector, |x| twice, v > 0 compared twice, a multiply under a mask then an addition
      // for each side's sum). Here the additions themselves are masked. The same results bit
      // for bit: each sum starts at +0, so it never holds -0, and adding the +0 of an entry not
      // kept or not agreeing changes nothing else. Unaligned accesses: a segment starts at a
      // trim's cut.
      if constexpr (intrinsic) {
        const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)), zero = _mm512_setzero_ps();
        const __m512i minus_one = _mm512_set1_epi32(-1);
        auto values = [&](int g) TRANSFEROPS_INLINE {  // task g's 16 values of tau from j
          __m512 raw;
          if constexpr (std::is_same_v<S, float>) {
            raw = _mm512_loadu_ps(p[g] + j);
          } else {
            const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[g] + j));
            raw = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
          }
          if constexpr (diff) raw = _mm512_sub_ps(raw, _mm512_loadu_ps(base_row + j));
          return raw;
        };
        auto kept = [&](int g, __m512 mag) TRANSFEROPS_INLINE {
          return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(mag, _mm512_set1_ps(bound[g]), _CMP_GE_OQ), mag,
                                         _mm512_set1_ps(drop[g]), _CMP_LT_OQ);
        };
        if constexpr (!W) {
          for (; j + 16 <= j1; j += 16) {
            __m512 vt = _mm512_loadu_ps(vote + j), ps = _mm512_loadu_ps(pos_sum + j), ns = _mm512_loadu_ps(neg_sum + j);
            __m512i pd = _mm512_loadu_si512(pos_den + j), nd = _mm512_loadu_si512(neg_den + j);
            __m512i key = _mm512_loadu_si512(top + j);
            for (int g = 0; g < G; ++g) {
              const __m512 raw = values(g), mag = _mm512_and_ps(raw, sign_off);
              key = _mm512_max_epu32(key, _mm512_castps_si512(mag));
              const __mmask16 in = kept(g, mag);
              const __mmask16 pos = _mm512_mask_cmp_ps_mask(in, raw, zero, _CMP_GT_OQ);
              const __mmask16 neg = _mm512_mask_cmp_ps_mask(in, raw, zero, _CMP_LT_OQ);
              const __m512 wv = _mm512_mul_ps(_mm512_set1_ps(wt[g]), raw);
              vt = _mm512_mask_add_ps(vt, in, vt, raw);
              ps = _mm512_mask_add_ps(ps, pos, ps, wv);
              ns = _mm512_mask_add_ps(ns, neg, ns, wv);
              pd = _mm512_mask_sub_epi32(pd, pos, pd, minus_one);
              nd = _mm512_mask_sub_epi32(nd, neg, nd, minus_one);
            }
            _mm512_storeu_ps(vote + j, vt), _mm512_storeu_ps(pos_sum + j, ps), _mm512_storeu_ps(neg_sum + j, ns);
            _mm512_storeu_si512(pos_den + j, pd), _mm512_storeu_si512(neg_den + j, nd), _mm512_storeu_si512(top + j, key);
          }
        } else {
          // One sweep: the kept values stay in registers (+0 where not kept) between the vote
          // and the sum; a task agrees where its value, with its sign flipped under a minus
          // election, is above 0.
          // With no drop cut and unit weights (PEFT's TIES unweighted), a vector is first tried
          // light: one compare keeps a value (NaN and Inf too), no largest key is tracked and no
          // weight multiplies, 3 of 14 instructions per task. A NaN or Inf input then shows in
          // the vote, and that vector is redone in full, so results and counts do not change.
          const __m512 sign_bit = _mm512_castsi512_ps(_mm512_set1_epi32(int32_t(0x80000000u)));
          const __m512 inf_v = _mm512_set1_ps(inf);
          const __m512i inf_keys = _mm512_set1_epi32(int32_t(inf_key));
          auto merge_sixteen = [&](auto light) TRANSFEROPS_INLINE {  // entries j ... j + 15; false: redo
            constexpr bool L = decltype(light)::value;
            __m512 v[G];
            __m512 vt = zero;
            __m512i key = _mm512_setzero_si512();
            for (int g = 0; g < G; ++g) {
              const __m512 raw = values(g), mag = _mm512_and_ps(raw, sign_off);
              if constexpr (L) {
                v[g] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mag, _mm512_set1_ps(bound[g]), _CMP_NLT_UQ), raw);
              } else {
                key = _mm512_max_epu32(key, _mm512_castps_si512(mag));
                v[g] = _mm512_maskz_mov_ps(kept(g, mag), raw);
              }
              vt = _mm512_add_ps(vt, v[g]);
            }
            if constexpr (L) {
              if (_mm512_cmp_ps_mask(_mm512_and_ps(vt, sign_off), inf_v, _CMP_NLT_UQ)) return false;
            } else {
              segment_bad += __builtin_popcount(_mm512_cmp_epu32_mask(key, inf_keys, _MM_CMPINT_NLT));
            }
            const __mmask16 up = _mm512_cmp_ps_mask(vt, zero, _CMP_GT_OQ), down = _mm512_cmp_ps_mask(vt, zero, _CMP_LT_OQ);
            segment_signs += __builtin_popcount(up) - __builtin_popcount(down);
            const __mmask16 plus = zero_elects_plus ? __mmask16(up | _mm512_cmp_ps_mask(vt, zero, _CMP_EQ_OQ)) : up;
            const __m512 flip = _mm512_maskz_mov_ps(__mmask16(~plus), sign_bit);
            __m512 sum = zero;
            __m512i den = _mm512_setzero_si512();
            for (int g = 0; g < G; ++g) {
              const __mmask16 agree = _mm512_cmp_ps_mask(_mm512_xor_ps(v[g], flip), zero, _CMP_GT_OQ);
              sum = _mm512_mask_add_ps(sum, agree, sum, L ? v[g] : _mm512_mul_ps(_mm512_set1_ps(wt[g]), v[g]));
              den = _mm512_mask_sub_epi32(den, agree, den, minus_one);
            }
            const __m512 by = _mm512_mask_blend_ps(normalize ? _mm512_test_epi32_mask(den, den) : __mmask16(0),
                                                   _mm512_set1_ps(1.0f), _mm512_cvtepi32_ps(den));
            __m512 m = _mm512_div_ps(sum, by);
            if constexpr (diff) m = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(lam), m), _mm512_loadu_ps(base_row + j));
            _mm512_storeu_ps(merged + j, m);
            return true;
          };
          bool light = true;
          for (int g = 0; g < G; ++g) light &= drop[g] == inf && wt[g] == A(1);
          if (light) {
            for (; j + 16 <= j1; j += 16) {
              if (!merge_sixteen(std::true_type{})) merge_sixteen(std::false_type{});
            }
          } else {
            for (; j + 16 <= j1; j += 16) merge_sixteen(std::false_type{});
          }
        }
      }
#endif
      for (; j < j1; ++j) {
        K key = W ? K(0) : top[j];
        A v[G], wv[G];
        auto take = [&](int g) TRANSFEROPS_INLINE {  // task g's kept value, and the largest key
          const A raw = diff ? widen(p[g][j]) - base_row[j] : widen(p[g][j]);
          const A mag = std::abs(raw);
          key = std::max(key, abs_key(mag));  // NaN and Inf have the largest keys
          v[g] = kept_if(mag >= bound[g] && mag < drop[g], raw);
          if constexpr (dare) v[g] = kept_if(all[g] | (draw[g][j] < below[g]), v[g] / rs[g]);
          wv[g] = wt[g] * v[g];
        };
        // What task g votes with, and its ballot under the sign rule.
        auto said = [&](int g) TRANSFEROPS_INLINE { return wbefore ? wv[g] : v[g]; };
        auto ballot = [&](int g) TRANSFEROPS_INLINE {
          const A s = said(g);
          return rule == SignRule::sum ? s : kept_if(s > A(0), A(1)) - kept_if(s < A(0), A(1));
        };
        if constexpr (!W) {
          A vt = vote[j], ps = pos_sum[j], ns = neg_sum[j];
          Den pd = pos_den[j], nd = neg_den[j];
          for (int g = 0; g < G; ++g) {  // each task accumulated as it is read: fewer registers live
            take(g);
            if constexpr (!elect) {
              ps += wv[g];
            } else {
              const bool pos = said(g) > A(0), neg = said(g) < A(0);
              vt += ballot(g);
              ps += kept_if(pos, wv[g]);
              ns += kept_if(neg, wv[g]);
              if constexpr (wbefore) {
                pd += kept_if(pos, dw[g]);
                nd += kept_if(neg, dw[g]);
              } else {
                pd = counted_if(pos, pd);
                nd = counted_if(neg, nd);
              }
            }
          }
          vote[j] = vt, pos_sum[j] = ps, neg_sum[j] = ns, pos_den[j] = pd, neg_den[j] = nd, top[j] = key;
        } else {
          for (int g = 0; g < G; ++g) take(g);
          A sum = A(0);
          Den den = Den(0);
          if constexpr (!elect) {
            for (int g = 0; g < G; ++g) sum += wv[g];
          } else {
            A vt = A(0);
            for (int g = 0; g < G; ++g) vt += ballot(g);
            segment_signs += (vt > A(0)) - (vt < A(0));
            const bool plus = elects_plus(vt);
            for (int g = 0; g < G; ++g) {
              // A select of floats: GCC 12 did not vectorize the loop with `plus ? pos : neg`.
              const bool agree = (plus ? said(g) : -said(g)) > A(0);
              sum += kept_if(agree, wv[g]);
              if constexpr (wbefore) den += kept_if(agree, dw[g]);
              else den = counted_if(agree, den);
            }
          }
          segment_bad += key >= inf_key;
          merged[j] = finish(j, sum, A(den), keep, by);
        }
      }
      bad += segment_bad;
      signs += segment_signs;
    };
    for (int j0 = 0, j1; j0 < int(n); j0 = j1) {
      j1 = int(n);  // the next cut after j0
      for (int t = 0; t < T; ++t) {
        for (const int64_t at : {tr[t].cut - flat0, tr[t].drop_cut - flat0}) {
          if (at > j0 && at < j1) j1 = int(at);
        }
      }
      if (!whole) {
        int t0 = 0;
        for (; t0 + 4 <= T; t0 += 4) sweep(t0, std::integral_constant<int, 4>{}, std::false_type{}, j0, j1);
        for (; t0 < T; ++t0) sweep(t0, std::integral_constant<int, 1>{}, std::false_type{}, j0, j1);
      } else if (T > 4) {
        if constexpr (one_sweep_max == 8) {
          switch (T) {
            case 8: sweep(0, std::integral_constant<int, 8>{}, std::true_type{}, j0, j1); break;
            case 7: sweep(0, std::integral_constant<int, 7>{}, std::true_type{}, j0, j1); break;
            case 6: sweep(0, std::integral_constant<int, 6>{}, std::true_type{}, j0, j1); break;
            default: sweep(0, std::integral_constant<int, 5>{}, std::true_type{}, j0, j1);
          }
        }
      } else {
        switch (T) {
          case 4: sweep(0, std::integral_constant<int, 4>{}, std::true_type{}, j0, j1); break;
          case 3: sweep(0, std::integral_constant<int, 3>{}, std::true_type{}, j0, j1); break;
          case 2: sweep(0, std::integral_constant<int, 2>{}, std::true_type{}, j0, j1); break;
          default: sweep(0, std::integral_constant<int, 1>{}, std::true_type{}, j0, j1);
        }
      }
    }
    if (!whole) {  // separate simple loops, each of which vectorizes
      for (int64_t j = 0; j < n; ++j) bad += top[j] >= inf_key;
      if constexpr (elect) {
        for (int64_t j = 0; j < n; ++j) signs += (vote[j] > A(0)) - (vote[j] < A(0));
      }
      if (store) {
        const A keep = keep_den, by = sum_by;
        for (int64_t j = 0; j < n; ++j) {
          const bool plus = !elect || elects_plus(vote[j]);
          merged[j] = finish(j, plus ? pos_sum[j] : neg_sum[j], plus ? A(pos_den[j]) : A(neg_den[j]), keep, by);
        }
      }
    }
    nonfinite += bad;
    sign_sum += signs;
    if (store) {
      S* o = out.row<S>(r) + c0;
      for (int64_t j = 0; j < n; ++j) o[j] = narrow<S>(merged[j]);
    }
  }
  return {nonfinite, sign_sum};
}

// Fisher merging, one pass: numerator and denominator accumulate per column block.
template <class S>
FisherResult fisher_typed(const std::vector<View2D>& models, const std::vector<View2D>& fishers, const View2D& out,
                          const double* weights, double eps) {
  using A = acc_t<S>;
  const int T = int(models.size());
  const Blocks b(out, kBlock);
  const A floor = A(eps);
  int64_t nonfinite = 0, negative = 0;
#pragma omp parallel for schedule(static) reduction(+ : nonfinite, negative) \
    if (out.rows * out.cols > kParallelMinElements)
  for (int64_t item = 0; item < b.count(); ++item) {
    const int64_t r = b.row(item), c0 = b.col(item), n = b.len(item);
    alignas(64) A num[kBlock], den[kBlock], nf[kBlock], neg[kBlock];
    for (int64_t j = 0; j < n; ++j) num[j] = den[j] = nf[j] = neg[j] = A(0);
    for (int t = 0; t < T; ++t) {
      const S* p = models[t].row<S>(r) + c0;
      const S* f = fishers[t].row<S>(r) + c0;
      const A w = weights ? A(weights[t]) : A(1);
      const S* streams[2] = {p, f};
      prefetching(streams, 0, n, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {  // vectorizes
          const A theta = widen(p[j]), fisher = widen(f[j]);
          nf[j] += (theta - theta) + (fisher - fisher);  // 0 unless some input is NaN or Inf
          neg[j] += fisher < A(0) ? A(1) : A(0);
          const A wf = w * (fisher < floor ? floor : fisher);
          num[j] += wf * theta;
          den[j] += wf;
        }
      });
    }
    int64_t bad = 0, below = 0;
    for (int64_t j = 0; j < n; ++j) bad += nf[j] != A(0);
    for (int64_t j = 0; j < n; ++j) below += neg[j] != A(0);
    nonfinite += bad;
    negative += below;
    S* o = out.row<S>(r) + c0;
    for (int64_t j = 0; j < n; ++j) o[j] = narrow<S>(num[j] / den[j]);
  }
  return {nonfinite, negative};
}

// cpu::kept_l1, one block of kL1Block flat indices per work item: each task's values gathered
// across rows in flat order, then summed over eight interleaved lanes added up in a fixed order,
// so a block's sums depend on nothing but its values.
template <class S, bool dare, bool diff>
void kept_l1_typed(const std::vector<View2D>& tvs, const View2D* base, const Trim* trims, const Dare* dr,
                   int64_t offset, double* partials) {
  using A = acc_t<S>;
  const int T = int(tvs.size());
  const int64_t cols = tvs[0].cols, numel = tvs[0].rows * cols;
  const int64_t first = offset / kL1Block, blocks = l1_blocks(offset, numel);
  const A inf = std::numeric_limits<A>::infinity();
#pragma omp parallel for schedule(static) if (numel > kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = std::max((first + b) * kL1Block, offset) - offset;
    const int64_t i1 = std::min((first + b + 1) * kL1Block, offset + numel) - offset, n = i1 - i0;
    alignas(64) A mag[kL1Block];
    alignas(64) uint32_t draw[dare ? kL1Block : 1];
    for (int t = 0; t < T; ++t) {
      for (int64_t i = i0; i < i1;) {  // row by row
        const int64_t r = i / cols, c = i % cols, len = std::min(cols - c, i1 - i);
        const S* p = tvs[t].row<S>(r) + c;
        for (int64_t j = 0; j < len; ++j) {
          const A raw = diff ? widen(p[j]) - widen(base->row<S>(r)[c + j]) : widen(p[j]);
          mag[i - i0 + j] = std::abs(raw);
        }
        i += len;
      }
      const Trim m = trims ? trims[t] : Trim{0, 0, 0, inf, inf, 0};
      const bool keep_all = !dare || dr->keep_below[t] >= (uint64_t(1) << 32);
      if constexpr (dare) philox_run(uint64_t(dr->offset + i0), uint32_t(t), dr->stream, dr->seed, n, draw);
      double all[8] = {}, kept[8] = {};
      for (int64_t j = 0; j < n; ++j) {
        // The keep test of merge_typed, on the same accumulation-type magnitudes.
        const int64_t i = i0 + j;
        const A bound = A(i < m.cut ? m.lo : m.hi), drop = A(i < m.drop_cut ? m.drop_lo : m.drop_hi);
        bool keep = mag[j] >= bound && mag[j] < drop;
        if constexpr (dare) keep &= keep_all || draw[j] < dr->keep_below[t];
        all[j & 7] += double(mag[j]);
        kept[j & 7] += keep ? double(mag[j]) : 0.0;
      }
      double* out = partials + (b * T + t) * 2;
      out[0] = ((all[0] + all[1]) + (all[2] + all[3])) + ((all[4] + all[5]) + (all[6] + all[7]));
      out[1] = ((kept[0] + kept[1]) + (kept[2] + kept[3])) + ((kept[4] + kept[5]) + (kept[6] + kept[7]));
    }
  }
}

}  // namespace

MergeResult merge_impl(const std::vector<View2D>& tvs, const View2D* base, const View2D& out,
                       const double* weights, const double* scales, const Trim* trims, const Dare* dare,
                       MergeSpec spec) {
  return dispatch_float(tvs[0].dtype, [&](auto tag) -> MergeResult {
    using S = decltype(tag);
    return with_flag(spec.elect, [&](auto elect) {
      // Without an election the sign rule and the weights' place do not matter: one instance.
      return with_flag(elect && spec.rule == SignRule::count, [&](auto count) {
        return with_flag(elect && spec.weight_before_election, [&](auto wbefore) {
          return with_flag(dare != nullptr, [&](auto use_dare) {
            return with_flag(base != nullptr, [&](auto diff) {
              constexpr SignRule rule = decltype(count)::value ? SignRule::count : SignRule::sum;
              return merge_typed<S, rule, decltype(elect)::value, decltype(wbefore)::value,
                                 decltype(use_dare)::value, decltype(diff)::value>(tvs, base, out, weights,
                                                                                  scales, trims, dare, spec);
            });
          });
        });
      });
    });
  });
}

void kept_l1_impl(const std::vector<View2D>& tvs, const View2D* base, const Trim* trims, const Dare* dare,
                  int64_t offset, double* partials) {
  dispatch_float(tvs[0].dtype, [&](auto tag) {
    with_flag(dare != nullptr, [&](auto use_dare) {
      with_flag(base != nullptr, [&](auto diff) {
        kept_l1_typed<decltype(tag), decltype(use_dare)::value, decltype(diff)::value>(tvs, base, trims, dare,
                                                                                      offset, partials);
      });
    });
  });
}

FisherResult fisher_impl(const std::vector<View2D>& models, const std::vector<View2D>& fishers, const View2D& out,
                         const double* weights, double eps) {
  return dispatch_float(out.dtype, [&](auto tag) { return fisher_typed<decltype(tag)>(models, fishers, out, weights, eps); });
}
}  // namespace TRANSFEROPS_ISA

#ifdef TRANSFEROPS_ISA_BASE
#define TRANSFEROPS_MERGING_IMPLS                                                                     \
  MergeResult merge_impl(const std::vector<View2D>& tvs, const View2D* base, const View2D& out,       \
                         const double* weights, const double* scales, const Trim* trims, const Dare* dare, \
                         MergeSpec spec);                                                              \
  void kept_l1_impl(const std::vector<View2D>& tvs, const View2D* base, const Trim* trims,            \
                    const Dare* dare, int64_t offset, double* partials);                               \
  FisherResult fisher_impl(const std::vector<View2D>& models, const std::vector<View2D>& fishers,     \
                           const View2D& out, const double* weights, double eps);
TRANSFEROPS_IF_AVX2(namespace avx2 { TRANSFEROPS_MERGING_IMPLS })
TRANSFEROPS_IF_AVX512(namespace avx512 { TRANSFEROPS_MERGING_IMPLS })

MergeResult merge(const std::vector<View2D>& tvs, const View2D* base, const View2D& out, const double* weights,
                  const double* scales, const Trim* trims, const Dare* dare, MergeSpec spec) {
  TRANSFEROPS_RUN_UP_TO_AVX512(merge_impl(tvs, base, out, weights, scales, trims, dare, spec));
}

int64_t l1_blocks(int64_t offset, int64_t numel) {
  return numel ? (offset + numel - 1) / kL1Block - offset / kL1Block + 1 : 0;
}

void kept_l1(const std::vector<View2D>& tvs, const View2D* base, const Trim* trims, const Dare* dare, int64_t offset,
             double* partials) {
  TRANSFEROPS_RUN_UP_TO_AVX512(kept_l1_impl(tvs, base, trims, dare, offset, partials));
}

FisherResult fisher_average(const std::vector<View2D>& models, const std::vector<View2D>& fishers, const View2D& out,
                            const double* weights, double eps) {
  if (models.empty() || fishers.size() != models.size()) {
    throw std::invalid_argument("fisher_average: expected one Fisher per model, and at least one model");
  }
  TRANSFEROPS_RUN_UP_TO_AVX512(fisher_impl(models, fishers, out, weights, eps));
}
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
