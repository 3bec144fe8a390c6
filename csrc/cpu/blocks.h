// The loop skeleton of the merging and top-k passes over views (cpu/merging.cpp,
// cpu/topk_passes.cpp): work items of a row's column block, streams read ahead of the hardware
// prefetcher, runtime flags made template ones. Defined in each ISA build's namespace (cpu/isa.h).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/view.h"
#include "cpu/isa.h"

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {

// The fused pass's loops index stack arrays through lambdas' captures: unless every level is
// inlined into the function that owns the arrays, GCC must assume that they alias the inputs,
// and past ten pairs it stops checking at run time and leaves the loop scalar.
#define TRANSFEROPS_INLINE __attribute__((always_inline))

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag becomes a template one.
template <class F>
decltype(auto) with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// Work items are (row, column block) pairs, so a 1-D tensor still splits across threads.
struct Blocks {
  int64_t rows, cols, block, per_row;
  Blocks(const View2D& v, int64_t b) : rows(v.rows), cols(v.cols), block(b), per_row((v.cols + b - 1) / b) {}
  int64_t count() const { return rows * per_row; }
  int64_t row(int64_t item) const { return item / per_row; }
  int64_t col(int64_t item) const { return (item % per_row) * block; }
  int64_t len(int64_t item) const { return std::min(block, cols - col(item)); }
};

// The passes read T + 1 streams (tasks and a base), a block of each in turn: more streams than
// the hardware prefetcher follows. So each loop over a block runs in chunks of four cache
// lines, first asking for the lines kPrefetchBytes ahead in each stream. Lines past a block's
// end are those of the next block of the row, which the same thread reads next.
constexpr int64_t kPrefetchBytes = 8192;

template <class S, size_t N, class F>
TRANSFEROPS_INLINE inline void prefetching(const S* const (&streams)[N], int64_t j0, int64_t j1, F&& body) {
  constexpr int64_t line = 64 / int64_t(sizeof(S)), chunk = 4 * line;
  for (int64_t c0 = j0; c0 < j1; c0 += chunk) {
    for (const S* s : streams) {
      const char* ahead = reinterpret_cast<const char*>(s + c0) + kPrefetchBytes;
      for (int l = 0; l < 4; ++l) __builtin_prefetch(ahead + 64 * l);
    }
    body(c0, std::min(j1, c0 + chunk));
  }
}
template <class S, class F>
TRANSFEROPS_INLINE inline void prefetching(const S* stream, int64_t j0, int64_t j1, F&& body) {
  const S* one[1] = {stream};
  prefetching(one, j0, j1, body);
}

}  // namespace TRANSFEROPS_ISA
}  // namespace transferops::cpu
