// GCC vector types as wide as the build's registers (AVX2: 32 bytes, baseline: 16), for the files
// compiled once per ISA (see cpu/isa.h). Kernels that keep each lane's additions in the same
// order get the same bits from both builds.
#pragma once
#include <cstring>

#include "cpu/isa.h"

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {

#ifdef __AVX2__
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
template <class T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};
template <class T>
using Vec = typename VecOf<T>::type;

template <class T>
inline Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
inline void store_vec(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

}  // namespace TRANSFEROPS_ISA
}  // namespace transferops::cpu
