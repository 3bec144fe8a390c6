// The arithmetic both Sinkhorn solvers (cpu/ot.cpp, cpu/ot_points.cpp) run, in forms GCC
// vectorizes with the same bits in every build: exp and log over arrays, dot products in fixed
// lanes, and the value ot_eps from the plan's relative entropy and marginals.
// Defined in each ISA build's namespace (see cpu/isa.h): each build gets its own copy.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/ot.h"
#include "cpu/vec.h"

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {

// exp(x) in plain arithmetic the compiler vectorizes: x = k ln2 + r with |r| <= ln2 / 2, a Taylor
// polynomial of e^r, times 2^k assembled in the exponent bits from a magic-number rounding, so no
// float-to-int conversion (SSE2/AVX2 have none for 64-bit integers). Inputs below `lowest` give
// 0 (e^lowest is at the bottom of the normal range); inputs must stay below `highest`.
template <class T> struct ExpConstants;
template <> struct ExpConstants<double> {  // degree 12: relative error below 2e-16
  using Bits = uint64_t;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52: t - magic rounds to an integer
  static constexpr double lowest = -708.0, highest = 709.0, log2e = 1.4426950408889634, ln2_hi = 6.93147180369123816490e-01,
                          ln2_lo = 1.90821492927058770002e-10;
  static constexpr int degree = 12, mantissa = 52;
  static constexpr Bits bias = 1023;
};
template <> struct ExpConstants<float> {  // degree 6: relative error below 2e-7, twice the lanes
  using Bits = uint32_t;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  static constexpr float lowest = -87.0f, highest = 88.0f, log2e = 1.44269504f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr int degree = 6, mantissa = 23;
  static constexpr Bits bias = 127;
};

// Series coefficients at compile time: computed per call, the divisions' chain would cost as much as
// the exponentials of the four-row updates of a sweep.
template <class T, int Degree>
constexpr std::array<T, Degree + 1> inverse_factorials() {
  std::array<T, Degree + 1> c{};
  c[0] = T(1);
  for (int k = 1; k <= Degree; ++k) c[k] = c[k - 1] / T(k);
  return c;
}

// Degree: a lower one where the result only needs float32's precision.
template <class T, int Degree = ExpConstants<T>::degree>
void exp_array(const T* x, T* out, int64_t n) {
  using E = ExpConstants<T>;
  static constexpr std::array<T, Degree + 1> inverse_factorial = inverse_factorials<T, Degree>();
  for (int64_t i = 0; i < n; ++i) {
    const T v = std::max(x[i], E::lowest);
    const T t = v * E::log2e + E::magic;
    const T k = t - E::magic;
    const T r = (v - k * E::ln2_hi) - k * E::ln2_lo;
    T q = inverse_factorial[Degree];
    for (int p = Degree - 1; p >= 0; --p) q = q * r + inverse_factorial[p];
    typename E::Bits bits;
    std::memcpy(&bits, &t, sizeof bits);
    bits = (bits + E::bias) << E::mantissa;  // the low bits of t hold k; 2^k's exponent field is k + bias
    T scale;
    std::memcpy(&scale, &bits, sizeof scale);
    out[i] = x[i] < E::lowest ? T(0) : q * scale;
  }
}

// log(x) for positive normal x, in the same style: x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(z), z = (m - 1) / (m + 1), by its odd series to z^21 (|z| <= 0.172: the
// series' error is below 1e-17; Terms = 5, to z^9, is below 1e-9); e as a double through the
// magic number, not a conversion.
template <int Terms = 11>
void log_array(const double* x, double* out, int64_t n) {
  constexpr double magic = 6755399441055744.0, ln2_hi = 6.93147180369123816490e-01,
                   ln2_lo = 1.90821492927058770002e-10;
  uint64_t magic_bits;
  std::memcpy(&magic_bits, &magic, sizeof magic_bits);
  static constexpr std::array<double, Terms> odd_inverse = [] {
    std::array<double, Terms> c{};
    for (int k = 0; k < Terms; ++k) c[k] = 1.0 / double(2 * k + 1);
    return c;
  }();
  for (int64_t i = 0; i < n; ++i) {
    uint64_t bits;
    std::memcpy(&bits, &x[i], sizeof bits);
    const uint64_t mantissa = (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;  // m in [1, 2)
    double m;
    std::memcpy(&m, &mantissa, sizeof m);
    const bool high = m > 1.4142135623730951;
    m = high ? 0.5 * m : m;
    const uint64_t e_bits = magic_bits + (bits >> 52) - 1023 + (high ? 1 : 0);
    double e;
    std::memcpy(&e, &e_bits, sizeof e);
    e -= magic;
    const double z = (m - 1.0) / (m + 1.0), z2 = z * z;
    double q = odd_inverse[Terms - 1];
    for (int k = Terms - 2; k >= 0; --k) q = q * z2 + odd_inverse[k];
    out[i] = e * ln2_hi + (2.0 * z * q + e * ln2_lo);
  }
}

inline double neg_inf() { return -std::numeric_limits<double>::infinity(); }

// Products and short partial sums run in the kernel's type T (8 float lanes vectorize twice as
// wide as double ones); every kFlush terms the lanes are added into double totals, which bounds
// a float32 partial sum's rounding to kFlush / 8 terms. Sums are in a fixed order: results do
// not depend on the thread count, and the compiler vectorizes without reassociating.
constexpr int kLanes = 8;
constexpr int64_t kFlush = 512;

// Accumulators are vectors of cpu/vec.h, kLanes / their width of them per row; each lane adds the
// same terms in the same order in both builds. (A 64-byte vector of doubles, wider than any
// register, would go through memory.)

// out[r] = sum_j K_rj w_j for R rows (leading dimension ld) sharing the loads of w. Vector types
// keep the accumulators in registers (as plain arrays GCC spills them and assembles w from
// scalar loads).
template <int R, class T>
void dots(const T* k, int64_t ld, const T* w, int64_t n, double* out) {
  constexpr int W = kVecBytes / int(sizeof(T)), P = kLanes / W;
  double total[R] = {};
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t end = std::min(n, start + kFlush);
    Vec<T> acc[R][P] = {};
    int64_t j = start;
    for (; j + kLanes <= end; j += kLanes) {
      Vec<T> wj[P];
      for (int q = 0; q < P; ++q) wj[q] = load_vec(w + j + q * W);
      for (int r = 0; r < R; ++r) {
        for (int q = 0; q < P; ++q) acc[r][q] += load_vec(k + r * ld + j + q * W) * wj[q];
      }
    }
    for (; j < end; ++j) {
      for (int r = 0; r < R; ++r) acc[r][0][0] += k[r * ld + j] * w[j];
    }
    for (int r = 0; r < R; ++r) {
      for (int l = 0; l < kLanes; ++l) total[r] += double(acc[r][l / W][l % W]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = total[r];
}

// h(z) = z e^z - e^z + 1 = sum_{k >= 2} (k - 1) z^k / k!, given ez = e^z: with P = Q e^z,
// KL(P | Q) = sum Q h(z) (generalized KL). Eps far above the costs makes every z tiny (|z| ~
// costs / eps) and the closed form cancels to rounding, which eps then multiplies: |z| <= 1/32
// takes the series to z^9 (relative error below 1e-17 there).
inline double entropy_term(double z, double ez) {
  constexpr double c2 = 1.0 / 2, c3 = 1.0 / 3, c4 = 1.0 / 8, c5 = 1.0 / 30, c6 = 1.0 / 144, c7 = 1.0 / 840,
                   c8 = 1.0 / 5760, c9 = 1.0 / 45360;
  const double series = z * z * (c2 + z * (c3 + z * (c4 + z * (c5 + z * (c6 + z * (c7 + z * (c8 + z * c9)))))));
  const double closed = (z * ez - ez) + 1.0;
  return std::fabs(z) <= 1.0 / 32 ? series : closed;
}

// out_j = h(z_j) given ez_j = e^(z_j), 0 where w_j = 0 (columns of zero weight): elementwise, so
// it vectorizes; the callers sum with dots (fixed lanes).
inline void entropy_terms(const double* z, const double* ez, const double* w, double* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const double h = entropy_term(z[j], ez[j]);
    out[j] = w[j] > 0 ? h : 0.0;
  }
}

// sum_i p_i log(p_i / q_i) - sum p + sum q, as sum_i q_i h(log(p_i / q_i)) (0 log 0 = 0).
inline double generalized_kl(const std::vector<double>& p, const double* q, int64_t n) {
  double kl = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(q[i] > 0)) continue;  // then p_i = 0 too: P's rows and columns of zero weight are zero
    const double z = p[i] > 0 ? std::log(p[i] / q[i]) : neg_inf();
    kl += p[i] > 0 ? q[i] * entropy_term(z, p[i] / q[i]) : q[i];
  }
  return kl;
}

// Keeps a copy of the potentials whose marginal error `err` is the smallest so far. Where tol
// cannot be met (below the rounding of the sums, or an infeasible target), the iterations go on
// to max_iter and may drift from their best state: the solvers return that state.
inline void keep_best(double err, const std::vector<double>& F, const std::vector<double>& G, double& best,
                      std::vector<double>& best_F, std::vector<double>& best_G) {
  if (!(err < best)) return;
  best = err;
  best_F.assign(F.begin(), F.end());
  best_G.assign(G.begin(), G.end());
}

// ot_eps from <C, P>, KL(P | a x b) (summed by the solver as sum a_i b_j h(z_ij)) and the
// marginals r, c of P.
inline double objective(const SinkhornSettings& s, double transport, double entropy, const std::vector<double>& r,
                        const std::vector<double>& c, const double* a, const double* b) {
  double value = transport + s.eps * entropy;
  if (s.rho > 0) value += s.rho * (generalized_kl(r, a, int64_t(r.size())) + generalized_kl(c, b, int64_t(c.size())));
  return value;
}

}  // namespace TRANSFEROPS_ISA
}  // namespace transferops::cpu
