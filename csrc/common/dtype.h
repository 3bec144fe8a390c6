// Storage types and their widening to the accumulation type. bf16 and fp16 arrive as raw 16-bit
// words (numpy has no bf16), are widened to float, and are rounded back to nearest-even on store,
// as torch does, so a native result and a torch cast of the same float agree bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/view.h"

namespace transferops {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

template <class S> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <class S> using acc_t = typename acc_type<S>::type;

inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t bits_from_f32(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(bf16 v) { return f32_from_bits(uint32_t(v.bits) << 16); }
inline float widen(f16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in float
    return f32_from_bits(bits_from_f32(std::ldexp(float(mant), -24)) | sign);
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <class S> S narrow(acc_t<S> v);
template <> inline float narrow<float>(float v) { return v; }
template <> inline double narrow<double>(double v) { return v; }
template <> inline bf16 narrow<bf16>(float v) {
  const uint32_t u = bits_from_f32(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  return bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <> inline f16 narrow<f16>(float v) {
  uint32_t x = bits_from_f32(v);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint16_t o;
  if (x >= 0x47800000u) {  // |v| >= 65536, Inf or NaN
    o = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (x < 0x38800000u) {  // below 2^-14: let a float add do the subnormal rounding
    const uint32_t magic = (127u - 15u + 23u - 10u + 1u) << 23;
    o = uint16_t(bits_from_f32(f32_from_bits(x) + f32_from_bits(magic)) - magic);
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x -= 112u << 23;
    x += 0xfffu + odd;
    o = uint16_t(x >> 13);
  }
  return f16{uint16_t(o | (sign >> 16))};
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
  }
  return "?";
}

// Calls f(S{}) with S the storage type of `d`.
template <class F>
decltype(auto) dispatch_float(DType d, F&& f) {
  switch (d) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::bf16: return f(bf16{});
    case DType::f16: return f(f16{});
  }
  throw std::invalid_argument("unsupported dtype code " + std::to_string(int(d)));
}

}  // namespace transferops
