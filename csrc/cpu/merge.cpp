#include "cpu/merge.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/philox.h"

// This file is compiled twice on x86-64: for the baseline ISA (namespace cpu::base) and with
// -mavx2 (namespace cpu::avx2, TRANSFEROPS_ISA=avx2); merge() picks one at run time. Both use
// -ffp-contract=off and the same per-element order of operations, so their results are
// bit-identical.
#ifndef TRANSFEROPS_ISA
#define TRANSFEROPS_ISA base
#define TRANSFEROPS_ISA_BASE 1
#endif

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {
namespace {

// Columns handled per work item: the per-column accumulators stay in L1 and the inner loops
// over them vectorize.
constexpr int64_t kBlock = 512;

// Work items are (row, column block) pairs, so a 1-D tensor still splits across threads.
struct Blocks {
  int64_t rows, cols, block, per_row;
  Blocks(const View2D& v, int64_t b) : rows(v.rows), cols(v.cols), block(b), per_row((v.cols + b - 1) / b) {}
  int64_t count() const { return rows * per_row; }
  int64_t row(int64_t item) const { return item / per_row; }
  int64_t col(int64_t item) const { return (item % per_row) * block; }
  int64_t len(int64_t item) const { return std::min(block, cols - col(item)); }
};

// ---- radix select over the bits of |x| ----------------------------------------------------

// The bits of |x| as an unsigned integer: for non-negative IEEE values, integer order is
// value order, so selecting on bits selects on magnitudes.
template <class S> struct AbsKey;
template <> struct AbsKey<float> { using K = uint32_t; static constexpr int bits = 31; };
template <> struct AbsKey<double> { using K = uint64_t; static constexpr int bits = 63; };
template <> struct AbsKey<bf16> { using K = uint16_t; static constexpr int bits = 15; };
template <> struct AbsKey<f16> { using K = uint16_t; static constexpr int bits = 15; };

template <class S>
inline typename AbsKey<S>::K abs_key(const S& x) {
  typename AbsKey<S>::K k;
  std::memcpy(&k, &x, sizeof(k));
  return k & (std::numeric_limits<typename AbsKey<S>::K>::max() >> 1);
}

constexpr int64_t kHistBlock = 4096;

template <class S>
std::vector<int64_t> digit_histogram(const std::vector<View2D>& views, uint64_t prefix, int shift,
                                     int dbits) {
  using K = typename AbsKey<S>::K;
  if (dbits < 1 || dbits > 16 || shift < 0 || shift + dbits > AbsKey<S>::bits) {
    throw std::invalid_argument("abs_digit_histogram: digit out of the key's range");
  }
  const int64_t bins = int64_t(1) << dbits;
  const int high = shift + dbits;
  std::vector<int64_t> hist(bins, 0);
  for (const View2D& v : views) {
    const Blocks b(v, kHistBlock);
#pragma omp parallel if (v.rows * v.cols > kParallelMinElements)
    {
      std::vector<int64_t> local(bins, 0);
#pragma omp for schedule(static) nowait
      for (int64_t item = 0; item < b.count(); ++item) {
        const S* p = v.row<S>(b.row(item)) + b.col(item);
        const int64_t n = b.len(item);
        for (int64_t j = 0; j < n; ++j) {
          const uint64_t key = abs_key(p[j]);
          // Shifting a key by its full width or more is undefined: the first digit has no prefix.
          if (high >= int(8 * sizeof(K)) || (key >> high) == prefix) ++local[(key >> shift) & uint64_t(bins - 1)];
        }
      }
#pragma omp critical
      for (int64_t d = 0; d < bins; ++d) hist[d] += local[d];  // integer sums: order-free
    }
  }
  return hist;
}

// Elements with key `key` per work item (row, column block), counted in parallel.
template <class S>
std::vector<int64_t> equal_per_item(const View2D& v, const Blocks& b, uint64_t key) {
  std::vector<int64_t> counts(b.count(), 0);
#pragma omp parallel for schedule(static) if (v.rows * v.cols > kParallelMinElements)
  for (int64_t item = 0; item < b.count(); ++item) {
    const S* p = v.row<S>(b.row(item)) + b.col(item);
    int64_t c = 0;
    for (int64_t j = 0, n = b.len(item); j < n; ++j) c += uint64_t(abs_key(p[j])) == key;
    counts[item] = c;
  }
  return counts;
}

// One parallel counting pass, then a scan of the single block that holds the cut.
template <class S>
int64_t equal_cut(const std::vector<View2D>& views, uint64_t key, int64_t rank) {
  int64_t before = 0, seen = 0;  // elements passed, equal ones among them
  for (const View2D& v : views) {
    const Blocks b(v, kHistBlock);
    const std::vector<int64_t> counts = equal_per_item<S>(v, b, key);
    for (int64_t item = 0; item < b.count(); ++item) {
      if (seen + counts[item] < rank) {
        seen += counts[item];
        continue;
      }
      const S* p = v.row<S>(b.row(item)) + b.col(item);
      for (int64_t j = 0, n = b.len(item); j < n; ++j) {
        if (uint64_t(abs_key(p[j])) == key && ++seen == rank) {
          return before + b.row(item) * v.cols + b.col(item) + j + 1;
        }
      }
    }
    before += v.rows * v.cols;
  }
  return -seen;
}

// ---- the fused merge pass --------------------------------------------------------------------

template <class S, SignRule rule, bool elect, bool wbefore, bool dare>
int64_t merge_typed(const std::vector<View2D>& tvs, const View2D& out, const double* weights,
                    const Trim* trims, const Dare* dr) {
  using A = acc_t<S>;
  const int T = int(tvs.size());
  std::vector<A> w(T, A(1)), lo(T, A(0)), hi(T, A(0));
  std::vector<int64_t> cut(T, 0);
  for (int t = 0; t < T; ++t) {
    if (weights) w[t] = A(weights[t]);
    if (trims) lo[t] = A(trims[t].lo), hi[t] = A(trims[t].hi), cut[t] = trims[t].cut;
  }
  const Dare d = dare ? *dr : Dare{0, 0, 0, 1.0, 0};
  const A rescale = A(d.rescale);
  const Blocks b(out, kBlock);
  int64_t nonfinite = 0;

#pragma omp parallel for schedule(static) reduction(+ : nonfinite) \
    if (out.rows * out.cols > kParallelMinElements)
  for (int64_t item = 0; item < b.count(); ++item) {
    const int64_t r = b.row(item), c0 = b.col(item), n = b.len(item);
    const int64_t flat0 = r * out.cols + c0;
    A vote[kBlock], pos_sum[kBlock], neg_sum[kBlock], pos_den[kBlock], neg_den[kBlock], nf[kBlock];
    for (int64_t j = 0; j < n; ++j) {
      vote[j] = pos_sum[j] = neg_sum[j] = pos_den[j] = neg_den[j] = nf[j] = A(0);
    }
    for (int t = 0; t < T; ++t) {
      const S* p = tvs[t].row<S>(r) + c0;
      const A wt = w[t];
      const A dw = wbefore ? wt : A(1);
      // Branch-free selects only, so GCC vectorizes this loop under -fno-trapping-math
      // (check with -fopt-info-vec). [j0, j1) shares one magnitude bound.
      auto accumulate = [&](int64_t j0, int64_t j1, A bound) {
        for (int64_t j = j0; j < j1; ++j) {
          const A raw = widen(p[j]);
          nf[j] += raw - raw;  // stays 0 unless some v is NaN or Inf
          A v = std::abs(raw) >= bound ? raw : A(0);
          if constexpr (dare) {
            v = philox_keep(d.seed, d.stream, uint32_t(t), uint64_t(d.offset + flat0 + j), d.keep_below) ? v / rescale : A(0);
          }
          const A wv = wt * v;
          if constexpr (!elect) {
            pos_sum[j] += wv;
          } else {
            const A s = wbefore ? wv : v;  // what votes
            const A pos = s > A(0) ? A(1) : A(0);
            const A neg = s < A(0) ? A(1) : A(0);
            vote[j] += rule == SignRule::sum ? s : pos - neg;
            pos_sum[j] += s > A(0) ? wv : A(0);
            neg_sum[j] += s < A(0) ? wv : A(0);
            pos_den[j] += s > A(0) ? dw : A(0);
            neg_den[j] += s < A(0) ? dw : A(0);
          }
        }
      };
      const int64_t split = std::clamp<int64_t>(cut[t] - flat0, 0, n);
      accumulate(0, split, lo[t]);
      accumulate(split, n, hi[t]);
    }
    S* o = out.row<S>(r) + c0;
    int64_t bad = 0;
    for (int64_t j = 0; j < n; ++j) {
      if constexpr (elect) {
        const A p = pos_sum[j] / (pos_den[j] == A(0) ? A(1) : pos_den[j]);
        const A q = neg_sum[j] / (neg_den[j] == A(0) ? A(1) : neg_den[j]);
        o[j] = narrow<S>(vote[j] >= A(0) ? p : q);
      } else {
        o[j] = narrow<S>(pos_sum[j]);
      }
      bad += nf[j] != A(0);
    }
    nonfinite += bad;
  }
  return nonfinite;
}

}  // namespace

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag becomes a template one.
template <class F>
decltype(auto) with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

int64_t merge_impl(const std::vector<View2D>& tvs, const View2D& out, const double* weights,
                   const Trim* trims, const Dare* dare, MergeSpec spec) {
  return dispatch_float(out.dtype, [&](auto tag) -> int64_t {
    using S = decltype(tag);
    return with_flag(spec.elect, [&](auto elect) {
      // Without an election the sign rule and the weights' place do not matter: one instance.
      return with_flag(elect && spec.rule == SignRule::count, [&](auto count) {
        return with_flag(elect && spec.weight_before_election, [&](auto wbefore) {
          return with_flag(dare != nullptr, [&](auto use_dare) {
            constexpr SignRule rule = decltype(count)::value ? SignRule::count : SignRule::sum;
            return merge_typed<S, rule, decltype(elect)::value, decltype(wbefore)::value,
                               decltype(use_dare)::value>(tvs, out, weights, trims, dare);
          });
        });
      });
    });
  });
}

}  // namespace TRANSFEROPS_ISA

#ifdef TRANSFEROPS_ISA_BASE
#ifdef TRANSFEROPS_HAVE_AVX2
namespace avx2 {
int64_t merge_impl(const std::vector<View2D>& tvs, const View2D& out, const double* weights,
                   const Trim* trims, const Dare* dare, MergeSpec spec);
}
#endif

namespace {
std::string& isa_choice() {
  static std::string isa = [] {
#ifdef TRANSFEROPS_HAVE_AVX2
    if (__builtin_cpu_supports("avx2")) return std::string("avx2");
#endif
    return std::string("base");
  }();
  return isa;
}
}  // namespace

std::vector<int64_t> abs_digit_histogram(const std::vector<View2D>& views, uint64_t prefix,
                                         int shift, int dbits) {
  if (views.empty()) throw std::invalid_argument("abs_digit_histogram: no views");
  return dispatch_float(views[0].dtype, [&](auto tag) {
    return base::digit_histogram<decltype(tag)>(views, prefix, shift, dbits);
  });
}

int64_t abs_equal_cut(const std::vector<View2D>& views, uint64_t key, int64_t rank) {
  if (rank < 1) throw std::invalid_argument("abs_equal_cut: rank must be >= 1");
  if (views.empty()) return 0;
  return dispatch_float(views[0].dtype, [&](auto tag) { return base::equal_cut<decltype(tag)>(views, key, rank); });
}

const char* cpu_isa() { return isa_choice().c_str(); }

void set_cpu_isa(const std::string& isa) {
#ifdef TRANSFEROPS_HAVE_AVX2
  if (isa == "avx2" && !__builtin_cpu_supports("avx2")) throw std::invalid_argument("isa: this CPU has no AVX2");
  if (isa == "avx2" || isa == "base") {
    isa_choice() = isa;
    return;
  }
#else
  if (isa == "base") return;
#endif
  throw std::invalid_argument("isa: expected one of the compiled ISAs (base" +
#ifdef TRANSFEROPS_HAVE_AVX2
                              std::string(", avx2)")
#else
                              std::string(")")
#endif
                              + ", got '" + isa + "'");
}

int64_t merge(const std::vector<View2D>& tvs, const View2D& out, const double* weights,
              const Trim* trims, const Dare* dare, MergeSpec spec) {
#ifdef TRANSFEROPS_HAVE_AVX2
  if (isa_choice() == "avx2") return avx2::merge_impl(tvs, out, weights, trims, dare, spec);
#endif
  return base::merge_impl(tvs, out, weights, trims, dare, spec);
}
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
