#include "cpu/ot.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/parallel.h"

namespace transferops::cpu {

namespace {

// A scaling whose log leaves [-kAbsorb, kAbsorb] is folded into the potentials (K rebuilt):
// e^50 is far from both ends of float32 and float64.
constexpr double kAbsorb = 50.0;

// One problem's state. T: the kernel's storage (float for float32 costs, double otherwise).
template <class T>
struct Problem {
  const T* C;
  int64_t N, M, ldc;
  const double *a, *b;
  double *f, *g;     // absorbed potentials
  std::vector<double> F, G;  // full potentials F = f + eps log u, G = g + eps log v
  std::vector<double> u, v;  // kernel-domain scalings
  std::vector<T> K;          // exp((f_i + g_j - C_ij) / eps)
  std::vector<double> la, lb;
  double mass;
};

inline double neg_inf() { return -std::numeric_limits<double>::infinity(); }

template <class T>
void build_kernel(Problem<T>& p, double eps, bool parallel) {
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int64_t i = 0; i < p.N; ++i) {
    const T* c = p.C + i * p.ldc;
    T* k = p.K.data() + i * p.M;
    for (int64_t j = 0; j < p.M; ++j) k[j] = T(std::exp((p.f[i] + p.g[j] - double(c[j])) / eps));
  }
  std::fill(p.u.begin(), p.u.end(), 1.0);
  std::fill(p.v.begin(), p.v.end(), 1.0);
}

// Exact log-domain c-transform of row i: -eps log sum_j b_j exp((G_j - C_ij) / eps).
template <class T>
double row_transform(const Problem<T>& p, int64_t i, double eps) {
  const T* c = p.C + i * p.ldc;
  double mx = neg_inf();
  for (int64_t j = 0; j < p.M; ++j) mx = std::max(mx, p.lb[j] + (p.G[j] - double(c[j])) / eps);
  if (mx == neg_inf()) return 0.0;
  double sum = 0.0;
  for (int64_t j = 0; j < p.M; ++j) sum += std::exp(p.lb[j] + (p.G[j] - double(c[j])) / eps - mx);
  return -eps * (mx + std::log(sum));
}

template <class T>
double col_transform(const Problem<T>& p, int64_t j, double eps) {
  double mx = neg_inf();
  for (int64_t i = 0; i < p.N; ++i) mx = std::max(mx, p.la[i] + (p.F[i] - double(p.C[i * p.ldc + j])) / eps);
  if (mx == neg_inf()) return 0.0;
  double sum = 0.0;
  for (int64_t i = 0; i < p.N; ++i) sum += std::exp(p.la[i] + (p.F[i] - double(p.C[i * p.ldc + j])) / eps - mx);
  return -eps * (mx + std::log(sum));
}

// Products and short partial sums run in the kernel's type T (8 float lanes vectorize twice as
// wide as double ones); every kFlush terms the lanes are added into double totals, which bounds
// a float32 partial sum's rounding to kFlush / 8 terms. Sums are in a fixed order: results do
// not depend on the thread count, and the compiler vectorizes without reassociating.
constexpr int kLanes = 8;
constexpr int64_t kFlush = 512;

template <class T>
double dot(const T* k, const T* w, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t end = std::min(n, start + kFlush);
    T acc[kLanes] = {};
    int64_t j = start;
    for (; j + kLanes <= end; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += k[j + l] * w[j + l];
    }
    for (; j < end; ++j) acc[0] += k[j] * w[j];
    for (int l = 0; l < kLanes; ++l) total += double(acc[l]);
  }
  return total;
}

// s_i = sum_j K_ij w_j (rows, `transpose` false) or s_j = sum_i K_ij w_i.
template <class T>
void kernel_apply(const Problem<T>& p, const std::vector<double>& w, std::vector<double>& s, bool transpose,
                  bool parallel) {
  const int64_t n_in = transpose ? p.N : p.M;
  std::vector<T> wt(w.begin(), w.begin() + n_in);
  if (!transpose) {
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int64_t i = 0; i < p.N; ++i) s[i] = dot(p.K.data() + i * p.M, wt.data(), p.M);
    return;
  }
  const int threads = parallel ? max_threads() : 1;
  std::vector<double> partial(size_t(threads) * p.M, 0.0);
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel num_threads(threads) if (parallel)
#endif
  {
#ifdef TRANSFEROPS_OPENMP
    const int t = parallel ? omp_get_thread_num() : 0;
#else
    const int t = 0;
#endif
    double* acc = partial.data() + size_t(t) * p.M;
    std::vector<T> block(p.M);
    const int64_t lo = p.N * t / threads, hi = p.N * (t + 1) / threads;
    for (int64_t start = lo; start < hi; start += kFlush / kLanes) {
      std::fill(block.begin(), block.end(), T(0));
      for (int64_t i = start; i < std::min(hi, start + kFlush / kLanes); ++i) {
        const T* k = p.K.data() + i * p.M;
        const T wi = wt[i];
        if (wi == T(0)) continue;
        for (int64_t j = 0; j < p.M; ++j) block[j] += k[j] * wi;
      }
      for (int64_t j = 0; j < p.M; ++j) acc[j] += double(block[j]);
    }
  }
  for (int64_t j = 0; j < p.M; ++j) {
    double acc = 0.0;
    for (int t = 0; t < threads; ++t) acc += partial[size_t(t) * p.M + j];
    s[j] = acc;
  }
}

struct Half {
  const double* weights_other;  // b for rows, a for columns
  bool rows;
};

// One half-iteration: F (rows) or G (columns) from the other side's scalings. Returns whether
// some scaling left the absorption range.
template <class T>
bool update(Problem<T>& p, const SinkhornSettings& s, bool rows, double omega, std::vector<double>& w,
            std::vector<double>& sums, bool parallel) {
  const int64_t n = rows ? p.N : p.M, m = rows ? p.M : p.N;
  const double* other_w = rows ? p.b : p.a;
  const std::vector<double>& other_scale = rows ? p.v : p.u;
  for (int64_t j = 0; j < m; ++j) w[j] = other_w[j] * other_scale[j];
  kernel_apply(p, w, sums, !rows, parallel);
  std::vector<double>& full = rows ? p.F : p.G;
  std::vector<double>& scale = rows ? p.u : p.v;
  const double* absorbed = rows ? p.f : p.g;
  bool out_of_range = false;
  for (int64_t i = 0; i < n; ++i) {
    const double sum = sums[i];
    // An underflowed (or denormal) sum has lost its digits: take the exact log-domain update.
    const double target = sum > 1e-280 && (sizeof(T) == 8 || sum > 1e-30)
                              ? s.lam * (absorbed[i] - s.eps * std::log(sum))
                              : s.lam * (rows ? row_transform(p, i, s.eps) : col_transform(p, i, s.eps));
    full[i] = (1.0 - omega) * full[i] + omega * target;
    const double log_scale = (full[i] - absorbed[i]) / s.eps;
    scale[i] = std::exp(log_scale);
    out_of_range |= !(std::fabs(log_scale) <= kAbsorb);
  }
  return out_of_range;
}

template <class T>
void absorb(Problem<T>& p, double eps, bool parallel) {
  std::copy(p.F.begin(), p.F.end(), p.f);
  std::copy(p.G.begin(), p.G.end(), p.g);
  build_kernel(p, eps, parallel);
}

template <class T>
double row_error(Problem<T>& p, const SinkhornSettings& s, std::vector<double>& w, std::vector<double>& sums,
                 bool parallel) {
  for (int64_t j = 0; j < p.M; ++j) w[j] = p.b[j] * p.v[j];
  kernel_apply(p, w, sums, false, parallel);
  double err = 0.0;
  for (int64_t i = 0; i < p.N; ++i) {
    const double target = s.rho > 0 ? p.a[i] * std::exp(-p.F[i] / s.rho) : p.a[i];
    err += std::fabs(p.a[i] * p.u[i] * sums[i] - target);
  }
  return err / p.mass;
}

// sum_i p_i log(p_i / q_i) - sum p + sum q.
double generalized_kl(const std::vector<double>& p, const double* q, int64_t n) {
  double kl = 0.0;
  for (int64_t i = 0; i < n; ++i) kl += (p[i] > 0 ? p[i] * std::log(p[i] / q[i]) : 0.0) - p[i] + q[i];
  return kl;
}

// <C, P> and ot_eps of the final state, with P = diag(a u) K diag(b v) read from the stored
// kernel: eps KL(P | a x b) = sum_i F_i r_i + sum_j G_j c_j - <C, P> - eps (sum P - sum a sum b)
// for the marginals r, c of P, so ot_eps needs one pass for <C, P> and the marginals.
template <class T>
void values(Problem<T>& p, const SinkhornSettings& s, double* transport, double* value) {
  std::vector<double> r(p.N), c(p.M, 0.0), bv(p.M);
  for (int64_t j = 0; j < p.M; ++j) bv[j] = p.b[j] * p.v[j];
  double cost = 0.0;
  for (int64_t i = 0; i < p.N; ++i) {
    const double au = p.a[i] * p.u[i];
    if (au == 0.0) {
      r[i] = 0.0;
      continue;
    }
    const T* k = p.K.data() + i * p.M;
    const T* ci = p.C + i * p.ldc;
    double row = 0.0, row_cost = 0.0;
    for (int64_t j = 0; j < p.M; ++j) {
      const double pij = au * double(k[j]) * bv[j];
      row += pij;
      row_cost += pij * double(ci[j]);
      c[j] += pij;
    }
    r[i] = row;
    cost += row_cost;
  }
  double dual = 0.0, mass_p = 0.0, mass_b = 0.0;
  for (int64_t i = 0; i < p.N; ++i) dual += p.F[i] * r[i], mass_p += r[i];
  for (int64_t j = 0; j < p.M; ++j) dual += p.G[j] * c[j], mass_b += p.b[j];
  double objective = dual - s.eps * (mass_p - p.mass * mass_b);
  if (s.rho > 0) objective += s.rho * (generalized_kl(r, p.a, p.N) + generalized_kl(c, p.b, p.M));
  *transport = cost;
  *value = objective;
}

template <class T>
void solve(Problem<T>& p, const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport, double* value,
           bool parallel) {
  p.F.assign(p.f, p.f + p.N);
  p.G.assign(p.g, p.g + p.M);
  p.u.assign(p.N, 1.0);
  p.v.assign(p.M, 1.0);
  p.la.resize(p.N);
  p.lb.resize(p.M);
  for (int64_t i = 0; i < p.N; ++i) p.la[i] = p.a[i] > 0 ? std::log(p.a[i]) : neg_inf();
  for (int64_t j = 0; j < p.M; ++j) p.lb[j] = p.b[j] > 0 ? std::log(p.b[j]) : neg_inf();
  p.mass = 0.0;
  for (int64_t i = 0; i < p.N; ++i) p.mass += p.a[i];
  for (int64_t k = 0; k < s.schedule_len; ++k) {  // eps-scaling: exact log-domain updates
    const double e = s.schedule[k];
    const double lam = s.rho > 0 ? s.rho / (s.rho + e) : 1.0;
    for (int64_t i = 0; i < p.N; ++i) p.F[i] = lam * row_transform(p, i, e);
    for (int64_t j = 0; j < p.M; ++j) p.G[j] = s.symmetric ? p.F[j] : lam * col_transform(p, j, e);
  }
  std::copy(p.F.begin(), p.F.end(), p.f);
  std::copy(p.G.begin(), p.G.end(), p.g);
  p.K.resize(size_t(p.N) * p.M);
  build_kernel(p, s.eps, parallel);
  std::vector<double> w(std::max(p.N, p.M)), sums(std::max(p.N, p.M));
  double err = std::numeric_limits<double>::infinity(), previous = err;
  double omega = 1.0;
  int checks = 0;
  bool relaxable = s.omega > 1.0 && !s.symmetric;
  int64_t it = 0;
  while (it < s.max_iter) {
    ++it;
    bool out = update(p, s, true, s.symmetric ? 0.5 : omega, w, sums, parallel);
    if (s.symmetric) {
      std::copy(p.F.begin(), p.F.end(), p.G.begin());
      std::copy(p.u.begin(), p.u.end(), p.v.begin());
    } else {
      out |= update(p, s, false, omega, w, sums, parallel);
    }
    if (out) absorb(p, s.eps, parallel);
    if (it % s.check_every == 0 || it == s.max_iter) {
      err = row_error(p, s, w, sums, parallel);
      if (err <= s.tol) break;
      ++checks;
      // Over-relaxation, tuned once from plain Sinkhorn's observed rate r per iteration (past
      // the first check's transient): omega = 2 / (1 + sqrt(1 - r)), the optimal SOR factor of
      // the linearized iteration (Lehmann et al. 2021). An error that grows drops back to
      // omega = 1 for good. The fixed point, hence the answer, is the same.
      if (relaxable && omega == 1.0 && checks == 3 && err < previous) {
        const double rate = std::pow(err / previous, 1.0 / double(s.check_every));
        omega = std::min(s.omega, 2.0 / (1.0 + std::sqrt(1.0 - rate)));
      } else if (omega > 1.0 && !(err < previous)) {
        omega = 1.0;
        relaxable = false;
      }
      previous = err;
    }
  }
  std::copy(p.F.begin(), p.F.end(), p.f);
  std::copy(p.G.begin(), p.G.end(), p.g);
  *n_iter = it;
  *error = err;
  values(p, s, transport, value);
}

template <class T>
void sinkhorn_typed(const View2D& C, int64_t N, const View2D& a, const View2D& b, const View2D& f, const View2D& g,
                    const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport, double* value) {
  const int64_t B = a.rows, M = C.cols;
  // Several problems: one per thread. One problem: the threads share its rows when it is big
  // enough; below ~4M entries the regions' wake-ups cost more than a second core gives (measured
  // at N = M = 1000 on 2 cores: 0.65 ms an iteration either way, 0.31 vs 0.14 ms at 500).
  const bool across = B > 1;
  const bool inside = !across && N * M >= (int64_t(1) << 22);
  std::string failure;
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (across)
#endif
  for (int64_t k = 0; k < B; ++k) {
    try {
      Problem<T> p{C.row<const T>(k * N), N, M, C.row_stride, a.row<const double>(k), b.row<const double>(k),
                   f.row<double>(k), g.row<double>(k), {}, {}, {}, {}, {}, {}, {}, 0.0};
      solve(p, s, n_iter + k, error + k, transport + k, value + k, inside);
    } catch (const std::exception& e) {  // (allocation) an exception must not leave the region
#ifdef TRANSFEROPS_OPENMP
#pragma omp critical
#endif
      failure = e.what();
    }
  }
  if (!failure.empty()) throw std::runtime_error(failure);
}

}  // namespace

void sinkhorn_matrix(const View2D& C, int64_t N, const View2D& a, const View2D& b, const View2D& f, const View2D& g,
                     const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport, double* value) {
  if (N < 1 || C.rows != a.rows * N || a.cols != N || b.cols != C.cols || b.rows != a.rows || f.rows != a.rows ||
      f.cols != N || g.rows != a.rows || g.cols != C.cols) {
    throw std::invalid_argument("sinkhorn: C [B * N, M], a and f [B, N], b and g [B, M] do not match");
  }
  if (a.dtype != DType::f64 || b.dtype != DType::f64 || f.dtype != DType::f64 || g.dtype != DType::f64) {
    throw std::invalid_argument("sinkhorn: weights and potentials must be float64");
  }
  if (!(s.eps > 0) || !(s.tol > 0) || s.max_iter < 1 || s.check_every < 1) {
    throw std::invalid_argument("sinkhorn: expected eps > 0, tol > 0, max_iter >= 1, check_every >= 1");
  }
  if (C.dtype == DType::f32) {
    sinkhorn_typed<float>(C, N, a, b, f, g, s, n_iter, error, transport, value);
  } else if (C.dtype == DType::f64) {
    sinkhorn_typed<double>(C, N, a, b, f, g, s, n_iter, error, transport, value);
  } else {
    throw std::invalid_argument("sinkhorn: C must be float32 or float64");
  }
}

}  // namespace transferops::cpu
