// The keys of |x| that the top-k select and the fused pass compare, and the task-vector values
// they are taken of. Defined in each ISA build's namespace (cpu/isa.h).
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/dtype.h"
#include "cpu/isa.h"

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {

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

// Element j of a task vector: the stored value, or with models given (diff) theta - theta_0
// formed in the accumulation type, so no task-vector buffer is ever written.
template <class S, bool diff>
inline auto tau(const S* p, const S* q, int64_t j) {
  if constexpr (diff) return widen(p[j]) - widen(q[j]);
  else return p[j];
}
template <class S, bool diff> using Tau = std::conditional_t<diff, acc_t<S>, S>;

}  // namespace TRANSFEROPS_ISA
}  // namespace transferops::cpu
