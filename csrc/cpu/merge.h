// CPU kernels of the merging hot path. Plain C++17: no Python headers, testable alone.
#pragma once
#include <cstdint>
#include <vector>

#include "common/view.h"

namespace transferops::cpu {

enum class SignRule : int { sum = 0, count = 1 };

// Which entries a top-k trim keeps: |x| > value, or |x| == value at a flat position (views in
// order, each row-major) before (cut_view, cut_index). The ties at the threshold are thereby
// kept lowest position first, the same on every backend.
struct TopK {
  double value;
  int64_t cut_view;
  int64_t cut_index;
};

// Exact k-th largest |x| over all elements of `views` (one dtype), found by a radix select over
// the bits of |x| (11-bit digits: 3 passes for float32, 2 for 16-bit types) with no sort and no
// copy. k <= 0 keeps nothing (value +Inf); k >= the element count keeps everything (value 0).
TopK abs_topk(const std::vector<View2D>& views, int64_t k);

// Per task: entries kept by a trim are |v| >= lo at flat index < cut and |v| >= hi after it,
// where hi is the next float above lo (so "> threshold"). No trim: lo = hi = 0.
struct Trim {
  double lo, hi;
  int64_t cut;
};

// DARE (Yu et al., ICML 2024): keep each entry with probability keep_below / 2^32, drawn by
// philox_keep(seed, stream, task index, flat element index), and divide survivors by
// `rescale` (the density, PEFT; 1 for none).
struct Dare {
  uint64_t seed;
  uint32_t stream;
  uint64_t keep_below;
  double rescale;
};

struct MergeSpec {
  bool elect;                   // TIES sign election + disjoint mean; false: weighted sum
  SignRule rule;                // how the sign is elected
  bool weight_before_election;  // mergekit: elect on w_t * tv_t and divide by the agreeing
                                // weight; PEFT: elect on tv_t and divide by the agreeing count
};

// One pass over the task vectors (TIES-Merging, Yadav et al. 2023, eq. 1-3): trim each task
// by magnitude and/or DARE (both optional), then either out = sum_t w_t tv_t, or elect s = sign of the vote (zero elects +1)
// and out = (sum over agreeing t of w_t tv_t) / den, den = their count (PEFT) or their weight
// (mergekit), 1 where it is 0. Zeros never vote nor count. All views share rows, cols, dtype.
// `weights`, `trims` and `dare` may be null (all ones, no trim, no DARE).
// Returns at how many element positions some input was NaN or Inf.
int64_t merge(const std::vector<View2D>& task_vectors, const View2D& out, const double* weights,
              const Trim* trims, const Dare* dare, MergeSpec spec);

}  // namespace transferops::cpu
