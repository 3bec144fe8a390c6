#include "cpu/merge.h"

#include <algorithm>

#include "common/dtype.h"
#include "common/parallel.h"

namespace transferops::cpu {
namespace {

// Columns handled per work item: the per-column accumulators stay in L1 and the inner loops
// over them vectorize.
constexpr int64_t kBlock = 512;

// One pass over the inputs: the positive and negative sides are accumulated separately and the
// elected sign picks one at the end, so no input is read twice. Each accumulator adds in task
// order, so the result does not depend on the thread count or the blocking.
template <class S, SignRule rule>
int64_t disjoint_merge_typed(const std::vector<View2D>& tvs, const View2D& out,
                             const double* weights) {
  using A = acc_t<S>;
  const int T = int(tvs.size());
  std::vector<A> w(T, A(1));
  if (weights) std::transform(weights, weights + T, w.begin(), [](double x) { return A(x); });
  const int64_t col_blocks = (out.cols + kBlock - 1) / kBlock;
  const int64_t items = out.rows * col_blocks;
  int64_t nonfinite = 0;

#pragma omp parallel for schedule(static) reduction(+ : nonfinite) \
    if (out.rows * out.cols > kParallelMinElements)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t r = item / col_blocks;
    const int64_t c0 = (item % col_blocks) * kBlock;
    const int64_t n = std::min(kBlock, out.cols - c0);
    A vote[kBlock], pos_sum[kBlock], neg_sum[kBlock], pos_cnt[kBlock], neg_cnt[kBlock], nf[kBlock];
    for (int64_t j = 0; j < n; ++j) {
      vote[j] = pos_sum[j] = neg_sum[j] = pos_cnt[j] = neg_cnt[j] = nf[j] = A(0);
    }
    // Branch-free selects only, so GCC vectorizes this loop under -fno-trapping-math
    // (check with -fopt-info-vec).
    for (int t = 0; t < T; ++t) {
      const S* p = tvs[t].row<S>(r) + c0;
      const A wt = w[t];
      for (int64_t j = 0; j < n; ++j) {
        const A v = widen(p[j]);
        const A wv = wt * v;
        const A pos = v > A(0) ? A(1) : A(0);
        const A neg = v < A(0) ? A(1) : A(0);
        vote[j] += rule == SignRule::sum ? v : pos - neg;
        pos_sum[j] += v > A(0) ? wv : A(0);
        neg_sum[j] += v < A(0) ? wv : A(0);
        pos_cnt[j] += pos;
        neg_cnt[j] += neg;
        nf[j] += v - v;  // stays 0 unless some v is NaN or Inf
      }
    }
    S* o = out.row<S>(r) + c0;
    int64_t bad = 0;
    for (int64_t j = 0; j < n; ++j) {
      const A p = pos_sum[j] / std::max(pos_cnt[j], A(1));
      const A q = neg_sum[j] / std::max(neg_cnt[j], A(1));
      o[j] = narrow<S>(vote[j] >= A(0) ? p : q);
      bad += nf[j] != A(0);
    }
    nonfinite += bad;
  }
  return nonfinite;
}

}  // namespace

int64_t disjoint_merge(const std::vector<View2D>& tvs, const View2D& out, const double* weights,
                       SignRule rule) {
  return dispatch_float(out.dtype, [&](auto tag) {
    using S = decltype(tag);
    return rule == SignRule::sum ? disjoint_merge_typed<S, SignRule::sum>(tvs, out, weights)
                                 : disjoint_merge_typed<S, SignRule::count>(tvs, out, weights);
  });
}

}  // namespace transferops::cpu
