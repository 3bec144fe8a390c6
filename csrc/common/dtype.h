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
// The f16 conversions are branch-free (each case computed, one selected) so that loops over
// them vectorize: with branches, a fused merge pass over float16 models would run scalar.
inline float widen(f16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t mag = v.bits & 0x7fffu;
  const uint32_t tiny = bits_from_f32(float(mag) * 0x1p-24f);  // zero or subnormal: exact
  const uint32_t normal = (mag << 13) + (112u << 23);
  const uint32_t special = 0x7f800000u | ((mag & 0x3ffu) << 13);  // Inf or NaN, payload kept
  return f32_from_bits(sign | (mag < 0x400u ? tiny : mag >= 0x7c00u ? special : normal));
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
  // Below 2^-14 a float add does the subnormal rounding; else round the mantissa to nearest even.
  const uint32_t magic = (127u - 15u + 23u - 10u + 1u) << 23;
  const uint32_t tiny = bits_from_f32(f32_from_bits(x) + f32_from_bits(magic)) - magic;
  const uint32_t normal = (x - (112u << 23) + 0xfffu + ((x >> 13) & 1u)) >> 13;
  const uint32_t huge = x > 0x7f800000u ? 0x7e00u : 0x7c00u;  // |v| >= 65536: NaN or Inf
  const uint32_t o = x >= 0x47800000u ? huge : x < 0x38800000u ? tiny : normal;
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
