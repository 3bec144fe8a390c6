#include "cpu/adapters.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/philox.h"
#include "cpu/isa.h"

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {
namespace {

// Rows per tile: about 2^17 values of the compute type per [rows, d] buffer, never below 16 rows
// (BLAS slows down on fewer). Measured on a 2-core EPYC, forward with LN: 2^15, 2^16, 2^17 within
// noise at d=768 (~1.3-1.5 ms, N=2048); at d=4096 (N=8192) 40, ~45, 34 ms: BLAS gains from 32 rows.
constexpr int64_t kTileElements = int64_t(1) << 17;
// Weight gradients are summed over at most this many fixed row chunks (their partials take
// chunks * (2 r d + 4 d) values).
constexpr int64_t kMaxChunks = 16;
// The stream word of the adapters' dropout draws (merging uses hashes of tensor names).
constexpr uint32_t kDropoutStream = 0x41445054u;

int64_t tile_rows(int64_t d) { return std::max<int64_t>(16, kTileElements / std::max<int64_t>(d, 1)); }

// Sum of f(j) for j < n in 8 interleaved partial sums, combined in a fixed order: without
// -ffast-math, one running sum cannot vectorize; these lanes can.
template <class T, class F>
T lane_sum(int64_t n, F&& f) {
  T lane[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) lane[l] += f(j + l);
  }
  for (; j < n; ++j) lane[0] += f(j);
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

template <class T>
T activate(Activation act, T v) {
  switch (act) {
    case Activation::relu: return v > T(0) ? v : T(0);
    case Activation::gelu: return T(0.5) * v * (T(1) + std::erf(v * T(M_SQRT1_2)));
    case Activation::silu: return v / (T(1) + std::exp(-v));
    case Activation::tanh: return std::tanh(v);
  }
  return v;
}

template <class T>
T activate_slope(Activation act, T v) {
  switch (act) {
    case Activation::relu: return v > T(0) ? T(1) : T(0);
    case Activation::gelu:
      return T(0.5) * (T(1) + std::erf(v * T(M_SQRT1_2))) + v * std::exp(T(-0.5) * v * v) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);
    case Activation::silu: {
      const T s = T(1) / (T(1) + std::exp(-v));
      return s * (T(1) + v * (T(1) - s));
    }
    case Activation::tanh: {
      const T t = std::tanh(v);
      return T(1) - t * t;
    }
  }
  return T(1);
}

struct Dropout {
  bool on;
  uint32_t keep_below;
  double inv_keep;
  uint64_t seed;
  int64_t d;

  explicit Dropout(const Bottleneck& w)
      : on(w.dropout > 0), keep_below(uint32_t(std::min(std::ldexp(1.0 - w.dropout, 32), 4294967295.0))),
        inv_keep(w.dropout < 1 ? 1.0 / (1.0 - w.dropout) : 0.0), seed(w.seed), d(w.d) {}

  // The factor entry (n, j) of the adapter's output is multiplied by: 0 or 1 / (1 - p).
  template <class T>
  T factor(int64_t n, int64_t j) const {
    const uint64_t i = uint64_t(n) * uint64_t(d) + uint64_t(j);
    return philox_keep(seed, kDropoutStream, 0, uint32_t(i), uint32_t(i >> 32), keep_below, false) ? T(inv_keep)
                                                                                                     : T(0);
  }
};

template <class T>
struct Weights {
  const T *w_down, *b_down, *w_up, *b_up, *ln_weight, *ln_bias, *scale;
  explicit Weights(const Bottleneck& w)
      : w_down(static_cast<const T*>(w.w_down)), b_down(static_cast<const T*>(w.b_down)),
        w_up(static_cast<const T*>(w.w_up)), b_up(static_cast<const T*>(w.b_up)),
        ln_weight(static_cast<const T*>(w.ln_weight)), ln_bias(static_cast<const T*>(w.ln_bias)),
        scale(static_cast<const T*>(w.scale)) {}
};

// The adapter's input rows [n0, n0 + m) in type T: LN(x) when layer_norm (writing mean and
// rstd when `stats_out`, else reading them), else x itself, pointing into x when S is T (no
// copy). Returns the rows' pointer and row stride.
template <class S, class T>
std::pair<const T*, int64_t> adapter_input(const Bottleneck& w, const Weights<T>& p, const View2D& x, int64_t n0,
                                           int64_t m, T* buf, T* mean, T* rstd, bool stats_out, T* xhat) {
  const int64_t d = w.d;
  if (!w.layer_norm) {
    if constexpr (std::is_same_v<S, T>) {
      return {x.row<S>(n0), x.row_stride};
    } else {
      for (int64_t i = 0; i < m; ++i) {
        const S* xr = x.row<S>(n0 + i);
        T* br = buf + i * d;
        for (int64_t j = 0; j < d; ++j) br[j] = widen(xr[j]);
      }
      return {buf, d};
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    const S* xr = x.row<S>(n0 + i);
    T* br = buf + i * d;
    T mu, rs;
    if (stats_out) {
      for (int64_t j = 0; j < d; ++j) br[j] = widen(xr[j]);
      // The sum of x - x_0 (the row's first entry), not of x: when |mean| >> std, terms of the
      // size of the spread keep the sum's rounding at that size. Then a second pass for the
      // variance, over the cached row.
      const T x0 = br[0];
      mu = x0 + lane_sum<T>(d, [&](int64_t j) { return br[j] - x0; }) / T(d);
      const T ss = lane_sum<T>(d, [&](int64_t j) { return (br[j] - mu) * (br[j] - mu); });
      rs = T(1) / std::sqrt(ss / T(d) + T(w.eps));
      mean[n0 + i] = mu;
      rstd[n0 + i] = rs;
    } else {
      mu = mean[n0 + i];
      rs = rstd[n0 + i];
    }
    T* hr = xhat ? xhat + i * d : nullptr;
    for (int64_t j = 0; j < d; ++j) {
      const T h = (widen(xr[j]) - mu) * rs;
      if (hr) hr[j] = h;
      br[j] = h * (p.ln_weight ? p.ln_weight[j] : T(1)) + (p.ln_bias ? p.ln_bias[j] : T(0));
    }
  }
  return {buf, d};
}

template <class S>
void forward_typed(const Gemm& gemm, const Bottleneck& w, const View2D& x, const View2D* residual, const View2D& out,
                   void* a_out, void* mean_out, void* rstd_out) {
  using T = acc_t<S>;
  const Weights<T> p(w);
  const Dropout drop(w);
  const int64_t N = x.rows, d = w.d, r = w.r, tm = tile_rows(d), tiles = (N + tm - 1) / tm;
  T *a = static_cast<T*>(a_out), *mean = static_cast<T*>(mean_out), *rstd = static_cast<T*>(rstd_out);
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel if (tiles > 1 && N * d > kParallelMinElements)
#endif
  {
    std::vector<T> buf(size_t(tm * d)), up(size_t(tm * d)), z(size_t(tm * r));
#ifdef TRANSFEROPS_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * tm, m = std::min(tm, N - n0);
      const auto [in, ld] = adapter_input<S, T>(w, p, x, n0, m, buf.data(), mean, rstd, true, nullptr);
      T* at = a + n0 * r;
      gemm_rm<T>(gemm, false, true, m, r, d, T(1), in, ld, p.w_down, d, T(0), at, r);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t k = 0; k < r; ++k) {
          at[i * r + k] += p.b_down ? p.b_down[k] : T(0);
          z[size_t(i * r + k)] = activate(w.act, at[i * r + k]);
        }
      }
      gemm_rm<T>(gemm, false, true, m, d, r, T(1), z.data(), r, p.w_up, r, T(0), up.data(), d);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t n = n0 + i;
        const T* ur = up.data() + i * d;
        S* yr = out.row<S>(n);
        auto store = [&](auto res_at) {
          if (drop.on) {
            for (int64_t j = 0; j < d; ++j) {
              const T u = p.scale[j] * (ur[j] + (p.b_up ? p.b_up[j] : T(0)));
              yr[j] = narrow<S>(res_at(j) + drop.factor<T>(n, j) * u);
            }
          } else {
            for (int64_t j = 0; j < d; ++j) {
              yr[j] = narrow<S>(res_at(j) + p.scale[j] * (ur[j] + (p.b_up ? p.b_up[j] : T(0))));
            }
          }
        };
        if (w.residual == Residual::normalized) {
          const T* nr = in + i * ld;
          store([&](int64_t j) { return nr[j]; });
        } else {
          const S* rr = w.residual == Residual::separate ? residual->row<S>(n) : x.row<S>(n);
          store([&](int64_t j) { return widen(rr[j]); });
        }
      }
    }
  }
}

// One row chunk's partial weight gradients: M = g'^T phi(a) [d, r] (g' the output gradient
// after dropout), the column sums of g' [d], of da [r], dW_down [r, d], and the LN terms [d].
template <class T>
struct Partials {
  std::vector<T> m, g_sum, da_sum, w_down, ln_weight, ln_bias;
  Partials(int64_t d, int64_t r)
      : m(size_t(d * r)), g_sum(size_t(d)), da_sum(size_t(r)), w_down(size_t(r * d)), ln_weight(size_t(d)),
        ln_bias(size_t(d)) {}
  void add(const Partials& o) {
    for (auto [dst, src] : {std::pair{&m, &o.m}, {&g_sum, &o.g_sum}, {&da_sum, &o.da_sum}, {&w_down, &o.w_down},
                            {&ln_weight, &o.ln_weight}, {&ln_bias, &o.ln_bias}}) {
      for (size_t i = 0; i < dst->size(); ++i) (*dst)[i] += (*src)[i];
    }
  }
};

template <class S>
void backward_typed(const Gemm& gemm, const Bottleneck& w, const View2D& grad, const View2D& x, const void* a_in,
                    const void* mean_in, const void* rstd_in, const View2D& dx, const BottleneckGrads& out) {
  using T = acc_t<S>;
  const Weights<T> p(w);
  const Dropout drop(w);
  const int64_t N = x.rows, d = w.d, r = w.r, tm = tile_rows(d), tiles = (N + tm - 1) / tm;
  const int64_t chunks = std::max<int64_t>(1, std::min(kMaxChunks, tiles));
  const T* a = static_cast<const T*>(a_in);
  T* mean = const_cast<T*>(static_cast<const T*>(mean_in));
  T* rstd = const_cast<T*>(static_cast<const T*>(rstd_in));
  // dz = g' diag(s) W_up: the per-channel scale folded into W_up once.
  std::vector<T> w_up_scaled(size_t(d * r));
  for (int64_t j = 0; j < d; ++j) {
    for (int64_t k = 0; k < r; ++k) w_up_scaled[size_t(j * r + k)] = p.scale[j] * p.w_up[j * r + k];
  }
  std::vector<Partials<T>> parts(size_t(chunks), Partials<T>(d, r));
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel for schedule(static) if (chunks > 1 && N * d > kParallelMinElements)
#endif
  for (int64_t c = 0; c < chunks; ++c) {
    Partials<T>& part = parts[size_t(c)];
    std::vector<T> buf(size_t(tm * d)), gbuf(size_t(tm * d)), dxin(size_t(tm * d)), z(size_t(tm * r)),
        da(size_t(tm * r));
    std::vector<T> xhat(w.layer_norm ? size_t(tm * d) : 0);
    const int64_t t_begin = tiles * c / chunks, t_end = tiles * (c + 1) / chunks;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n0 = t * tm, m = std::min(tm, N - n0);
      // g' = mask / (1 - p) * g, in T (pointing into grad when no conversion is needed).
      const T* gp;
      int64_t ldg;
      if (std::is_same_v<S, T> && !drop.on) {
        gp = reinterpret_cast<const T*>(grad.row<S>(n0));
        ldg = grad.row_stride;
      } else {
        for (int64_t i = 0; i < m; ++i) {
          const S* gr = grad.row<S>(n0 + i);
          T* br = gbuf.data() + i * d;
          if (drop.on) {
            for (int64_t j = 0; j < d; ++j) br[j] = widen(gr[j]) * drop.factor<T>(n0 + i, j);
          } else {
            for (int64_t j = 0; j < d; ++j) br[j] = widen(gr[j]);
          }
        }
        gp = gbuf.data();
        ldg = d;
      }
      const auto [in, ld] = adapter_input<S, T>(w, p, x, n0, m, buf.data(), mean, rstd, false,
                                                w.layer_norm ? xhat.data() : nullptr);
      const T* at = a + n0 * r;
      for (int64_t i = 0; i < m * r; ++i) z[size_t(i)] = activate(w.act, at[i]);
      gemm_rm<T>(gemm, true, false, d, r, m, T(1), gp, ldg, z.data(), r, T(1), part.m.data(), r);
      for (int64_t i = 0; i < m; ++i) {
        const T* gr = gp + i * ldg;
        for (int64_t j = 0; j < d; ++j) part.g_sum[size_t(j)] += gr[j];
      }
      gemm_rm<T>(gemm, false, false, m, r, d, T(1), gp, ldg, w_up_scaled.data(), r, T(0), da.data(), r);
      for (int64_t i = 0; i < m * r; ++i) {
        da[size_t(i)] *= activate_slope(w.act, at[i]);
        part.da_sum[size_t(i % r)] += da[size_t(i)];
      }
      gemm_rm<T>(gemm, true, false, r, d, m, T(1), da.data(), r, in, ld, T(1), part.w_down.data(), d);
      gemm_rm<T>(gemm, false, false, m, d, r, T(1), da.data(), r, p.w_down, d, T(0), dxin.data(), d);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t n = n0 + i;
        const S* graw = grad.row<S>(n);
        T* gi = dxin.data() + i * d;
        if (w.residual == Residual::normalized) {
          for (int64_t j = 0; j < d; ++j) gi[j] += widen(graw[j]);
        }
        S* dr = dx.row<S>(n);
        const bool add_g = w.residual == Residual::input;
        if (w.layer_norm) {
          const T* hr = xhat.data() + i * d;
          T* lw = part.ln_weight.data();
          T* lb = part.ln_bias.data();
          for (int64_t j = 0; j < d; ++j) {
            lw[j] += gi[j] * hr[j];
            lb[j] += gi[j];
            gi[j] *= p.ln_weight ? p.ln_weight[j] : T(1);
          }
          const T c1 = lane_sum<T>(d, [&](int64_t j) { return gi[j]; }) / T(d);
          const T c2 = lane_sum<T>(d, [&](int64_t j) { return gi[j] * hr[j]; }) / T(d);
          const T rs = rstd[n];
          for (int64_t j = 0; j < d; ++j) {
            const T v = rs * (gi[j] - c1 - hr[j] * c2);
            dr[j] = narrow<S>(add_g ? v + widen(graw[j]) : v);
          }
        } else {
          for (int64_t j = 0; j < d; ++j) dr[j] = narrow<S>(add_g ? gi[j] + widen(graw[j]) : gi[j]);
        }
      }
    }
  }
  for (int64_t c = 1; c < chunks; ++c) parts[0].add(parts[size_t(c)]);
  const Partials<T>& total = parts[0];
  T *gw_down = static_cast<T*>(out.w_down), *gb_down = static_cast<T*>(out.b_down),
    *gw_up = static_cast<T*>(out.w_up), *gb_up = static_cast<T*>(out.b_up),
    *gln_w = static_cast<T*>(out.ln_weight), *gln_b = static_cast<T*>(out.ln_bias),
    *gscale = static_cast<T*>(out.scale);
  std::copy(total.w_down.begin(), total.w_down.end(), gw_down);
  std::copy(total.da_sum.begin(), total.da_sum.end(), gb_down);
  std::copy(total.ln_weight.begin(), total.ln_weight.end(), gln_w);
  std::copy(total.ln_bias.begin(), total.ln_bias.end(), gln_b);
  // y_j = s_j (W_up z + b_up)_j: dW_up = diag(s) M, db_up = s g'_sum, ds_j = <W_up_j, M_j> + b_up_j g'_sum_j.
  for (int64_t j = 0; j < d; ++j) {
    T ds = 0;
    for (int64_t k = 0; k < r; ++k) {
      const T mjk = total.m[size_t(j * r + k)];
      gw_up[j * r + k] = p.scale[j] * mjk;
      ds += p.w_up[j * r + k] * mjk;
    }
    const T gs = total.g_sum[size_t(j)];
    gb_up[j] = p.scale[j] * gs;
    gscale[j] = ds + (p.b_up ? p.b_up[j] * gs : T(0));
  }
}

}  // namespace

void bottleneck_forward_impl(const Gemm& gemm, const Bottleneck& w, const View2D& x, const View2D* residual,
                             const View2D& out, void* a, void* mean, void* rstd) {
  dispatch_float(x.dtype, [&](auto s) { forward_typed<decltype(s)>(gemm, w, x, residual, out, a, mean, rstd); });
}

void bottleneck_backward_impl(const Gemm& gemm, const Bottleneck& w, const View2D& grad, const View2D& x,
                              const void* a, const void* mean, const void* rstd, const View2D& dx,
                              const BottleneckGrads& grads) {
  dispatch_float(x.dtype, [&](auto s) { backward_typed<decltype(s)>(gemm, w, grad, x, a, mean, rstd, dx, grads); });
}

}  // namespace TRANSFEROPS_ISA

#ifdef TRANSFEROPS_ISA_BASE
#ifdef TRANSFEROPS_HAVE_AVX2
namespace avx2 {
void bottleneck_forward_impl(const Gemm& gemm, const Bottleneck& w, const View2D& x, const View2D* residual,
                             const View2D& out, void* a, void* mean, void* rstd);
void bottleneck_backward_impl(const Gemm& gemm, const Bottleneck& w, const View2D& grad, const View2D& x,
                              const void* a, const void* mean, const void* rstd, const View2D& dx,
                              const BottleneckGrads& grads);
}  // namespace avx2
#endif

void bottleneck_forward(const Gemm& gemm, const Bottleneck& w, const View2D& x, const View2D* residual,
                        const View2D& out, void* a, void* mean, void* rstd) {
#ifdef TRANSFEROPS_HAVE_AVX2
  if (std::string(cpu_isa()) == "avx2") return avx2::bottleneck_forward_impl(gemm, w, x, residual, out, a, mean, rstd);
#endif
  base::bottleneck_forward_impl(gemm, w, x, residual, out, a, mean, rstd);
}

void bottleneck_backward(const Gemm& gemm, const Bottleneck& w, const View2D& grad, const View2D& x, const void* a,
                         const void* mean, const void* rstd, const View2D& dx, const BottleneckGrads& grads) {
#ifdef TRANSFEROPS_HAVE_AVX2
  if (std::string(cpu_isa()) == "avx2") return avx2::bottleneck_backward_impl(gemm, w, grad, x, a, mean, rstd, dx, grads);
#endif
  base::bottleneck_backward_impl(gemm, w, grad, x, a, mean, rstd, dx, grads);
}
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
