// Anderson acceleration of the Sinkhorn column update, shared by both solvers (cpu/ot.cpp,
// cpu/ot_points.cpp), and the settings they accept.
// Defined in each ISA build's namespace (see cpu/isa.h): each build gets its own copy.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cpu/isa.h"
#include "cpu/ot.h"
#include "cpu/ot_arith.h"

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {

// Anderson acceleration (type II; Walker & Ni 2011) of the map G -> T(G), one row and one
// column update: the next G is T(G) corrected along the last `memory` differences of iterates and
// of residuals r = T(G) - G, weighted to minimize the linearized residual. The slow modes of
// Sinkhorn on clustered clouds are few (mass moving between clusters), and a short history spans
// them, where plain or over-relaxed steps crawl along them.
// Guards, in units of eps (log-scaling units): steps are plain until the root mean square of
// T(G) - G is <= kLinear eps, the map's linear regime (the largest entry can stay far above it,
// held up by a few outlying points), and a correction that would move some G_j by more than
// kReach eps is shortened to that (a trust region: a secant step along a slow mode can ask for
// tens of eps at once and overshoot, throwing the kernel domain into rebuilds and underflowed
// rows). A residual 10x above the smallest since the last restart clears the history. The fixed
// point, hence the answer, is Sinkhorn's.
constexpr double kLinear = 0.2, kReach = 5.0;
class Anderson {
 public:
  Anderson(int memory, int64_t n, double eps)
      : m_(memory), n_(n), eps_(eps), dg_(size_t(memory) * n), dr_(size_t(memory) * n), g_(n), r_(n), work_(n),
        gram_(size_t(memory) * memory) {}

  // g: the current iterate, replaced by the next; tg = T(g).
  void step(double* g, const double* tg) {
    if (m_ == 0 || !extrapolate(g, tg)) std::copy(tg, tg + n_, g);
  }

  static constexpr int kMaxMemory = 16;

 private:
  double dot(const double* x, const double* y) const {
    double out;
    dots<1>(x, 0, y, n_, &out);
    return out;
  }

  // The accelerated step into g, or false where the step is plain.
  bool extrapolate(double* g, const double* tg) {
    for (int64_t j = 0; j < n_; ++j) work_[j] = tg[j] - g[j];
    const double norm = std::sqrt(dot(work_.data(), work_.data()));
    if (!(norm <= kLinear * eps_ * std::sqrt(double(n_)))) {
      restart();
      return false;
    }
    if (!(norm <= 10.0 * best_)) restart();
    best_ = std::min(best_, norm);
    if (have_last_) {
      double* dg = dg_.data() + size_t(head_) * n_;
      double* dr = dr_.data() + size_t(head_) * n_;
      for (int64_t j = 0; j < n_; ++j) dg[j] = g[j] - g_[j], dr[j] = work_[j] - r_[j];
      count_ = std::min(count_ + 1, m_);
      for (int k = 0; k < count_; ++k) {
        gram_[size_t(head_) * m_ + k] = gram_[size_t(k) * m_ + head_] = dot(dr, dr_.data() + size_t(k) * n_);
      }
      head_ = (head_ + 1) % m_;
    }
    std::copy(g, g + n_, g_.begin());
    r_.swap(work_);
    have_last_ = true;
    std::array<double, kMaxMemory> gamma{};
    if (count_ == 0 || !weights(gamma)) return false;
    std::fill(work_.begin(), work_.end(), 0.0);  // the correction to T(g)
    for (int k = 0; k < count_; ++k) {
      const double* dg = dg_.data() + size_t(k) * n_;
      const double* dr = dr_.data() + size_t(k) * n_;
      for (int64_t j = 0; j < n_; ++j) work_[j] -= gamma[k] * (dg[j] + dr[j]);
    }
    double reach = 0.0;
    for (int64_t j = 0; j < n_; ++j) reach = std::max(reach, std::fabs(work_[j]));
    if (!std::isfinite(reach)) {
      restart();
      return false;
    }
    const double shrink = reach <= kReach * eps_ ? 1.0 : kReach * eps_ / reach;
    for (int64_t j = 0; j < n_; ++j) g[j] = tg[j] + shrink * work_[j];
    return true;
  }

  void restart() {
    count_ = head_ = 0;
    have_last_ = false;
    best_ = std::numeric_limits<double>::infinity();
  }

  // gamma = argmin |r - dR gamma| by the normal equations (count_ <= 16 unknowns), with a ridge
  // of 1e-10 of the largest diagonal entry; false where they are singular or not finite.
  bool weights(std::array<double, kMaxMemory>& gamma) const {
    const int c = count_;
    double A[kMaxMemory][kMaxMemory + 1];
    double ridge = 0.0;
    for (int k = 0; k < c; ++k) ridge = std::max(ridge, gram_[size_t(k) * m_ + k]);
    ridge *= 1e-10;
    for (int k = 0; k < c; ++k) {
      for (int l = 0; l < c; ++l) A[k][l] = gram_[size_t(k) * m_ + l] + (k == l ? ridge : 0.0);
      A[k][c] = dot(dr_.data() + size_t(k) * n_, r_.data());
    }
    for (int col = 0; col < c; ++col) {  // Gaussian elimination with partial pivoting
      int pivot = col;
      for (int k = col + 1; k < c; ++k) pivot = std::fabs(A[k][col]) > std::fabs(A[pivot][col]) ? k : pivot;
      if (!(std::fabs(A[pivot][col]) > 0.0)) return false;
      for (int l = 0; l <= c; ++l) std::swap(A[col][l], A[pivot][l]);
      for (int k = col + 1; k < c; ++k) {
        const double q = A[k][col] / A[col][col];
        for (int l = col; l <= c; ++l) A[k][l] -= q * A[col][l];
      }
    }
    for (int k = c - 1; k >= 0; --k) {
      double v = A[k][c];
      for (int l = k + 1; l < c; ++l) v -= A[k][l] * gamma[l];
      gamma[k] = v / A[k][k];
      if (!std::isfinite(gamma[k])) return false;
    }
    return true;
  }

  int m_;
  int64_t n_;
  double eps_;
  std::vector<double> dg_, dr_, g_, r_, work_, gram_;  // work_: a residual, then a correction
  int count_ = 0, head_ = 0;
  bool have_last_ = false;
  double best_ = std::numeric_limits<double>::infinity();
};

inline void check_settings(const SinkhornSettings& s) {
  const auto positive = [](double v) { return v > 0 && std::isfinite(v); };
  bool ok = positive(s.eps) && positive(s.tol) && s.lam >= 0 && s.lam <= 1 && (s.rho <= 0 || positive(s.rho)) &&
            s.max_iter >= 1 && s.check_every >= 1 && s.memory >= 0 && s.memory <= Anderson::kMaxMemory &&
            s.schedule_len >= 0;
  for (int64_t k = 0; ok && k < s.schedule_len; ++k) ok = positive(s.schedule[k]);
  if (!ok) {
    throw std::invalid_argument("sinkhorn: expected finite eps, tol, rho and schedule values > 0, 0 <= lam <= 1, "
                                "max_iter >= 1, check_every >= 1, 0 <= memory <= 16");
  }
}

}  // namespace TRANSFEROPS_ISA
}  // namespace transferops::cpu
