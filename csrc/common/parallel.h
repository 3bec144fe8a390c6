// OpenMP settings shared by every CPU op. A parallel region costs ~100x the work of a tiny
// input, so loops go parallel only above kParallelMinElements.
#pragma once
#include <cstdint>
#ifdef TRANSFEROPS_OPENMP
#include <omp.h>
#endif

namespace transferops {

constexpr int64_t kParallelMinElements = int64_t(1) << 16;

inline int max_threads() {
#ifdef TRANSFEROPS_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace transferops
