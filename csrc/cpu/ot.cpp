#include "cpu/ot.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/parallel.h"
#include "cpu/isa.h"
#include "cpu/vec.h"

// Compiled twice on x86-64 (see cpu/isa.h). Sums run in fixed lanes and -ffp-contract=off
// holds, so both builds give the same bits.

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {

namespace {

// A scaling whose log leaves [-kAbsorb, kAbsorb] is folded into the potentials (K rebuilt):
// e^50 is far from both ends of float32 and float64.
constexpr double kAbsorb = 50.0;

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

// Series coefficients at compile time: computed per call, the divisions' chain cost as much as
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

inline double neg_inf() { return -std::numeric_limits<double>::infinity(); }

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

// Products and short partial sums run in the kernel's type T (8 float lanes vectorize twice as
// wide as double ones); every kFlush terms the lanes are added into double totals, which bounds
// a float32 partial sum's rounding to kFlush / 8 terms. Sums are in a fixed order: results do
// not depend on the thread count, and the compiler vectorizes without reassociating.
constexpr int kLanes = 8;
constexpr int64_t kFlush = 512;

// Accumulators are vectors of cpu/vec.h, kLanes / their width of them per row; each lane adds the
// same terms in the same order in both builds. (One 64-byte vector of doubles, wider than any
// register, went through memory: 4x slower.)

// out[r] = sum_j K_rj w_j for R rows (leading dimension ld) sharing the loads of w. Vector types
// keep the accumulators in registers (as plain arrays GCC spilled them and assembled w from
// scalar loads: 4.6 us for a 256 x 256 float product, 2.5 us now).
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

// s_i = sum_j K_ij w_j for rows [lo, hi) of K, four at a time (one load of w serves four rows).
template <class T>
void row_products(const Problem<T>& p, const T* w, int64_t lo, int64_t hi, double* s) {
  const T* K = p.K.data();
  const int64_t M = p.M;
  int64_t i = lo;
  for (; i + 4 <= hi; i += 4) dots<4>(K + i * M, M, w, M, s + i);
  for (; i < hi; ++i) dots<1>(K + i * M, M, w, M, s + i);
}

// Anderson acceleration (type II; Walker & Ni 2011) of the map G -> T(G), one row and one
// column update: the next G is T(G) corrected along the last `memory` differences of iterates and
// of residuals r = T(G) - G, weighted to minimize the linearized residual. The slow modes of
// Sinkhorn on clustered clouds are few (mass moving between clusters), and a short history spans
// them. Measured, in iterations to a 1e-4 error (clustered d=64 clouds, eps 0.05, costs of mean 1;
// plain, tuned over-relaxation (what this replaced), memory 8): 64 problems of 256 points 21080,
// 7230, 3200; one of 8000 points 1020, 250, 80; of 20000 points (online) over-relaxation made no
// progress past a 1e-2 error in 100 iterations, memory 8 converged in 80.
// Guards, in units of eps (log-scaling units): steps are plain until the root mean square of
// T(G) - G is <= kLinear eps, the map's linear regime (the largest entry was held up for 160
// iterations by a few outlying points at N = 20000), and a correction that would move some G_j
// by more than kReach eps is shortened to that (a trust region: the secant step along the slow
// mode at N = 20000 asked for 67 eps at once and overshot; unguarded steps also threw the kernel
// domain into rebuilds and underflowed rows, 2.5x slower iterations). A residual 10x above the
// smallest since the last restart clears the history. The fixed point, hence the answer, is
// Sinkhorn's.
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

// F (rows) or G (columns) over [lo, hi) from their kernel sums, then the scalings from them;
// the new values are averaged with the old by weight omega, or, where mix is given, are its
// Anderson step (columns, all of them at once). z is scratch of hi - lo. Returns whether some
// scaling left the absorption range. The logs and exponentials go through the array versions
// above (at 256 x 256, scalar libm calls took as long as the kernel product); with a float32
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
// the block serves eight rows (with four, the block's stores bounded the loop).
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
// of L1), a multiple of 4 within a flush block. Fewer than 16 at 256 columns left the four-row
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

// sum_i p_i log(p_i / q_i) - sum p + sum q.
double generalized_kl(const std::vector<double>& p, const double* q, int64_t n) {
  double kl = 0.0;
  for (int64_t i = 0; i < n; ++i) kl += (p[i] > 0 ? p[i] * std::log(p[i] / q[i]) : 0.0) - p[i] + q[i];
  return kl;
}

// ot_eps from the potentials F, G and the marginals r, c of P (see values()).
double objective(const SinkhornSettings& s, const std::vector<double>& F, const std::vector<double>& G,
                 const std::vector<double>& r, const std::vector<double>& c, const double* a, const double* b) {
  const int64_t N = int64_t(F.size()), M = int64_t(G.size());
  double dual = 0.0, mass_p = 0.0, mass_a = 0.0, mass_b = 0.0;
  for (int64_t i = 0; i < N; ++i) dual += F[i] * r[i], mass_p += r[i], mass_a += a[i];
  for (int64_t j = 0; j < M; ++j) dual += G[j] * c[j], mass_b += b[j];
  double value = dual - s.eps * (mass_p - mass_a * mass_b);
  if (s.rho > 0) value += s.rho * (generalized_kl(r, a, N) + generalized_kl(c, b, M));
  return value;
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
  *transport = cost;
  *value = objective(s, p.F, p.G, r, c, p.a, p.b);
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
  double err = std::numeric_limits<double>::infinity();
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
      if (err <= s.tol || it == s.max_iter) break;
    }
    ++it;
    if (sweep(p, s, mix, check, w, sums, parallel)) absorb(p, s.eps, parallel);
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
  if (!(s.eps > 0) || !(s.tol > 0) || s.max_iter < 1 || s.check_every < 1 || s.memory < 0 ||
      s.memory > Anderson::kMaxMemory) {
    throw std::invalid_argument("sinkhorn: expected eps > 0, tol > 0, max_iter >= 1, check_every >= 1, 0 <= memory <= 16");
  }
  if (C.dtype == DType::f32) {
    sinkhorn_typed<float>(C, N, a, b, f, g, s, n_iter, error, transport, value);
  } else if (C.dtype == DType::f64) {
    sinkhorn_typed<double>(C, N, a, b, f, g, s, n_iter, error, transport, value);
  } else {
    throw std::invalid_argument("sinkhorn: C must be float32 or float64");
  }
}

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
    take_rows(e, lam, 1.0);
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
  double err = std::numeric_limits<double>::infinity();
  int64_t it = 0;
  for (;;) {
    lse_pass(gm, p.X, p.Y, p.d, p.scale, lb, G, s.eps, L, parallel);
    if (it > 0) {  // every iteration: the error is O(N) next to the pass that gave L
      err = row_error();
      progress(problem, it, err);
      if (err <= s.tol || it == s.max_iter) break;
    }
    ++it;
    take_rows(s.eps, s.lam, s.symmetric ? 0.5 : 1.0);
    update_cols(s.eps, s.lam, &mix);
  }
  // Values: the row marginals of P and <C, P>, in one more pass over the tiles. Each row is one
  // thread's, so the sums do not depend on how the tiles were shared (column sums accumulated
  // per thread did: ot_eps varied in its last bits from run to run).
  const int threads = max_threads();
  std::vector<double> r(N, 0.0), cost_rows(N, 0.0);
  std::vector<std::vector<double>> z(threads, std::vector<double>(kColBlock)), e(threads, std::vector<double>(kColBlock)),
      cij(threads, std::vector<double>(kColBlock));
  for_each_tile(gm, p.X, p.Y, p.d, parallel, [&](int64_t, int64_t i0, int64_t ni, int64_t j0, int64_t nj, const T* tile,
                                                 int thread) {
    double *zt = z[thread].data(), *et = e[thread].data(), *ct = cij[thread].data();
    for (int64_t rr = 0; rr < ni; ++rr) {
      const int64_t i = i0 + rr;
      if (p.a[i] == 0.0) continue;
      const T* t = tile + rr * nj;
      label_runs(p.X, p.Y, i, j0, nj, [&](int64_t lo, int64_t hi, double label) {
        for (int64_t j = lo; j < hi; ++j) {
          ct[j] = std::max(0.0, p.X.norms[i] + p.Y.norms[j0 + j] - 2.0 * p.scale * double(t[j])) + label;
          zt[j] = la[i] + lb[j0 + j] + (F[i] + G[j0 + j] - ct[j]) / s.eps;
        }
      });
      exp_array(zt, et, nj);
      double row = 0.0, row_cost = 0.0;
      for (int64_t j = 0; j < nj; ++j) {
        const double pij = lb[j0 + j] == neg_inf() ? 0.0 : et[j];
        row += pij;
        row_cost += pij * ct[j];
      }
      r[i] += row;
      cost_rows[i] += row_cost;
    }
  });
  // The column marginals c_j = b_j e^(G_j / eps) sum_i a_i e^((F_i - C_ij) / eps) from the last
  // column pass, which saw the final F (Lc: its log-sums); symmetric problems have P = P^T.
  std::vector<double> cols(M);
  for (int64_t j = 0; j < M; ++j) {
    cols[j] = s.symmetric ? r[j] : lb[j] == neg_inf() ? 0.0 : std::exp(lb[j] + G[j] / s.eps + Lc[j]);
  }
  double cost = 0.0;
  for (int64_t i = 0; i < N; ++i) cost += cost_rows[i];
  std::copy(F.begin(), F.end(), p.f);
  std::copy(G.begin(), G.end(), p.g);
  *n_iter = it;
  *error = err;
  *transport = cost;
  *value = objective(s, F, G, r, cols, p.a, p.b);
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
    if (labels.table) {
      const int64_t kx = labels.x_classes, ky = labels.y_classes;
      p.X.starts.assign(labels.x_starts, labels.x_starts + kx + 1);
      p.Y.starts.assign(labels.y_starts, labels.y_starts + ky + 1);
      p.X.label.assign(labels.table, labels.table + kx * ky);
      p.Y.label.resize(size_t(ky) * kx);
      for (int64_t c = 0; c < kx; ++c) {
        for (int64_t l = 0; l < ky; ++l) p.Y.label[l * kx + c] = labels.table[c * ky + l];
      }
    }
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
  if (!(s.eps > 0) || !(s.tol > 0) || s.max_iter < 1 || s.check_every < 1 || s.memory < 0 ||
      s.memory > Anderson::kMaxMemory) {
    throw std::invalid_argument("sinkhorn: expected eps > 0, tol > 0, max_iter >= 1, check_every >= 1, 0 <= memory <= 16");
  }
  if (x.dtype == DType::f32) {
    points_typed<float>(x, y, N, scale, gemm, a, b, f, g, s, labels, n_iter, error, transport, value, progress);
  } else if (x.dtype == DType::f64) {
    points_typed<double>(x, y, N, scale, gemm, a, b, f, g, s, labels, n_iter, error, transport, value, progress);
  } else {
    throw std::invalid_argument("sinkhorn: points must be float32 or float64");
  }
}

}  // namespace TRANSFEROPS_ISA

#ifdef TRANSFEROPS_ISA_BASE
TRANSFEROPS_IF_AVX2(namespace avx2 {
void sinkhorn_matrix_impl(const View2D& C, int64_t N, const View2D& a, const View2D& b, const View2D& f,
                          const View2D& g, const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport,
                          double* value);
void sinkhorn_points_impl(const View2D& x, const View2D& y, int64_t N, double scale, const Gemm& gemm,
                          const View2D& a, const View2D& b, const View2D& f, const View2D& g,
                          const SinkhornSettings& s, const LabelCost& labels, int64_t* n_iter, double* error,
                          double* transport, double* value,
                          const std::function<void(int64_t, int64_t, double)>& progress);
})

void sinkhorn_matrix(const View2D& C, int64_t N, const View2D& a, const View2D& b, const View2D& f, const View2D& g,
                     const SinkhornSettings& s, int64_t* n_iter, double* error, double* transport, double* value) {
  TRANSFEROPS_RUN_UP_TO_AVX2(sinkhorn_matrix_impl(C, N, a, b, f, g, s, n_iter, error, transport, value));
}

void sinkhorn_points(const View2D& x, const View2D& y, int64_t N, double scale, const Gemm& gemm, const View2D& a,
                     const View2D& b, const View2D& f, const View2D& g, const SinkhornSettings& s,
                     const LabelCost& labels, int64_t* n_iter, double* error, double* transport, double* value,
                     const std::function<void(int64_t, int64_t, double)>& progress) {
  TRANSFEROPS_RUN_UP_TO_AVX2(
      sinkhorn_points_impl(x, y, N, scale, gemm, a, b, f, g, s, labels, n_iter, error, transport, value, progress));
}
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
