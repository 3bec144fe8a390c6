#include "cpu/transferability.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/parallel.h"

namespace transferops::cpu {

namespace {

// (T + t I) z = c by LDL^T without pivoting: T + tI is symmetric positive definite for t > 0.
void tridiagonal_solve(const LogmeSpectrum& s, double t, const double* c, double* pivot, double* z) {
  const int64_t n = s.n;
  pivot[0] = s.diag[0] + t;
  z[0] = c[0];
  for (int64_t i = 1; i < n; ++i) {
    const double l = s.off[i - 1] / pivot[i - 1];
    pivot[i] = s.diag[i] + t - l * s.off[i - 1];
    z[i] = c[i] - l * z[i - 1];
  }
  z[n - 1] /= pivot[n - 1];
  for (int64_t i = n - 2; i >= 0; --i) z[i] = (z[i] - s.off[i] * z[i + 1]) / pivot[i];
}

struct Terms {
  double m2, res2;
};

Terms norms(const LogmeSpectrum& s, double t, double y2, const double* c, const double* z) {
  double zz = 0.0;
  for (int64_t i = 0; i < s.n; ++i) zz += z[i] * z[i];
  if (s.gram_of_features) {
    double cz = 0.0;
    for (int64_t i = 0; i < s.n; ++i) cz += c[i] * z[i];
    return {zz, y2 - cz - t * zz};
  }
  double zTz = s.diag[s.n - 1] * z[s.n - 1] * z[s.n - 1];
  for (int64_t i = 0; i + 1 < s.n; ++i) zTz += z[i] * (s.diag[i] * z[i] + 2.0 * s.off[i] * z[i + 1]);
  return {zTz, t * t * zz};
}

}  // namespace

void logme_fixed_point(const LogmeSpectrum& s, const FixedPointRule& rule, const View2D& projected,
                       const double* y2, double* evidence, double* alpha, double* beta, double* t_used,
                       const View2D* z) {
  if (s.n < 1 || s.first < 0 || s.first > s.n) throw std::invalid_argument("logme: bad spectrum size");
  if (projected.cols != s.n) throw std::invalid_argument("projected: expected rows of n values");
  const int64_t K = projected.rows;
  const double N = double(s.samples), D = double(s.dim);
  const double* sigma = s.sigma + s.first;
  const int64_t kept = s.n - s.first;
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel if (K * s.n > kParallelMinElements)
#endif
  {
    std::vector<double> pivot(s.n), sol(s.n);
#ifdef TRANSFEROPS_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t k = 0; k < K; ++k) {
      const double* c = projected.row<const double>(k);
      double a = 1.0, b = 1.0, t = 1.0, m2 = 0.0, res2 = 0.0;
      for (int it = 0; it < rule.max_iter; ++it) {
        t = a / b;
        double gamma = 0.0;
        for (int64_t i = 0; i < kept; ++i) gamma += sigma[i] / (sigma[i] + t);
        tridiagonal_solve(s, t, c, pivot.data(), sol.data());
        const Terms terms = norms(s, t, y2[k], c, sol.data());
        m2 = terms.m2;
        res2 = terms.res2;
        a = gamma / (m2 + rule.damp);
        b = (N - gamma) / (res2 + rule.damp);
        if (std::fabs(a / b - t) / t <= rule.tol) break;
      }
      double logdet = double(s.extra_log_alpha) * std::log(a);
      for (int64_t i = 0; i < kept; ++i) logdet += std::log(a + b * sigma[i]);
      // The evidence at the new alpha, beta with the last update's |m|^2 and residual, as the
      // official code evaluates it.
      evidence[k] = (D / 2 * std::log(a) + N / 2 * std::log(b) - 0.5 * logdet - b / 2 * res2 - a / 2 * m2 -
                     N / 2 * std::log(2 * M_PI)) / N;
      alpha[k] = a;
      beta[k] = b;
      t_used[k] = t;
      if (z) {
        double* out = z->row<double>(k);
        for (int64_t i = 0; i < s.n; ++i) out[i] = sol[i];
      }
    }
  }
}

namespace {

int lapack_int(int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max()) {
    throw std::invalid_argument(std::string(what) + ": too large for LAPACK's 32-bit sizes");
  }
  return static_cast<int>(v);
}

void check_info(int info, const char* routine) {
  if (info != 0) throw std::runtime_error(std::string("LAPACK ") + routine + " failed (info=" + std::to_string(info) + ")");
}

}  // namespace

void apply_q(const Lapack& lapack, const Tridiagonal& p, double* X, int64_t K, bool transpose) {
  // Lower sytrd storage: Q = H(1)...H(n-1) acts on rows 1.. as the Q of a QR factorization whose
  // reflectors are the columns 0..n-2 below the diagonal, i.e. the block at (1, 0).
  if (p.n < 2 || K == 0) return;
  char side = 'L', trans = transpose ? 'T' : 'N';
  int m = lapack_int(p.n - 1, "n"), cols = lapack_int(K, "K"), k = m, ld = lapack_int(p.n, "n"), lwork = -1, info = 0;
  double query = 0.0;
  lapack.ormqr(&side, &trans, &m, &cols, &k, p.gram + 1, &ld, p.tau, X + 1, &ld, &query, &lwork, &info);
  check_info(info, "ormqr");
  lwork = std::max(1, static_cast<int>(query));
  std::vector<double> work(lwork);
  lapack.ormqr(&side, &trans, &m, &cols, &k, p.gram + 1, &ld, p.tau, X + 1, &ld, work.data(), &lwork, &info);
  check_info(info, "ormqr");
}

namespace {

void reduce_one(const Lapack& lapack, const Tridiagonal& p) {
  char uplo = 'L';
  int n = lapack_int(p.n, "n"), lwork = -1, info = 0;
  double query = 0.0;
  lapack.sytrd(&uplo, &n, p.gram, &n, p.diag, p.off, p.tau, &query, &lwork, &info);
  check_info(info, "sytrd");
  lwork = std::max(1, static_cast<int>(query));
  std::vector<double> work(lwork);
  lapack.sytrd(&uplo, &n, p.gram, &n, p.diag, p.off, p.tau, work.data(), &lwork, &info);
  check_info(info, "sytrd");
  std::copy(p.diag, p.diag + p.n, p.sigma);  // sterf overwrites its inputs: T is still needed
  std::vector<double> off(p.off, p.off + std::max<int64_t>(p.n - 1, 0));
  lapack.sterf(&n, p.sigma, off.data(), &info);
  check_info(info, "sterf");
  apply_q(lapack, p, p.projected, p.K, true);
}

}  // namespace

void tridiagonalize(const Lapack& lapack, const std::vector<Tridiagonal>& problems, bool across_models) {
  const int64_t M = static_cast<int64_t>(problems.size());
  (void)across_models;  // read only by the OpenMP pragma
  std::string error;
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (across_models && M > 1)
#endif
  for (int64_t i = 0; i < M; ++i) {
    try {
      reduce_one(lapack, problems[i]);
    } catch (const std::exception& e) {  // an exception must not leave an OpenMP region
#ifdef TRANSFEROPS_OPENMP
#pragma omp critical
#endif
      error = e.what();
    }
  }
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace transferops::cpu
