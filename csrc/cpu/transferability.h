// CPU kernels of the transferability hot path. Plain C++17: no Python headers, testable alone.
#pragma once
#include <cstdint>

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

}  // namespace transferops::cpu
