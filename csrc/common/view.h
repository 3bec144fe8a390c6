// A strided 2-D view of a tensor's memory: every op sees its operands as rows of contiguous
// elements. Python collapses any tensor whose inner stride is 1 into this form without copying.
#pragma once
#include <cstdint>

namespace transferops {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

struct View2D {
  void* data = nullptr;
  DType dtype = DType::f32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;  // in elements; the column stride is always 1

  template <class S>
  S* row(int64_t r) const {
    return static_cast<S*>(data) + r * row_stride;
  }
};

}  // namespace transferops
