// CPU kernels of the Sinkhorn hot path. Plain C++17: no Python headers, testable alone.
#pragma once
#include <cstdint>
#include <functional>

#include "common/blas.h"
#include "common/view.h"

namespace transferops::cpu {

// Entropic OT on given cost matrices, one problem per block of rows: C is [B * N, M] (float32
// or float64), a [B, N] and b [B, M] the weights (zero for padding), f [B, N] and g [B, M] the
// potentials (read as the start, written back), P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).
//
// Iterations run in the kernel domain, P = diag(u) K diag(v) with K_ij = exp((f_i + g_j -
// C_ij)/eps) stored in C's dtype; a scaling whose log leaves [-kAbsorb, kAbsorb] is absorbed
// into the potentials and K rebuilt, so nothing overflows; a row or column whose kernel sum
// underflows takes the exact log-domain update instead. Each update is the log-domain one,
//   F_i = lam (f_i - eps log sum_j K_ij b_j v_j),   G_j likewise,
// and each G is Anderson-accelerated with the last `memory` (<= 16) iterates (0: plain Sinkhorn).
// `symmetric` (x = y, a = b): g = f and F <- (F + F_update) / 2. Every `check_every` iterations
// (and at the last) the L1 error of the rows, sum_i |(P 1)_i - a_i exp(-f_i / rho)| / sum a (rho <= 0:
// balanced, the exponential is 1), stops a problem at <= tol. `schedule` eps values first take
// one exact log-domain update each (eps-scaling). Per problem: the iterations run, the last
// error, <C, P> and ot_eps = <C, P> + eps KL(P | a x b) (+ rho KL(P 1 | a) + rho KL(P^T 1 | b)).
struct SinkhornSettings {
  double eps, lam, rho, tol;
  int64_t memory, max_iter, check_every;
  bool symmetric;
  const double* schedule;
  int64_t schedule_len;
};

void sinkhorn_matrix(const View2D& C, int64_t N, const View2D& a, const View2D& b, const View2D& f, const View2D& g,
                     const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport, double* value);

// The same problems and iterations for point clouds without any N x M matrix: x [B * N, d] and
// y [B * M, d] (float32 or float64), C_ij = scale |x_i - y_j|^2 recomputed at every update in
// tiles (x.y by GEMM, then exp and the row sums), so memory is O((N + M) d). Updates are
// log-domain (no kernel to store), with the same acceleration, error and values as
// sinkhorn_matrix, but the error is checked at every iteration (it comes with the row update's
// pass). `progress(problem, iteration, error)` runs on the calling thread after each check. The
// caller keeps BLAS single-threaded: OpenMP threads share each update's rows. `labels` (one
// problem; OTDD's label-augmented cost) adds table[class of x_i, class of y_j] to C_ij.
struct LabelCost {
  const double* table = nullptr;  // [x_classes, y_classes], row-major; null: no labels
  // Each cloud sorted by class: class k of x holds points [x_starts[k], x_starts[k + 1]).
  const int64_t* x_starts = nullptr;
  int64_t x_classes = 0;
  const int64_t* y_starts = nullptr;
  int64_t y_classes = 0;
};
void sinkhorn_points(const View2D& x, const View2D& y, int64_t N, double scale, const Gemm& gemm, const View2D& a,
                     const View2D& b, const View2D& f, const View2D& g, const SinkhornSettings& s,
                     const LabelCost& labels, int64_t* n_iter, double* error, double* transport, double* value,
                     const std::function<void(int64_t, int64_t, double)>& progress);
// One pass of that solver over the points x_i [n, d] against y_j [m, d], for drivers that combine
// passes across processes (labels optional; BLAS kept single-threaded by the caller, as above).
// With y's log-weights w_j and potential g_j only, a half-step: out[i] = log sum_j exp(w_j + (g_j
// - C_ij) / eps) (out [1, n], float64). With x's log-weights and potential f_i too, the values of
// the pair (out [2, n]): out[0][i] = sum_j P_ij C_ij and out[1][i] = a_i sum_j b_j h(z_ij) (see
// entropy_term), z_ij = (f_i + g_j - C_ij) / eps, P_ij = a_i b_j e^z_ij, whose sums over i are
// <C, P> and KL(P | a x b).
struct PointPass {
  double eps;
  const double *y_log_weights, *y_pot;  // [m]
  const double *x_log_weights = nullptr, *x_pot = nullptr;  // [n]: the values pass
};
void sinkhorn_pass(const View2D& x, const View2D& y, double scale, const Gemm& gemm, const PointPass& pass,
                   const View2D& out, const LabelCost& labels);

}  // namespace transferops::cpu
