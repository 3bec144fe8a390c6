// CPU kernels of the adapters hot path. Plain C++17: no Python headers, testable alone.
#pragma once
#include <cstdint>

#include "common/view.h"

namespace transferops::cpu {

enum class Activation : int { relu = 0, gelu = 1, silu = 2, tanh = 3 };

// Where the bottleneck adapter's residual comes from: the input x, the input after the
// adapter's layer norm, or a separate tensor (parallel placement: the sublayer's output).
enum class Residual : int { input = 0, normalized = 1, separate = 2 };

// y = R + mask / (1 - p) * s * (W_up phi(W_down LN(x) + b_down) + b_up), for rows x of [N, d];
// LN(x) = (x - mean) * rstd * ln_weight + ln_bias when layer_norm, else x; s per channel.
// Weights are in the compute type T (float for float32/bf16/fp16 inputs, double for float64),
// contiguous; null biases and LN affine terms are absent (zero / one).
struct Bottleneck {
  int64_t d, r;
  const void* w_down;     // [r, d]
  const void* b_down;     // [r] or null
  const void* w_up;       // [d, r]
  const void* b_up;       // [d] or null
  const void* ln_weight;  // [d] or null
  const void* ln_bias;    // [d] or null
  const void* scale;      // [d]
  bool layer_norm;
  double eps;
  Activation act;
  Residual residual;
  double dropout;  // p: output entry (n, j) is kept iff philox(n * d + j; seed) < (1 - p) 2^32
  uint64_t seed;
};

// out = x times its dropout factors, 0 or 1 / (1 - p): entry (n, j) of x [N, d] is kept iff
// philox(n * d + j; seed) < (1 - p) 2^32, the mask of Bottleneck::dropout and of
// transferops.adapters.dropout_factor (LoRA drops its input with it). out may be x.
void adapter_dropout(const View2D& x, const View2D& out, double p, uint64_t seed);

// Rows are processed in tiles that stay in cache, one OpenMP thread per tile: LN statistics,
// the down-projection (the layer norm folded into its weights) and the up-projection with its
// epilogue in register blocks touch x, R and y once each in memory. Saves for backward the
// pre-activation a [N, r] and mean, rstd [N] (type T). Returns whether every entry of a is
// finite (NaN/Inf in x or a weight reaches it).
bool bottleneck_forward(const Bottleneck& w, const View2D& x, const View2D* residual,
                        const View2D& out, void* a, void* mean, void* rstd);

// Gradients (type T) of every weight; dx [N, d] in x's dtype (without the residual's
// gradient when it is separate: that is grad itself). Recomputes LN(x), phi(a) and the dropout
// mask tile by tile; weight gradients are summed per fixed row chunk, then in chunk order, so
// they do not depend on the thread count.
struct BottleneckGrads {
  void* w_down;     // [r, d]
  void* b_down;     // [r]
  void* w_up;       // [d, r]
  void* b_up;       // [d]
  void* ln_weight;  // [d]
  void* ln_bias;    // [d]
  void* scale;      // [d]
};
void bottleneck_backward(const Bottleneck& w, const View2D& grad, const View2D& x, const void* a, const void* mean,
                         const void* rstd, const View2D& dx, const BottleneckGrads& grads);

}  // namespace transferops::cpu
