// CPU kernels of the transferability hot path. Plain C++17: no Python headers, testable alone.
#pragma once
#include <cstdint>
#include <vector>

#include "common/view.h"

namespace transferops::cpu {

// One model's LogME problem after its Gram matrix H (n x n) was reduced to tridiagonal form
// T = Q^T H Q (LAPACK sytrd) and T's eigenvalues were found (sterf), without eigenvectors.
// The fixed point of every target needs only sums over the eigenvalues and solves with
// T + t I (O(n) each), so no eigenvector matrix is ever formed:
//   gram_of_features (H = F^T F, n = D, c = Q^T F^T y): z = (T + tI)^-1 c,
//     |m|^2 = |z|^2 and |y - F m|^2 = |y|^2 - c.z - t |m|^2 (m = Q z);
//   otherwise (H = F F^T, n = N, c = Q^T y): |m|^2 = z^T T z and |y - F m|^2 = t^2 |z|^2
//     (m = F^T Q z).
struct LogmeSpectrum {
  const double* diag;   // [n] diagonal of T
  const double* off;    // [n - 1] off-diagonal of T
  const double* sigma;  // [n] eigenvalues of T, ascending
  int64_t n;
  int64_t first;             // eigenvalues [first, n) enter gamma and the log-determinant
  int64_t extra_log_alpha;   // log(alpha) terms added to the log-determinant (zero eigenvalues)
  int64_t samples, dim;      // N and D of the features
  bool gram_of_features;
};

struct FixedPointRule {
  int max_iter;   // updates of (alpha, beta) at most
  double tol;     // stop once alpha/beta moved by <= tol relative
  double damp;    // added to the update denominators
};

// Targets are the rows of `projected` ([K, n] float64: c of each target); `y2` [K] their
// squared norms. Writes per target the evidence / N, alpha, beta and t = alpha/beta at the
// start of the last update, and, if `z` is given ([K, n] float64), the solve at that t.
void logme_fixed_point(const LogmeSpectrum& s, const FixedPointRule& rule, const View2D& projected,
                       const double* y2, double* evidence, double* alpha, double* beta, double* t_used,
                       const View2D* z);

// LAPACK entry points, taken at run time from scipy.linalg.cython_lapack (the module links no
// LAPACK of its own): LP64 Fortran conventions, column-major, everything by pointer.
struct Lapack {
  void (*sytrd)(char* uplo, int* n, double* a, int* lda, double* d, double* e, double* tau, double* work,
                int* lwork, int* info);
  void (*sterf)(int* n, double* d, double* e, int* info);
  void (*ormqr)(char* side, char* trans, int* m, int* n, int* k, double* a, int* lda, double* tau, double* c,
                int* ldc, double* work, int* lwork, int* info);
};

// One Gram matrix H (n x n, column-major, lower triangle) to reduce in place: on return `gram`
// holds the reflectors, diag/off/tau the tridiagonal form, sigma its eigenvalues (ascending), and
// the K columns of `projected` (n x K, column-major) are multiplied by Q^T.
struct Tridiagonal {
  double* gram;
  int64_t n;
  double* projected;
  int64_t K;
  double* diag;   // [n]
  double* off;    // [n - 1]
  double* tau;    // [n - 1]
  double* sigma;  // [n]
};

// Reduces every problem; with `across_models` the problems run on OpenMP threads (LAPACK itself
// should then be single-threaded: the caller limits BLAS threads). Throws std::runtime_error
// naming the routine if LAPACK reports an error.
void tridiagonalize(const Lapack& lapack, const std::vector<Tridiagonal>& problems, bool across_models);

// X (n x K, column-major) <- Q X (transpose false) or Q^T X, Q from a reduced problem.
void apply_q(const Lapack& lapack, const Tridiagonal& problem, double* X, int64_t K, bool transpose);

}  // namespace transferops::cpu
