// Sinkhorn on stored cost matrices (cpu::sinkhorn_matrix): the kernel-domain solver.
#include "cpu/ot.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/parallel.h"
#include "cpu/isa.h"
#include "cpu/ot_anderson.h"
#include "cpu/ot_arith.h"
#include "cpu/vec.h"

// Compiled twice on x86-64 (see cpu/isa.h). Sums run in fixed lanes and -ffp-contract=off
// holds, so both builds give the same bits.

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {

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
  // Scratch of the sweeps, kept across the thousands of calls of a solve.
  std::vector<T> wt, block;
  std::vector<double> partial;
};

// K in its own precision: a float kernel takes the float exponential (8 lanes, degree 6), whose
// 2e-7 relative error is of the order of K's own rounding.
template <class T>
void build_kernel(Problem<T>& p, double eps, bool parallel) {
  using E = ExpConstants<T>;
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int64_t i = 0; i < p.N; ++i) {
    const T* c = p.C + i * p.ldc;
    T* k = p.K.data() + i * p.M;
    for (int64_t j = 0; j < p.M; ++j) k[j] = T(std::min((p.f[i] + p.g[j] - double(c[j])) / eps, double(E::highest)));
    exp_array(k, k, p.M);
  }
  std::fill(p.u.begin(), p.u.end(), 1.0);
  std::fill(p.v.begin(), p.v.end(), 1.0);
}

// Exact log-domain c-transform over n costs c[k * stride]: -eps log sum_k exp(lw_k + (pot_k -
// c_k) / eps). A row i of C is (C + i ldc, 1) with b's logs and G; a column j is (C + j, ldc)
// with a's logs and F.
template <class T>
double c_transform(const T* c, int64_t stride, int64_t n, const std::vector<double>& lw,
                   const std::vector<double>& pot, double eps) {
  double mx = neg_inf();
  for (int64_t k = 0; k < n; ++k) mx = std::max(mx, lw[k] + (pot[k] - double(c[k * stride])) / eps);
  if (mx == neg_inf()) return 0.0;
  double sum = 0.0;
  for (int64_t k = 0; k < n; ++k) sum += std::exp(lw[k] + (pot[k] - double(c[k * stride])) / eps - mx);
  return -eps * (mx + std::log(sum));
}

template <class T>
double row_transform(const Problem<T>& p, int64_t i, double eps) {
  return c_transform(p.C + i * p.ldc, 1, p.M, p.lb, p.G, eps);
}

template <class T>
double col_transform(const Problem<T>& p, int64_t j, double eps) {
  return c_transform(p.C + j, p.ldc, p.N, p.la, p.F, eps);
}

// s_i = sum_j K_ij w_j for rows [lo, hi) of K, four at a time (one load of w serves four rows).
template <class T>
void row_products(const Problem<T>& p, const T* w, int64_t lo, int64_t hi, double* s) {
  const T* K = p.K.data();
  const int64_t M = p.M;
  int64_t i = lo;
  for (; i + 4 <= hi; i += 4) dots<4>(K + i * M, M, w, M, s + i);
  for (; i < hi; ++i) dots<1>(K + i * M, M, w, M, s + i);
}

// F (rows) or G (columns) over [lo, hi) from their kernel sums, then the scalings from them;
// the new values are averaged with the old by weight omega, or, where mix is given, are its
// Anderson step (columns, all of them at once). z is scratch of hi - lo. Returns whether some
// scaling left the absorption range. The logs and exponentials go through the array versions
// above (scalar libm calls would take as long as the kernel product); with a float32
// kernel the scalings are rounded to float32 before use and the sums carry float32's error, so
// shorter series serve.
template <class T>
bool update_scalings(Problem<T>& p, const SinkhornSettings& s, bool rows, double omega, Anderson* mix,
                     const double* sums, double* z, int64_t lo, int64_t hi) {
  std::vector<double>& full = rows ? p.F : p.G;
  std::vector<double>& scale = rows ? p.u : p.v;
  const double* absorbed = rows ? p.f : p.g;
  const int64_t n = hi - lo;
  // An underflowed (or denormal) sum has lost its digits: such entries take the exact
  // log-domain update instead.
  constexpr bool single = sizeof(T) == 4;
  const double tiny = single ? 1e-30 : 1e-280;
  for (int64_t k = 0; k < n; ++k) z[k] = sums[lo + k] > tiny ? sums[lo + k] : 1.0;
  log_array<single ? 5 : 11>(z, z, n);
  for (int64_t k = 0; k < n; ++k) z[k] = s.lam * (absorbed[lo + k] - s.eps * z[k]);
  for (int64_t k = 0; k < n; ++k) {
    if (!(sums[lo + k] > tiny)) z[k] = s.lam * (rows ? row_transform(p, lo + k, s.eps) : col_transform(p, lo + k, s.eps));
  }
  if (mix) {
    mix->step(full.data() + lo, z);
  } else {
    for (int64_t k = 0; k < n; ++k) full[lo + k] = (1.0 - omega) * full[lo + k] + omega * z[k];
  }
  int out_of_range = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = lo + k;
    const double log_scale = (full[i] - absorbed[i]) / s.eps;
    out_of_range |= !(std::fabs(log_scale) <= kAbsorb);
    z[k] = std::min(log_scale, ExpConstants<double>::highest);  // past kAbsorb it is folded in before use
  }
  exp_array<double, single ? 7 : ExpConstants<double>::degree>(z, scale.data() + lo, n);
  return out_of_range != 0;
}

// block_j += sum_r K_rj w_r over n rows in their order, eight at a time: one load and store of
// the block serves eight rows (with four, the block's stores would bound the loop).
template <class T>
void add_rows(const T* k, int64_t M, const T* w, int64_t n, T* block) {
  int64_t r = 0;
  for (; r + 8 <= n; r += 8, k += 8 * M) {
    for (int64_t j = 0; j < M; ++j) {
      T b = block[j];
      for (int q = 0; q < 8; ++q) b += k[q * M + j] * w[r + q];
      block[j] = b;
    }
  }
  for (; r < n; ++r, k += M) {
    for (int64_t j = 0; j < M; ++j) block[j] += k[j] * w[r];
  }
}

// Rows a sweep handles between its L2 read and its L1 reread of K: as many as fill 16 KiB (half
// of L1), a multiple of 4 within a flush block. Fewer than 16 at 256 columns leave the four-row
// updates' log and exp chains waiting on their latency.
template <class T>
int64_t sweep_group(int64_t M) {
  return std::clamp<int64_t>(int64_t(16384 / (M * int64_t(sizeof(T)))) / 4 * 4, 4, kFlush / kLanes);
}

// One iteration in one pass over K: each group of four rows takes its dot products with b v
// (K from L2; skipped when `have_sums` brings them), its new F and u, and at once its share of
// the column sums with the new a u (the same rows, now in L1), so K leaves L2 once an iteration
// instead of twice; then G and v. Threads own ranges of rows and their own column partials,
// added in blocks of kFlush / kLanes rows, so the sums do not depend on the thread count.
// Symmetric problems update the rows only (g = f). Returns whether some scaling left the
// absorption range.
template <class T>
bool sweep(Problem<T>& p, const SinkhornSettings& s, Anderson& mix, bool have_sums, std::vector<double>& w,
           std::vector<double>& sums, bool parallel) {
  const int64_t N = p.N, M = p.M;
  const bool cols = !s.symmetric;
  if (!have_sums) {
    for (int64_t j = 0; j < M; ++j) w[j] = p.b[j] * p.v[j];
    p.wt.assign(w.begin(), w.begin() + M);
  }
  const int threads = parallel ? max_threads() : 1;
  p.partial.assign(size_t(threads) * M, 0.0);
  p.block.resize(size_t(threads) * M);
  const T* K = p.K.data();
  int out_of_range = 0;
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel num_threads(threads) if (parallel) reduction(| : out_of_range)
#endif
  {
#ifdef TRANSFEROPS_OPENMP
    const int t = parallel ? omp_get_thread_num() : 0;
#else
    const int t = 0;
#endif
    double* acc = p.partial.data() + size_t(t) * M;
    T* block = p.block.data() + size_t(t) * M;
    double z[kFlush / kLanes];
    T au[kFlush / kLanes];
    const int64_t group = sweep_group<T>(M);
    const int64_t lo = N * t / threads, hi = N * (t + 1) / threads;
    for (int64_t start = lo; start < hi; start += kFlush / kLanes) {
      const int64_t stop = std::min(hi, start + kFlush / kLanes);
      std::fill(block, block + M, T(0));
      for (int64_t i = start; i < stop; i += group) {
        const int64_t n = std::min(group, stop - i);
        if (!have_sums) row_products(p, p.wt.data(), i, i + n, sums.data());
        out_of_range |= update_scalings(p, s, true, s.symmetric ? 0.5 : 1.0, nullptr, sums.data(), z, i, i + n);
        if (!cols) continue;
        for (int64_t r = 0; r < n; ++r) au[r] = T(p.a[i + r] * p.u[i + r]);
        add_rows(K + i * M, M, au, n, block);
      }
      if (cols) {
        for (int64_t j = 0; j < M; ++j) acc[j] += double(block[j]);
      }
    }
  }
  if (!cols) {
    std::copy(p.F.begin(), p.F.end(), p.G.begin());
    std::copy(p.u.begin(), p.u.end(), p.v.begin());
    return out_of_range != 0;
  }
  for (int64_t j = 0; j < M; ++j) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += p.partial[size_t(t) * M + j];
    sums[j] = total;
  }
  return update_scalings(p, s, false, 1.0, &mix, sums.data(), w.data(), 0, M) || out_of_range != 0;
}

template <class T>
void absorb(Problem<T>& p, double eps, bool parallel) {
  std::copy(p.F.begin(), p.F.end(), p.f);
  std::copy(p.G.begin(), p.G.end(), p.g);
  build_kernel(p, eps, parallel);
}

// The L1 error of the rows from their kernel sums with b v.
template <class T>
double row_error(const Problem<T>& p, const SinkhornSettings& s, const std::vector<double>& sums) {
  double err = 0.0;
  for (int64_t i = 0; i < p.N; ++i) {
    const double target = s.rho > 0 ? p.a[i] * std::exp(-p.F[i] / s.rho) : p.a[i];
    err += std::fabs(p.a[i] * p.u[i] * sums[i] - target);
  }
  return err / p.mass;
}

// <C, P> and ot_eps of the final state, with P = diag(a u) K diag(b v) read from the stored
// kernel: ot_eps = <C, P> + eps sum_ij a_i b_j h(z_ij) (+ the marginals' KL terms), z_ij =
// (F_i + G_j - C_ij) / eps in double, e^z = u_i K_ij v_j (see entropy_term).
template <class T>
void values(Problem<T>& p, const SinkhornSettings& s, double* transport, double* value) {
  std::vector<double> r(p.N, 0.0), c(p.M, 0.0), z(p.M), ez(p.M), h(p.M);
  double cost = 0.0, entropy = 0.0;
  for (int64_t i = 0; i < p.N; ++i) {
    if (p.a[i] == 0.0) continue;
    const T* k = p.K.data() + i * p.M;
    const T* ci = p.C + i * p.ldc;
    for (int64_t j = 0; j < p.M; ++j) z[j] = (p.F[i] + p.G[j] - double(ci[j])) / s.eps;
    for (int64_t j = 0; j < p.M; ++j) ez[j] = p.u[i] * double(k[j]) * p.v[j];
    entropy_terms(z.data(), ez.data(), p.b, h.data(), p.M);
    double row_entropy;
    dots<1>(h.data(), 0, p.b, p.M, &row_entropy);
    double row = 0.0, row_cost = 0.0;
    for (int64_t j = 0; j < p.M; ++j) {
      const double pij = p.a[i] * p.b[j] * ez[j];
      row += pij;
      row_cost += pij * double(ci[j]);
      c[j] += pij;
    }
    r[i] = row;
    cost += row_cost;
    entropy += p.a[i] * row_entropy;
  }
  *transport = cost;
  *value = objective(s, cost, entropy, r, c, p.a, p.b);
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
  // eps-scaling: exact log-domain updates. Symmetric problems average F with its update, as in
  // the main loop: the plain update f = T(f) can settle into a 2-cycle, and a warm start from
  // one of its states left float32 kernels converging to a wrong plan.
  const double omega = s.symmetric ? 0.5 : 1.0;
  for (int64_t k = 0; k < s.schedule_len; ++k) {
    const double e = s.schedule[k];
    const double lam = s.rho > 0 ? s.rho / (s.rho + e) : 1.0;
    for (int64_t i = 0; i < p.N; ++i) p.F[i] = (1.0 - omega) * p.F[i] + omega * lam * row_transform(p, i, e);
    for (int64_t j = 0; j < p.M; ++j) p.G[j] = s.symmetric ? p.F[j] : lam * col_transform(p, j, e);
  }
  std::copy(p.F.begin(), p.F.end(), p.f);
  std::copy(p.G.begin(), p.G.end(), p.g);
  p.K.resize(size_t(p.N) * p.M);
  build_kernel(p, s.eps, parallel);
  std::vector<double> w(std::max(p.N, p.M)), sums(std::max(p.N, p.M));
  double err = std::numeric_limits<double>::infinity(), best = err;
  std::vector<double> best_F, best_G;  // the state of the smallest error checked (see keep_best)
  Anderson mix(s.symmetric ? 0 : int(s.memory), p.M, s.eps);
  // A check of the state after iteration `it` takes the row sums with b v, which are also the
  // next iteration's: that sweep reuses them.
  int64_t it = 0;
  while (true) {
    const bool check = it > 0 && (it % s.check_every == 0 || it == s.max_iter);
    if (check) {
      for (int64_t j = 0; j < p.M; ++j) w[j] = p.b[j] * p.v[j];
      p.wt.assign(w.begin(), w.begin() + p.M);
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
      for (int64_t q = 0; q < (p.N + 3) / 4; ++q) row_products(p, p.wt.data(), 4 * q, std::min(p.N, 4 * q + 4), sums.data());
      err = row_error(p, s, sums);
      keep_best(err, p.F, p.G, best, best_F, best_G);
      if (err <= s.tol || it == s.max_iter) break;
    }
    ++it;
    if (sweep(p, s, mix, check, w, sums, parallel)) absorb(p, s.eps, parallel);
  }
  if (err > best) {
    p.F.swap(best_F);
    p.G.swap(best_G);
    absorb(p, s.eps, parallel);
    err = best;
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
  // enough; below 2^22 entries the regions' wake-ups cost more than a second core gives.
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

void sinkhorn_matrix_impl(const View2D& C, int64_t N, const View2D& a, const View2D& b, const View2D& f,
                          const View2D& g, const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport,
                          double* value) {
  if (N < 1 || C.rows != a.rows * N || a.cols != N || b.cols != C.cols || b.rows != a.rows || f.rows != a.rows ||
      f.cols != N || g.rows != a.rows || g.cols != C.cols) {
    throw std::invalid_argument("sinkhorn: C [B * N, M], a and f [B, N], b and g [B, M] do not match");
  }
  if (a.dtype != DType::f64 || b.dtype != DType::f64 || f.dtype != DType::f64 || g.dtype != DType::f64) {
    throw std::invalid_argument("sinkhorn: weights and potentials must be float64");
  }
  check_settings(s);
  if (C.dtype == DType::f32) {
    sinkhorn_typed<float>(C, N, a, b, f, g, s, n_iter, error, transport, value);
  } else if (C.dtype == DType::f64) {
    sinkhorn_typed<double>(C, N, a, b, f, g, s, n_iter, error, transport, value);
  } else {
    throw std::invalid_argument("sinkhorn: C must be float32 or float64");
  }
}

}  // namespace TRANSFEROPS_ISA

#ifdef TRANSFEROPS_ISA_BASE
TRANSFEROPS_IF_AVX2(namespace avx2 {
void sinkhorn_matrix_impl(const View2D& C, int64_t N, const View2D& a, const View2D& b, const View2D& f,
                          const View2D& g, const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport,
                          double* value);
})

void sinkhorn_matrix(const View2D& C, int64_t N, const View2D& a, const View2D& b, const View2D& f, const View2D& g,
                     const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport, double* value) {
  TRANSFEROPS_RUN_UP_TO_AVX2(sinkhorn_matrix_impl(C, N, a, b, f, g, s, n_iter, error, transport, value));
}
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
