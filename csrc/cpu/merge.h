// CPU kernels of the merging hot path. Plain C++17: no Python headers, testable alone.
#pragma once
#include <cstdint>
#include <vector>

#include "common/view.h"

namespace transferops::cpu {

enum class SignRule : int { sum = 0, count = 1 };

// TIES sign election and disjoint mean over already-trimmed task vectors (Yadav et al. 2023,
// eq. 2-3): out = sum_t w_t tv_t [sign(tv_t) = s] / max(1, #{t : sign(tv_t) = s}), where
// s = sign(sum_t tv_t) (rule sum) or sign(sum_t sign(tv_t)) (rule count), and s = +1 when the
// vote is exactly zero. Zeros never vote nor count. All views share rows, cols and dtype.
// `weights` holds one weight per task, or is null for all ones.
// Returns at how many element positions some input was NaN or Inf (the output is then not
// meaningful).
int64_t disjoint_merge(const std::vector<View2D>& task_vectors, const View2D& out,
                       const double* weights, SignRule rule);

}  // namespace transferops::cpu
