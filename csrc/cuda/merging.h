// CUDA launchers of the merging hot path: raw device pointers, element strides and a stream, so
// the module never needs torch's headers. Compiled only when TRANSFEROPS_CUDA is on.
#pragma once
#include <cstdint>
#include <vector>

#include "common/view.h"

namespace transferops::cuda {

// Task vectors travel inside the kernel's parameters, so their count is bounded.
constexpr int kMaxTasks = 64;

// Same contract as cpu::disjoint_merge (rule 0 = sum, 1 = count); `nonfinite` is a device
// int64 counter the kernel adds the number of positions holding NaN/Inf to. Asynchronous on `stream`;
// throws std::runtime_error if the launch fails.
void disjoint_merge(const std::vector<View2D>& task_vectors, const View2D& out,
                    const double* weights, int rule, int64_t* nonfinite, uintptr_t stream);

}  // namespace transferops::cuda
