// Sinkhorn on point clouds without any N x M matrix (cpu::sinkhorn_points): the online solver,
// costs recomputed in tiles at every update.
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

// ---- point clouds, costs recomputed in tiles ----------------------------------------------------

double lane_max(const double* z, int64_t n) {
  double m[kLanes];
  std::fill(m, m + kLanes, neg_inf());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) m[l] = z[j + l] > m[l] ? z[j + l] : m[l];
  }
  double out = neg_inf();
  for (; j < n; ++j) out = std::max(out, z[j]);
  for (int l = 0; l < kLanes; ++l) out = std::max(out, m[l]);
  return out;
}

template <class T>
double lane_sum(const T* z, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += z[j + l];
  }
  double out = 0.0;
  for (; j < n; ++j) out += double(z[j]);
  for (int l = 0; l < kLanes; ++l) out += double(acc[l]);
  return out;
}

// Points sorted by class (class k: [starts[k], starts[k + 1])); without labels, one class. label
// [k * other's classes + l]: the cost added between this cloud's class k and the other's class l.
template <class T>
struct Cloud {
  const T* pts;
  int64_t n, ld;
  std::vector<double> norms;  // scale * |p|^2
  std::vector<int64_t> starts;
  std::vector<double> label;

  int64_t classes() const { return int64_t(starts.size()) - 1; }
  int64_t class_of(int64_t i) const { return std::upper_bound(starts.begin(), starts.end(), i) - starts.begin() - 1; }
};

// Calls run(lo, hi, cost) for the runs [lo, hi) of Q's classes within columns [j0, j0 + nj) (as
// offsets from j0), with the label cost between P's point i and that class.
template <class T, class Run>
void label_runs(const Cloud<T>& P, const Cloud<T>& Q, int64_t i, int64_t j0, int64_t nj, Run&& run) {
  const double* w = P.label.data() + P.class_of(i) * Q.classes();
  for (int64_t c = Q.class_of(j0); c < Q.classes() && Q.starts[c] < j0 + nj; ++c) {
    const int64_t lo = std::max(Q.starts[c], j0), hi = std::min(Q.starts[c + 1], j0 + nj);
    if (lo < hi) run(lo - j0, hi - j0, w[c]);
  }
}

template <class T>
Cloud<T> cloud(const T* pts, int64_t n, int64_t ld, int64_t d, double scale) {
  Cloud<T> c{pts, n, ld, std::vector<double>(n), {0, n}, {0.0}};
  for (int64_t i = 0; i < n; ++i) {
    double acc = 0.0;
    for (int64_t k = 0; k < d; ++k) acc += double(pts[i * ld + k]) * double(pts[i * ld + k]);
    c.norms[i] = scale * acc;
  }
  return c;
}

constexpr int64_t kRowBlock = 64, kColBlock = 1024;

// tile [np x nq] (row-major) = P . Q^T, for rows of P and Q with leading dimensions ldp, ldq.
template <class T>
void gemm_tile(const Gemm& g, const T* q, int64_t ldq, int64_t nq, const T* p, int64_t ldp, int64_t np, int64_t d,
               T* tile) {
  gemm_rm<T>(g, false, true, np, nq, d, T(1), p, ldp, q, ldq, T(0), tile, nq);
}

// Calls visit(block, i0, ni, j0, nj, tile, thread) for every tile of C between P's rows and
// Q's rows, tile[r * nj + j] = scale-free dot products P_{i0+r} . Q_{j0+j}; row blocks are
// shared among the OpenMP threads (each owns its rows' results).
template <class T, class Visit>
void for_each_tile(const Gemm& g, const Cloud<T>& P, const Cloud<T>& Q, int64_t d, bool parallel, Visit&& visit) {
  const int64_t blocks = (P.n + kRowBlock - 1) / kRowBlock;
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel if (parallel)
#endif
  {
#ifdef TRANSFEROPS_OPENMP
    const int thread = omp_get_thread_num();
#else
    const int thread = 0;
#endif
    std::vector<T> tile(size_t(kRowBlock) * kColBlock);
#ifdef TRANSFEROPS_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * kRowBlock, ni = std::min(kRowBlock, P.n - i0);
      for (int64_t j0 = 0; j0 < Q.n; j0 += kColBlock) {
        const int64_t nj = std::min(kColBlock, Q.n - j0);
        gemm_tile(g, Q.pts + j0 * Q.ld, Q.ld, nj, P.pts + i0 * P.ld, P.ld, ni, d, tile.data());
        visit(blk, i0, ni, j0, nj, tile.data(), thread);
      }
    }
  }
}

// out_i = log sum_j exp(lw_j + (pot_j - C_ij) / eps) for every point i of P against Q, with
// C_ij = |p_i|^2 + |q_j|^2 - 2 scale p_i.q_j (norms pre-scaled), by a running max.
template <class T>
void lse_pass(const Gemm& g, const Cloud<T>& P, const Cloud<T>& Q, int64_t d, double scale, const std::vector<double>& lw,
              const std::vector<double>& pot, double eps, std::vector<double>& out, bool parallel) {
  std::vector<double> h(Q.n);
  for (int64_t j = 0; j < Q.n; ++j) h[j] = lw[j] + (pot[j] - Q.norms[j]) / eps;
  const double alpha = 2.0 * scale / eps;
  std::vector<double> mx(P.n, neg_inf()), sum(P.n, 0.0);
  const int threads = parallel ? max_threads() : 1;
  // z in double (potentials / eps reach 1e4: float would lose the digits exp needs); the
  // exponentials of z - max, all <= 1, in the work's precision.
  std::vector<std::vector<double>> z(threads, std::vector<double>(kColBlock));
  std::vector<std::vector<T>> zs(threads, std::vector<T>(kColBlock)), e(threads, std::vector<T>(kColBlock));
  for_each_tile(g, P, Q, d, parallel, [&](int64_t, int64_t i0, int64_t ni, int64_t j0, int64_t nj, const T* tile,
                                          int thread) {
    double* zt = z[thread].data();
    T* zst = zs[thread].data();
    T* et = e[thread].data();
    for (int64_t r = 0; r < ni; ++r) {
      const int64_t i = i0 + r;
      const T* t = tile + r * nj;
      label_runs(P, Q, i, j0, nj, [&](int64_t lo, int64_t hi, double label) {
        const double beta = (P.norms[i] + label) / eps;
        for (int64_t j = lo; j < hi; ++j) zt[j] = h[j0 + j] + alpha * double(t[j]) - beta;
      });
      const double m = lane_max(zt, nj);
      if (m == neg_inf()) continue;
      if (m > mx[i]) {
        sum[i] *= std::exp(mx[i] - m);
        mx[i] = m;
      }
      for (int64_t j = 0; j < nj; ++j) zst[j] = T(zt[j] - mx[i]);
      exp_array(zst, et, nj);
      sum[i] += lane_sum(et, nj);
    }
  });
  for (int64_t i = 0; i < P.n; ++i) out[i] = mx[i] == neg_inf() ? neg_inf() : mx[i] + std::log(sum[i]);
}

// The values of the potentials F (P's points) and G (Q's), per point i of P: rows[i] = sum_j P_ij,
// cost[i] = sum_j P_ij C_ij and entropy[i] = a_i sum_j b_j h(z_ij) (see entropy_term), z_ij = (F_i
// + G_j - C_ij) / eps and P_ij = a_i b_j e^z_ij, in one pass over the tiles. Each row is one
// thread's, so the sums do not depend on how the tiles were shared (column sums accumulated per
// thread would: ot_eps would vary in its last bits from run to run).
template <class T>
void values_pass(const Gemm& gm, const Cloud<T>& P, const Cloud<T>& Q, int64_t d, double scale, const double* a,
                 const double* b, const double* F, const double* G, double eps, double* rows, double* cost,
                 double* entropy) {
  std::fill(rows, rows + P.n, 0.0);
  std::fill(cost, cost + P.n, 0.0);
  std::fill(entropy, entropy + P.n, 0.0);
  const int threads = max_threads();
  std::vector<std::vector<double>> z(threads, std::vector<double>(kColBlock)), e(threads, std::vector<double>(kColBlock)),
      cij(threads, std::vector<double>(kColBlock)), hs(threads, std::vector<double>(kColBlock));
  for_each_tile(gm, P, Q, d, true, [&](int64_t, int64_t i0, int64_t ni, int64_t j0, int64_t nj, const T* tile,
                                       int thread) {
    double *zt = z[thread].data(), *et = e[thread].data(), *ct = cij[thread].data(), *ht = hs[thread].data();
    for (int64_t rr = 0; rr < ni; ++rr) {
      const int64_t i = i0 + rr;
      if (a[i] == 0.0) continue;
      const T* t = tile + rr * nj;
      label_runs(P, Q, i, j0, nj, [&](int64_t lo, int64_t hi, double label) {
        for (int64_t j = lo; j < hi; ++j) {
          ct[j] = std::max(0.0, P.norms[i] + Q.norms[j0 + j] - 2.0 * scale * double(t[j])) + label;
          zt[j] = std::min((F[i] + G[j0 + j] - ct[j]) / eps, ExpConstants<double>::highest);
        }
      });
      exp_array(zt, et, nj);
      entropy_terms(zt, et, b + j0, ht, nj);
      double row = 0.0, row_cost = 0.0, row_entropy;
      dots<1>(ht, 0, b + j0, nj, &row_entropy);
      for (int64_t j = 0; j < nj; ++j) {
        const double pij = a[i] * b[j0 + j] * et[j];
        row += pij;
        row_cost += pij * ct[j];
      }
      rows[i] += row;
      cost[i] += row_cost;
      entropy[i] += a[i] * row_entropy;
    }
  });
}

template <class T>
struct PointProblem {
  Cloud<T> X, Y;
  int64_t d;
  double scale;
  const double *a, *b;
  double *f, *g;
};

template <class T>
void solve_points(const Gemm& gm, PointProblem<T>& p, const SinkhornSettings& s, int64_t problem, int64_t* n_iter,
                  double* error, double* transport, double* value,
                  const std::function<void(int64_t, int64_t, double)>& progress) {
  const int64_t N = p.X.n, M = p.Y.n;
  std::vector<double> la(N), lb(M), F(p.f, p.f + N), G(p.g, p.g + M), L(N), Lc(M), TG(M);
  double mass = 0.0;
  for (int64_t i = 0; i < N; ++i) la[i] = p.a[i] > 0 ? std::log(p.a[i]) : neg_inf(), mass += p.a[i];
  for (int64_t j = 0; j < M; ++j) lb[j] = p.b[j] > 0 ? std::log(p.b[j]) : neg_inf();
  const bool parallel = true;
  // F from the log-sums L of the row pass, averaged with the old by weight omega.
  auto take_rows = [&](double e, double lam, double omega) {
    for (int64_t i = 0; i < N; ++i) F[i] = (1.0 - omega) * F[i] + omega * lam * (-e * L[i]);
  };
  // G from F: T(G) when F came from G; mix (if any) takes its Anderson step to the next G.
  auto update_cols = [&](double e, double lam, Anderson* mix) {
    if (s.symmetric) {
      G = F;
      return;
    }
    lse_pass(gm, p.Y, p.X, p.d, p.scale, la, F, e, Lc, parallel);
    for (int64_t j = 0; j < M; ++j) TG[j] = lam * (-e * Lc[j]);
    if (mix) {
      mix->step(G.data(), TG.data());
    } else {
      G = TG;
    }
  };
  for (int64_t k = 0; k < s.schedule_len; ++k) {
    const double e = s.schedule[k];
    const double lam = s.rho > 0 ? s.rho / (s.rho + e) : 1.0;
    lse_pass(gm, p.X, p.Y, p.d, p.scale, lb, G, e, L, parallel);
    take_rows(e, lam, s.symmetric ? 0.5 : 1.0);  // averaged, as in the main loop (see ot.cpp's solve)
    update_cols(e, lam, nullptr);
  }
  // The row error of a state needs the row sums of the next update: it is taken from that pass.
  auto row_error = [&]() {
    double err = 0.0;
    for (int64_t i = 0; i < N; ++i) {
      const double target = s.rho > 0 ? p.a[i] * std::exp(-F[i] / s.rho) : p.a[i];
      err += std::fabs((p.a[i] > 0 ? std::exp(la[i] + F[i] / s.eps + L[i]) : 0.0) - target);
    }
    return err / mass;
  };
  Anderson mix(s.symmetric ? 0 : int(s.memory), M, s.eps);
  double err = std::numeric_limits<double>::infinity(), best = err;
  std::vector<double> best_F, best_G;
  int64_t it = 0;
  for (;;) {
    lse_pass(gm, p.X, p.Y, p.d, p.scale, lb, G, s.eps, L, parallel);
    if (it > 0) {  // every iteration: the error is O(N) next to the pass that gave L
      err = row_error();
      progress(problem, it, err);
      keep_best(err, F, G, best, best_F, best_G);
      if (err <= s.tol || it == s.max_iter) break;
    }
    ++it;
    take_rows(s.eps, s.lam, s.symmetric ? 0.5 : 1.0);
    update_cols(s.eps, s.lam, &mix);
  }
  if (err > best) {  // back to the best state; Lc (for the column marginals) follows its F
    F.swap(best_F);
    G.swap(best_G);
    if (!s.symmetric) lse_pass(gm, p.Y, p.X, p.d, p.scale, la, F, s.eps, Lc, parallel);
    err = best;
  }
  std::vector<double> r(N), cost_rows(N), entropy_rows(N);
  values_pass(gm, p.X, p.Y, p.d, p.scale, p.a, p.b, F.data(), G.data(), s.eps, r.data(), cost_rows.data(),
              entropy_rows.data());
  // The column marginals c_j = b_j e^(G_j / eps) sum_i a_i e^((F_i - C_ij) / eps) from the last
  // column pass, which saw the final F (Lc: its log-sums); symmetric problems have P = P^T.
  std::vector<double> cols(M);
  for (int64_t j = 0; j < M; ++j) {
    cols[j] = s.symmetric ? r[j] : lb[j] == neg_inf() ? 0.0 : std::exp(lb[j] + G[j] / s.eps + Lc[j]);
  }
  double cost = 0.0, entropy = 0.0;
  for (int64_t i = 0; i < N; ++i) cost += cost_rows[i], entropy += entropy_rows[i];
  std::copy(F.begin(), F.end(), p.f);
  std::copy(G.begin(), G.end(), p.g);
  *n_iter = it;
  *error = err;
  *transport = cost;
  *value = objective(s, cost, entropy, r, cols, p.a, p.b);
}

// The class runs and label costs of both clouds (no-op without labels).
template <class T>
void attach_labels(Cloud<T>& X, Cloud<T>& Y, const LabelCost& labels) {
  if (!labels.table) return;
  const int64_t kx = labels.x_classes, ky = labels.y_classes;
  X.starts.assign(labels.x_starts, labels.x_starts + kx + 1);
  Y.starts.assign(labels.y_starts, labels.y_starts + ky + 1);
  X.label.assign(labels.table, labels.table + kx * ky);
  Y.label.resize(size_t(ky) * kx);
  for (int64_t c = 0; c < kx; ++c) {
    for (int64_t l = 0; l < ky; ++l) Y.label[l * kx + c] = labels.table[c * ky + l];
  }
}

template <class T>
void points_typed(const View2D& x, const View2D& y, int64_t N, double scale, const Gemm& gemm, const View2D& a,
                  const View2D& b, const View2D& f, const View2D& g, const SinkhornSettings& s, const LabelCost& labels,
                  int64_t* n_iter, double* error, double* transport, double* value,
                  const std::function<void(int64_t, int64_t, double)>& progress) {
  const int64_t B = a.rows, M = b.cols, d = x.cols;
  for (int64_t k = 0; k < B; ++k) {
    PointProblem<T> p{cloud(x.row<const T>(k * N), N, x.row_stride, d, scale),
                      cloud(y.row<const T>(k * M), M, y.row_stride, d, scale), d, scale, a.row<const double>(k),
                      b.row<const double>(k), f.row<double>(k), g.row<double>(k)};
    attach_labels(p.X, p.Y, labels);
    solve_points(gemm, p, s, k, n_iter + k, error + k, transport + k, value + k, progress);
  }
}

// Class runs of n sorted points: starts[0] = 0, non-decreasing, starts[classes] = n.
bool valid_starts(const int64_t* starts, int64_t classes, int64_t n) {
  if (classes < 1 || starts[0] != 0 || starts[classes] != n) return false;
  for (int64_t k = 0; k < classes; ++k) {
    if (starts[k + 1] < starts[k]) return false;
  }
  return true;
}

}  // namespace

void sinkhorn_points_impl(const View2D& x, const View2D& y, int64_t N, double scale, const Gemm& gemm,
                          const View2D& a, const View2D& b, const View2D& f, const View2D& g,
                          const SinkhornSettings& s, const LabelCost& labels, int64_t* n_iter, double* error,
                          double* transport, double* value,
                          const std::function<void(int64_t, int64_t, double)>& progress) {
  const int64_t B = a.rows, M = b.cols;
  if (labels.table && (B != 1 || !valid_starts(labels.x_starts, labels.x_classes, N) ||
                       !valid_starts(labels.y_starts, labels.y_classes, M))) {
    throw std::invalid_argument("sinkhorn: labels need one problem and class runs 0 = starts[0] <= ... <= starts[K] = n");
  }
  if (N < 1 || x.rows != B * N || a.cols != N || y.rows != B * M || y.cols != x.cols || x.dtype != y.dtype ||
      b.rows != B || f.rows != B || f.cols != N || g.rows != B || g.cols != M) {
    throw std::invalid_argument("sinkhorn: x [B * N, d], y [B * M, d], a and f [B, N], b and g [B, M] do not match");
  }
  check_settings(s);
  if (x.dtype == DType::f32) {
    points_typed<float>(x, y, N, scale, gemm, a, b, f, g, s, labels, n_iter, error, transport, value, progress);
  } else if (x.dtype == DType::f64) {
    points_typed<double>(x, y, N, scale, gemm, a, b, f, g, s, labels, n_iter, error, transport, value, progress);
  } else {
    throw std::invalid_argument("sinkhorn: points must be float32 or float64");
  }
}

namespace {

template <class T>
void pass_typed(const View2D& x, const View2D& y, double scale, const Gemm& gemm, const PointPass& pass,
                const View2D& out, const LabelCost& labels) {
  const int64_t n = x.rows, m = y.rows, d = x.cols;
  Cloud<T> P = cloud(x.row<const T>(0), n, x.row_stride, d, scale), Q = cloud(y.row<const T>(0), m, y.row_stride, d, scale);
  attach_labels(P, Q, labels);
  if (!pass.x_log_weights) {
    std::vector<double> res(n);
    lse_pass(gemm, P, Q, d, scale, std::vector<double>(pass.y_log_weights, pass.y_log_weights + m),
             std::vector<double>(pass.y_pot, pass.y_pot + m), pass.eps, res, true);
    std::copy(res.begin(), res.end(), out.row<double>(0));
    return;
  }
  std::vector<double> a(n), b(m), rows(n);
  for (int64_t i = 0; i < n; ++i) a[i] = std::exp(pass.x_log_weights[i]);
  for (int64_t j = 0; j < m; ++j) b[j] = std::exp(pass.y_log_weights[j]);
  values_pass(gemm, P, Q, d, scale, a.data(), b.data(), pass.x_pot, pass.y_pot, pass.eps, rows.data(), out.row<double>(0),
              out.row<double>(1));
}

}  // namespace

void sinkhorn_pass_impl(const View2D& x, const View2D& y, double scale, const Gemm& gemm, const PointPass& pass,
                        const View2D& out, const LabelCost& labels) {
  if (x.rows < 1 || y.rows < 1 || y.cols != x.cols || x.dtype != y.dtype) {
    throw std::invalid_argument("sinkhorn_pass: x [n, d] and y [m, d] of one dtype, n, m >= 1");
  }
  if (labels.table && (!valid_starts(labels.x_starts, labels.x_classes, x.rows) ||
                       !valid_starts(labels.y_starts, labels.y_classes, y.rows))) {
    throw std::invalid_argument("sinkhorn_pass: labels need class runs 0 = starts[0] <= ... <= starts[K] = n");
  }
  if (!(pass.eps > 0)) throw std::invalid_argument("sinkhorn_pass: eps must be positive");
  if ((pass.x_log_weights == nullptr) != (pass.x_pot == nullptr)) {
    throw std::invalid_argument("sinkhorn_pass: x's log-weights and potential go together (the values pass)");
  }
  if (out.dtype != DType::f64 || out.cols != x.rows || out.rows != (pass.x_pot ? 2 : 1)) {
    throw std::invalid_argument("sinkhorn_pass: out must be float64 [1, n] (a half-step) or [2, n] (the values)");
  }
  if (x.dtype == DType::f32) {
    pass_typed<float>(x, y, scale, gemm, pass, out, labels);
  } else if (x.dtype == DType::f64) {
    pass_typed<double>(x, y, scale, gemm, pass, out, labels);
  } else {
    throw std::invalid_argument("sinkhorn_pass: points must be float32 or float64");
  }
}

}  // namespace TRANSFEROPS_ISA

#ifdef TRANSFEROPS_ISA_BASE
TRANSFEROPS_IF_AVX2(namespace avx2 {
void sinkhorn_points_impl(const View2D& x, const View2D& y, int64_t N, double scale, const Gemm& gemm,
                          const View2D& a, const View2D& b, const View2D& f, const View2D& g,
                          const SinkhornSettings& s, const LabelCost& labels, int64_t* n_iter, double* error,
                          double* transport, double* value,
                          const std::function<void(int64_t, int64_t, double)>& progress);
})

void sinkhorn_points(const View2D& x, const View2D& y, int64_t N, double scale, const Gemm& gemm, const View2D& a,
                     const View2D& b, const View2D& f, const View2D& g, const SinkhornSettings& s,
                     const LabelCost& labels, int64_t* n_iter, double* error, double* transport, double* value,
                     const std::function<void(int64_t, int64_t, double)>& progress) {
  TRANSFEROPS_RUN_UP_TO_AVX2(
      sinkhorn_points_impl(x, y, N, scale, gemm, a, b, f, g, s, labels, n_iter, error, transport, value, progress));
}
TRANSFEROPS_IF_AVX2(namespace avx2 {
void sinkhorn_pass_impl(const View2D& x, const View2D& y, double scale, const Gemm& gemm, const PointPass& pass,
                        const View2D& out, const LabelCost& labels);
})

void sinkhorn_pass(const View2D& x, const View2D& y, double scale, const Gemm& gemm, const PointPass& pass,
                   const View2D& out, const LabelCost& labels) {
  TRANSFEROPS_RUN_UP_TO_AVX2(sinkhorn_pass_impl(x, y, scale, gemm, pass, out, labels));
}
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
