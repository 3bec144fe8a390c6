#include "cpu/adapters.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/isa.h"
#include "cpu/philox_run.h"
#include "cpu/vec.h"

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {
namespace {

// Rows per tile: about this many values of the compute type per [rows, d] buffer, never below
// 16 rows. Forward's tiles are small: more of them share out evenly between threads, and the
// weights stay in L2 beside them. Backward's are larger: each tile adds its weight-gradient
// products into [r, d] sums, and fewer tiles add fewer of them.
constexpr int64_t kForwardTileElements = int64_t(1) << 15;
constexpr int64_t kBackwardTileElements = int64_t(1) << 17;
// Weight gradients are summed over at most this many fixed row chunks (their partials take
// chunks * Partials::width values), of at least kMinChunkRows rows.
constexpr int64_t kMaxChunks = 16;
constexpr int64_t kMinChunkRows = 16;
// Values per block where the chunks' partials are added up.
constexpr int64_t kReduceBlock = 256;
// Columns per block where a setup or epilogue loop walks an [r, d] and a [d, r] array together:
// r streams d apart along one of them thrash L1's sets, so each block finishes its lines first.
constexpr int64_t kColumnBlock = 16;
// The stream word of the adapters' dropout draws (merging uses hashes of tensor names).
constexpr uint32_t kDropoutStream = 0x41445054u;

int64_t tile_rows(int64_t d, int64_t elements) { return std::max<int64_t>(16, elements / std::max<int64_t>(d, 1)); }

// Rows [begin, begin + rows) cut into `count` parts whose sizes differ by at most one row: equal
// parts keep the threads in step, where tiles of a fixed size can leave one thread a tile more.
struct Split {
  int64_t begin, rows, count;
  Split(int64_t begin_, int64_t rows_, int64_t count_)
      : begin(begin_), rows(rows_), count(std::max<int64_t>(1, count_)) {}
  // `rows` in parts of at most `most` rows, as few as can be.
  static Split at_most(int64_t begin, int64_t rows, int64_t most) { return {begin, rows, (rows + most - 1) / most}; }
  int64_t start(int64_t i) const { return begin + rows * i / count; }
  int64_t size(int64_t i) const { return start(i + 1) - start(i); }
  int64_t largest() const { return (rows + count - 1) / count; }
};

// Sum of f(j) for j < n in 32 interleaved partial sums, combined in a fixed order: without
// -ffast-math, one running sum cannot vectorize; these lanes can, as four independent vector
// sums (one vector sum would wait on its add latency every 8 terms).
template <class T, class F>
T lane_sum(int64_t n, F&& f) {
  constexpr int kLanes = 32;
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += f(j + l);
  }
  for (; j < n; ++j) lane[0] += f(j);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  }
  return lane[0];
}

// Vectors from cpu/vec.h: the scalar-times-vector products broadcast the scalar.
template <class T>
constexpr int64_t kLanes = kVecBytes / int64_t(sizeof(T));

// Register blocks of the two skinny products, the fastest of those tried with AVX2 (16 vector
// registers): 6 rows x 2 vectors for the down-projection (12 accumulators; each k loads two
// weight vectors and broadcasts six inputs), 3 rows x 4 vectors for the up-projection (12
// accumulators; each k loads four weight vectors and broadcasts three inputs).
constexpr int kDownRows = 6;
constexpr int kUpRows = 3;
constexpr int64_t kUpVectors = 4;

// p[i, j] = sum_k x[i, k] wt[k, j] for MR rows and j < rp (a multiple of 2 vectors): wt is
// [d, rp], so each k loads two weight vectors and broadcasts MR inputs straight from memory
// (forward centres the rows beforehand: subtracting here would take a scalar load, subtract and
// broadcast per row, k and column block, on the pipes the products need).
// The sum over k runs in blocks of kSumBlock terms added to a running total: its rounding
// error grows with kSumBlock + d / kSumBlock rather than d, as a blocked GEMM's (torch's) does.
constexpr int64_t kSumBlock = 64;

template <class T, int MR>
void down_rows(const T* x, int64_t ldx, const T* wt, int64_t rp, int64_t d, T* p) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t j0 = 0; j0 < rp; j0 += 2 * L) {
    Vec<T> total[MR][2];
    for (int i = 0; i < MR; ++i) total[i][0] = total[i][1] = Vec<T>{};
    for (int64_t kb = 0; kb < d; kb += kSumBlock) {
      const int64_t ke = std::min(d, kb + kSumBlock);
      Vec<T> acc[MR][2];
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = Vec<T>{};
      for (int64_t k = kb; k < ke; ++k) {
        const Vec<T> w0 = load_vec(wt + k * rp + j0), w1 = load_vec(wt + k * rp + j0 + L);
        for (int i = 0; i < MR; ++i) {
          const T v = x[i * ldx + k];
          acc[i][0] += v * w0;
          acc[i][1] += v * w1;
        }
      }
      for (int i = 0; i < MR; ++i) {
        total[i][0] += acc[i][0];
        total[i][1] += acc[i][1];
      }
    }
    for (int i = 0; i < MR; ++i) {
      store_vec(p + i * rp + j0, total[i][0]);
      store_vec(p + i * rp + j0 + L, total[i][1]);
    }
  }
}

// Columns per block of up_block's products.
template <class T>
constexpr int64_t kUpBlock = kUpVectors * kLanes<T>;

// The right operand w [n, dp] of up_block's products, read one block of kUpBlock columns at a
// time: row-major, rows `ld` apart (`block` = kUpBlock), or packed in panels, each block's n rows
// of kUpBlock values contiguous (ld = kUpBlock, block = n kUpBlock; see panel_offset). A block of
// rows ld apart maps to few of L1's sets when ld is a multiple of a large power of two, and the
// prefetchers do not follow it; a panel is one contiguous stream.
template <class T>
struct Columns {
  const T* w;
  int64_t ld, block;
  static Columns rows(const T* w, int64_t ld) { return {w, ld, kUpBlock<T>}; }
  static Columns panels(const T* w, int64_t n) { return {w, kUpBlock<T>, n * kUpBlock<T>}; }
  const T* at(int64_t k0) const { return w + k0 / kUpBlock<T> * block; }
};

// Where entry (j, k) of an [n, .] matrix lies in Columns' panels.
template <class T>
int64_t panel_offset(int64_t n, int64_t j, int64_t k) {
  return k / kUpBlock<T> * n * kUpBlock<T> + j * kUpBlock<T> + k % kUpBlock<T>;
}

// out[i, k0 + c] = sum_{j < n} z[i zr + j zs] w[j, k0 + c] for MR rows i and the kUpVectors
// vectors of columns c from k0 (wb: w's block at k0, rows ldw apart), handed to store(i, column,
// vector). The strides let one kernel serve both shapes: with z [rows, n] (zr = n, zs = 1) it
// multiplies z by w (the up-projection, backward's input gradient); with z the transpose of an
// [n, rows] matrix it sums that matrix's outer products with the rows of w (the weight
// gradients). Sums over j run in blocks of kSumBlock terms, as in down_rows.
template <class T, int MR, class Store>
void up_block(const T* z, int64_t zr, int64_t zs, int64_t n, const T* wb, int64_t ldw, int64_t k0, Store&& store) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> total[MR][kUpVectors];
  for (int i = 0; i < MR; ++i) {
    for (int64_t q = 0; q < kUpVectors; ++q) total[i][q] = Vec<T>{};
  }
  for (int64_t jb = 0; jb < n; jb += kSumBlock) {
    const int64_t je = std::min(n, jb + kSumBlock);
    Vec<T> acc[MR][kUpVectors];
    for (int i = 0; i < MR; ++i) {
      for (int64_t q = 0; q < kUpVectors; ++q) acc[i][q] = Vec<T>{};
    }
    for (int64_t j = jb; j < je; ++j) {
      Vec<T> wv[kUpVectors];
      for (int64_t q = 0; q < kUpVectors; ++q) wv[q] = load_vec(wb + j * ldw + q * L);
      for (int i = 0; i < MR; ++i) {
        const T zv = z[i * zr + j * zs];
        for (int64_t q = 0; q < kUpVectors; ++q) acc[i][q] += zv * wv[q];
      }
    }
    for (int i = 0; i < MR; ++i) {
      for (int64_t q = 0; q < kUpVectors; ++q) total[i][q] += acc[i][q];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int64_t q = 0; q < kUpVectors; ++q) store(i, k0 + q * L, total[i][q]);
  }
}

// The padded widths the products take: r to whole pairs of vectors (down_rows' column blocks),
// d to whole blocks of kUpVectors vectors (up_rows').
template <class T>
int64_t down_width(int64_t r) {
  constexpr int64_t b = 2 * kLanes<T>;
  return (r + b - 1) / b * b;
}

template <class T>
int64_t up_width(int64_t d) {
  return (d + kUpBlock<T> - 1) / kUpBlock<T> * kUpBlock<T>;
}

// The row stride of a tile buffer of dp (up_width) values per row that up_tile walks down its
// columns: one cache line more, an odd number of lines, so that a column block's rows spread
// over all of L1's sets (rows of 768 floats, 48 lines, would use a sixteenth of them; 4096,
// one).
template <class T>
int64_t padded_ld(int64_t dp) {
  return dp + 64 / int64_t(sizeof(T));
}

// The two products over m rows in register blocks (the down-projection's remainder in blocks of
// half as many rows, then single rows, so that few rows run one at a time). With a `mean`, the
// down-projection reads each block's rows centred on their means, written to `scratch`
// [kDownRows, d] (it stays in L1, where a centred copy of the whole tile would push the weights
// out of L2).
template <class T>
void down_tile(const T* x, int64_t ld, const T* mean, const T* wt, int64_t rp, int64_t d, int64_t m, T* p,
               T* scratch) {
  auto block = [&](auto rows, int64_t i) {
    constexpr int MR = decltype(rows)::value;
    const T* src = x + i * ld;
    int64_t lds = ld;
    if (mean) {
      for (int q = 0; q < MR; ++q) {
        for (int64_t k = 0; k < d; ++k) scratch[q * d + k] = src[q * ld + k] - mean[i + q];
      }
      src = scratch;
      lds = d;
    }
    down_rows<T, MR>(src, lds, wt, rp, d, p + i * rp);
  };
  int64_t i = 0;
  const auto blocks = [&](auto rows) {
    for (; i + decltype(rows)::value <= m; i += decltype(rows)::value) block(rows, i);
  };
  blocks(std::integral_constant<int, kDownRows>{});
  blocks(std::integral_constant<int, kDownRows / 2>{});
  blocks(std::integral_constant<int, 1>{});
}

// Rows [0, m) of up_block's product over the first dp columns of w [n, .], dp a whole number of
// blocks (up_width): column blocks outermost, so that one block of w's columns stays in L1
// across the row blocks.
template <class T, class Store>
void up_tile(const T* z, int64_t zr, int64_t zs, int64_t n, const Columns<T>& w, int64_t dp, int64_t m,
             Store&& store) {
  for (int64_t k0 = 0; k0 < dp; k0 += kUpBlock<T>) {
    const T* wb = w.at(k0);
    int64_t i = 0;
    for (; i + kUpRows <= m; i += kUpRows) {
      up_block<T, kUpRows>(z + i * zr, zr, zs, n, wb, w.ld, k0,
                           [&](int q, int64_t c, const Vec<T>& v) { store(i + q, c, v); });
    }
    for (; i < m; ++i) {
      up_block<T, 1>(z + i * zr, zr, zs, n, wb, w.ld, k0, [&](int, int64_t c, const Vec<T>& v) { store(i, c, v); });
    }
  }
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

  Dropout(double p, uint64_t seed_, int64_t d_)
      : on(p > 0), keep_below(uint32_t(std::min(std::ldexp(1.0 - p, 32), 4294967295.0))),
        inv_keep(p < 1 ? 1.0 / (1.0 - p) : 0.0), seed(seed_), d(d_) {}
  explicit Dropout(const Bottleneck& w) : Dropout(w.dropout, w.seed, w.d) {}

  // dst[j] = src[j] times the factor of entry (n, j), 0 or 1 / (1 - p), for j < d (dst may be
  // src). The draws come in runs of 64, eight per register in the AVX2 build.
  template <class D, class S>
  void apply(int64_t n, const S* src, D* dst) const {
    using T = acc_t<D>;
    constexpr int64_t kRun = 64;
    uint32_t draw[kRun];
    for (int64_t j0 = 0; j0 < d; j0 += kRun) {
      const int64_t m = std::min(kRun, d - j0);
      philox_run(uint64_t(n) * uint64_t(d) + uint64_t(j0), 0, kDropoutStream, seed, m, draw);
      for (int64_t j = 0; j < m; ++j) {
        dst[j0 + j] = narrow<D>(T(widen(src[j0 + j])) * (draw[j] < keep_below ? T(inv_keep) : T(0)));
      }
    }
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

// The weights as forward takes them. The layer norm folds into the down-projection:
// W_down LN(x) + b_down = rstd W' (x - mean) + (W_down ln_bias + b_down), with
// W' = W_down diag(ln_weight). Forward then never writes the normalized row: statistics,
// projection and epilogue read x in place.
// The epilogue's vectors are dense (absent terms as zeros and ones) and padded to dp, so that
// its loops have no branches and run over whole blocks.
template <class T>
struct Folded {
  int64_t rp, dp;         // r and d rounded up to whole register blocks
  std::vector<T> wt;      // [d, rp]: W'^T, zero past r
  std::vector<T> wut;     // [r, dp]: W_up^T in up_tile's panels, zero past d
  std::vector<T> bias;    // [r]: W_down ln_bias + b_down
  std::vector<T> b_up, scale, ln_weight, ln_bias;  // [dp]

  Folded(const Bottleneck& w, const Weights<T>& p)
      : rp(down_width<T>(w.r)),
        dp(up_width<T>(w.d)),
        wt(size_t(w.d * rp)), wut(size_t(w.r * dp)), bias(size_t(w.r)), b_up(size_t(dp)),
        scale(size_t(dp)), ln_weight(size_t(dp), T(1)), ln_bias(size_t(dp)) {
    const int64_t d = w.d, r = w.r;
    for (int64_t k = 0; k < d; ++k) {
      b_up[size_t(k)] = p.b_up ? p.b_up[k] : T(0);
      scale[size_t(k)] = p.scale[k];
      if (p.ln_weight) ln_weight[size_t(k)] = p.ln_weight[k];
      if (p.ln_bias) ln_bias[size_t(k)] = p.ln_bias[k];
    }
    // The transposes in column blocks (see kColumnBlock): at a few rows, folding the weights is
    // most of a call.
    for (int64_t k0 = 0; k0 < d; k0 += kColumnBlock) {
      const int64_t k1 = std::min(d, k0 + kColumnBlock);
      for (int64_t j = 0; j < r; ++j) {
        for (int64_t k = k0; k < k1; ++k) {
          const T wd = p.w_down[j * d + k];
          wt[size_t(k * rp + j)] = w.layer_norm && p.ln_weight ? wd * p.ln_weight[k] : wd;
          wut[size_t(panel_offset<T>(r, j, k))] = p.w_up[k * r + j];
        }
      }
    }
    for (int64_t j = 0; j < r; ++j) {
      const T* wd = p.w_down + j * d;
      const T shift =
          w.layer_norm && p.ln_bias ? lane_sum<T>(d, [&](int64_t k) { return wd[k] * p.ln_bias[k]; }) : T(0);
      bias[size_t(j)] = (p.b_down ? p.b_down[j] : T(0)) + shift;
    }
  }
};

template <class S>
bool forward_typed(const Bottleneck& w, const View2D& x, const View2D* residual, const View2D& out, void* a_out,
                   void* mean_out, void* rstd_out) {
  using T = acc_t<S>;
  const Weights<T> p(w);
  const Dropout drop(w);
  const Folded<T> f(w, p);
  const int64_t N = x.rows, d = w.d, r = w.r, rp = f.rp;
  const Columns<T> w_up = Columns<T>::panels(f.wut.data(), r);
  // Rows are independent here: the tiles may follow the thread count, a whole multiple of it.
  Split split = Split::at_most(0, N, tile_rows(d, kForwardTileElements));
  const int64_t threads = max_threads();
  if (split.count > 1) split = Split(0, N, (split.count + threads - 1) / threads * threads);
  const int64_t tiles = split.count;
  T *a = static_cast<T*>(a_out), *mean = static_cast<T*>(mean_out), *rstd = static_cast<T*>(rstd_out);
  int64_t nonfinite_tiles = 0;
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel if (tiles > 1 && N * d > kParallelMinElements)
#endif
  {
    // bf16/fp16 rows are widened once per tile; float and double rows are read in place.
    const size_t rows = size_t(split.largest());
    std::vector<T> buf(std::is_same_v<S, T> ? 0 : rows * size_t(d)), proj(rows * size_t(rp)), z(rows * size_t(r)),
        v(size_t(kUpRows) * size_t(f.dp)), scratch(size_t(kDownRows * d));
#ifdef TRANSFEROPS_OPENMP
#pragma omp for schedule(static) reduction(+ : nonfinite_tiles)
#endif
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = split.start(t), m = split.size(t);
      const T* in;
      int64_t ld;
      if constexpr (std::is_same_v<S, T>) {
        in = x.row<S>(n0);
        ld = x.row_stride;
      } else {
        for (int64_t i = 0; i < m; ++i) {
          const S* xr = x.row<S>(n0 + i);
          for (int64_t j = 0; j < d; ++j) buf[size_t(i * d + j)] = widen(xr[j]);
        }
        in = buf.data();
        ld = d;
      }
      for (int64_t i = 0; i < m; ++i) {
        const T* xr = in + i * ld;
        if (!w.layer_norm) {
          mean[n0 + i] = 0;
          rstd[n0 + i] = 1;
          continue;
        }
        // Two passes over the cached row: the mean (of x - x_0, x_0 the first entry, so that
        // the terms are of the size of the spread when |mean| >> std), then the variance.
        const T first = xr[0];
        const T mu = first + lane_sum<T>(d, [&](int64_t j) { return xr[j] - first; }) / T(d);
        const T ss = lane_sum<T>(d, [&](int64_t j) { return (xr[j] - mu) * (xr[j] - mu); });
        mean[n0 + i] = mu;
        rstd[n0 + i] = T(1) / std::sqrt(ss / T(d) + T(w.eps));
      }
      down_tile(in, ld, w.layer_norm ? mean + n0 : nullptr, f.wt.data(), rp, d, m, proj.data(), scratch.data());
      T* at = a + n0 * r;
      T bad = 0;  // stays 0 unless a pre-activation is NaN or Inf, as it is when x or a weight is
      for (int64_t i = 0; i < m; ++i) {
        const T rs = rstd[n0 + i];
        for (int64_t j = 0; j < r; ++j) {
          const T v = rs * proj[size_t(i * rp + j)] + f.bias[size_t(j)];
          at[i * r + j] = v;
          bad += v - v;
          z[size_t(i * r + j)] = activate(w.act, v);
        }
      }
      nonfinite_tiles += bad != T(0);
      // The up-projection kUpRows rows at a time (scale and b_up applied in registers), then
      // dropout and the residual over those rows while they are in L1.
      for (int64_t i = 0; i < m; i += kUpRows) {
        const int64_t mr = std::min<int64_t>(kUpRows, m - i);
        up_tile(z.data() + i * r, r, 1, r, w_up, f.dp, mr, [&](int64_t q, int64_t c, const Vec<T>& u) {
          store_vec(v.data() + q * f.dp + c, load_vec(f.scale.data() + c) * (u + load_vec(f.b_up.data() + c)));
        });
        for (int64_t q = 0; q < mr; ++q) {
          const int64_t n = n0 + i + q;
          T* vr = v.data() + q * f.dp;
          if (drop.on) drop.apply(n, vr, vr);
          S* yr = out.row<S>(n);
          if (w.residual == Residual::normalized) {
            const T *xr = in + (i + q) * ld, *lw = f.ln_weight.data(), *lb = f.ln_bias.data();
            const T mu = mean[n], rs = rstd[n];
            for (int64_t k = 0; k < d; ++k) yr[k] = narrow<S>((xr[k] - mu) * rs * lw[k] + lb[k] + vr[k]);
          } else {
            const S* rr = w.residual == Residual::separate ? residual->row<S>(n) : x.row<S>(n);
            for (int64_t k = 0; k < d; ++k) yr[k] = narrow<S>(widen(rr[k]) + vr[k]);
          }
        }
      }
    }
  }
  return nonfinite_tiles == 0;
}

// One row chunk's partial weight gradients, dp wide (columns past d are padding): the products
// mt = phi(a)^T g' [r, dp] (g' the output gradient after dropout) and dt = da^T xhat [r, dp]
// (xhat the normalized input, or x without layer norm), the column sums of g' and of da, and
// the LN terms; all in one block of width(dp, r) values at `base`.
template <class T>
struct Partials {
  T *mt, *dt, *g_sum, *ln_weight, *ln_bias, *da_sum;
  static int64_t width(int64_t dp, int64_t r) { return 2 * r * dp + 3 * dp + r; }
  Partials(T* base, int64_t dp, int64_t r)
      : mt(base), dt(mt + r * dp), g_sum(dt + r * dp), ln_weight(g_sum + dp), ln_bias(ln_weight + dp),
        da_sum(ln_bias + dp) {}
};

// Every product runs in the register blocks of forward's kernels, on tiles of g' and xhat copied
// dp wide into per-thread buffers that stay in L2: the weight gradients as sums of outer
// products (up_tile over phi(a) and da transposed): at small r a BLAS spends more time packing
// the [m, d] operand than multiplying it.
template <class S>
void backward_typed(const Bottleneck& w, const View2D& grad, const View2D& x, const void* a_in, const void* mean_in,
                    const void* rstd_in, const View2D& dx, const BottleneckGrads& out) {
  using T = acc_t<S>;
  const Weights<T> p(w);
  const Dropout drop(w);
  const int64_t N = x.rows, d = w.d, r = w.r, tm = tile_rows(d, kBackwardTileElements);
  const T* a = static_cast<const T*>(a_in);
  const T* mean = static_cast<const T*>(mean_in);
  const T* rstd = static_cast<const T*>(rstd_in);
  // dz = g' (diag(s) W_up) in down_rows' blocks, with the scale folded in, as its [d, rp]
  // transpose; dh = da W_down in up_block's, W_down [r, dp] in up_tile's panels.
  const int64_t rp = down_width<T>(r), dp = up_width<T>(d), ld = padded_ld<T>(dp);
  std::vector<T> w_up_scaled(size_t(d * rp)), w_down(size_t(r * dp)), ln_weight(size_t(d), T(1));
  // Row by row: interleaved with the other copy, W_down's r streams d apart would thrash L1's sets.
  for (int64_t j = 0; j < d; ++j) {
    if (p.ln_weight) ln_weight[size_t(j)] = p.ln_weight[j];
    for (int64_t k = 0; k < r; ++k) w_up_scaled[size_t(j * rp + k)] = p.scale[j] * p.w_up[j * r + k];
  }
  for (int64_t k = 0; k < r; ++k) {
    for (int64_t j = 0; j < d; ++j) w_down[size_t(panel_offset<T>(r, k, j))] = p.w_down[k * d + j];
  }
  const Columns<T> w_down_panels = Columns<T>::panels(w_down.data(), r);
  // The chunks, and the tiles within each, follow from N and d only: the sums' order does not
  // depend on the thread count.
  const Split chunk_rows(0, N, std::min(kMaxChunks, N / kMinChunkRows));
  const int64_t chunks = chunk_rows.count, rows = std::min(tm, chunk_rows.largest());
  // Each chunk's partials are zeroed by the thread that sums them, then added up in chunk order by
  // all threads over slices of the block, so that no thread waits while another does both.
  const int64_t width = Partials<T>::width(dp, r);
  const std::unique_ptr<T[]> sums(new T[size_t(chunks * width)]);
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel if (chunks > 1 && N * d > kParallelMinElements)
#endif
  {
    // phi(a) and da also transposed ([r, m]), so that the weight gradients' broadcasts walk each
    // column's m values in order rather than with stride r.
    std::vector<T> g(size_t(rows * ld)), xhat(size_t(rows * ld)), dh(size_t(kUpRows * dp)), zt(size_t(rows * r)),
        da(size_t(rows * r)), dat(size_t(rows * r)), proj(size_t(rows * rp));
    const auto accumulate = [dp](T* sum) {
      return [sum, dp](int64_t k, int64_t col, const Vec<T>& v) {
        T* s = sum + k * dp + col;
        store_vec(s, load_vec(s) + v);
      };
    };
#ifdef TRANSFEROPS_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t c = 0; c < chunks; ++c) {
      T* base = sums.get() + c * width;
      std::fill(base, base + width, T(0));
      const Partials<T> part(base, dp, r);
      const Split tiles = Split::at_most(chunk_rows.start(c), chunk_rows.size(c), tm);
      for (int64_t t = 0; t < tiles.count; ++t) {
        const int64_t n0 = tiles.start(t), m = tiles.size(t);
        for (int64_t i = 0; i < m; ++i) {
          const S* gr = grad.row<S>(n0 + i);
          T* br = g.data() + i * ld;
          if (drop.on) {
            drop.apply(n0 + i, gr, br);
          } else {
            for (int64_t j = 0; j < d; ++j) br[j] = widen(gr[j]);
          }
          for (int64_t j = 0; j < d; ++j) part.g_sum[j] += br[j];
          const S* xr = x.row<S>(n0 + i);
          T* hr = xhat.data() + i * ld;
          if (w.layer_norm) {
            const T mu = mean[n0 + i], rs = rstd[n0 + i];
            for (int64_t j = 0; j < d; ++j) hr[j] = (widen(xr[j]) - mu) * rs;
          } else {
            for (int64_t j = 0; j < d; ++j) hr[j] = widen(xr[j]);
          }
        }
        const T* at = a + n0 * r;
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t k = 0; k < r; ++k) zt[size_t(k * m + i)] = activate(w.act, at[i * r + k]);
        }
        up_tile(zt.data(), m, 1, m, Columns<T>::rows(g.data(), ld), dp, r, accumulate(part.mt));
        down_tile<T>(g.data(), ld, nullptr, w_up_scaled.data(), rp, d, m, proj.data(), nullptr);
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t k = 0; k < r; ++k) {
            const T v = proj[size_t(i * rp + k)] * activate_slope(w.act, at[i * r + k]);
            da[size_t(i * r + k)] = dat[size_t(k * m + i)] = v;
            part.da_sum[k] += v;
          }
        }
        up_tile(dat.data(), m, 1, m, Columns<T>::rows(xhat.data(), ld), dp, r, accumulate(part.dt));
        // dh kUpRows rows at a time, then the layer norm's backward over those rows in L1.
        for (int64_t i0 = 0; i0 < m; i0 += kUpRows) {
          const int64_t mr = std::min<int64_t>(kUpRows, m - i0);
          up_tile(da.data() + i0 * r, r, 1, r, w_down_panels, dp, mr,
                  [&](int64_t q, int64_t col, const Vec<T>& v) { store_vec(dh.data() + q * dp + col, v); });
          for (int64_t q = 0; q < mr; ++q) {
            const int64_t n = n0 + i0 + q;
            const S* graw = grad.row<S>(n);
            T* gi = dh.data() + q * dp;
            if (w.residual == Residual::normalized) {
              for (int64_t j = 0; j < d; ++j) gi[j] += widen(graw[j]);
            }
            S* dr = dx.row<S>(n);
            const bool add_g = w.residual == Residual::input;
            if (!w.layer_norm) {
              for (int64_t j = 0; j < d; ++j) dr[j] = narrow<S>(add_g ? gi[j] + widen(graw[j]) : gi[j]);
              continue;
            }
            const T* hr = xhat.data() + (i0 + q) * ld;
            T *lw = part.ln_weight, *lb = part.ln_bias;
            for (int64_t j = 0; j < d; ++j) {
              lw[j] += gi[j] * hr[j];
              lb[j] += gi[j];
              gi[j] *= ln_weight[size_t(j)];
            }
            const T c1 = lane_sum<T>(d, [&](int64_t j) { return gi[j]; }) / T(d);
            const T c2 = lane_sum<T>(d, [&](int64_t j) { return gi[j] * hr[j]; }) / T(d);
            const T rs = rstd[n];
            for (int64_t j = 0; j < d; ++j) {
              const T v = rs * (gi[j] - c1 - hr[j] * c2);
              dr[j] = narrow<S>(add_g ? v + widen(graw[j]) : v);
            }
          }
        }
      }
    }
    // In blocks, chunks inside, so that the adds run along each chunk's contiguous values and
    // vectorize, rather than one value at a time across chunks far apart.
#ifdef TRANSFEROPS_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i0 = 0; i0 < width; i0 += kReduceBlock) {
      const int64_t n = std::min(kReduceBlock, width - i0);
      T* total = sums.get() + i0;
      for (int64_t c = 1; c < chunks; ++c) {
        const T* part = sums.get() + c * width + i0;
        for (int64_t i = 0; i < n; ++i) total[i] += part[i];
      }
    }
  }
  const Partials<T> total(sums.get(), dp, r);
  T *gw_down = static_cast<T*>(out.w_down), *gb_down = static_cast<T*>(out.b_down),
    *gw_up = static_cast<T*>(out.w_up), *gb_up = static_cast<T*>(out.b_up),
    *gln_w = static_cast<T*>(out.ln_weight), *gln_b = static_cast<T*>(out.ln_bias),
    *gscale = static_cast<T*>(out.scale);
  // LN(x) = xhat ln_weight + ln_bias: dW_down = da^T LN(x) = dt diag(ln_weight) + da_sum ln_bias^T.
  for (int64_t k = 0; k < r; ++k) {
    const T* dtk = total.dt + k * dp;
    const T dsum = total.da_sum[k];
    for (int64_t j = 0; j < d; ++j) {
      gw_down[k * d + j] = w.layer_norm ? dtk[j] * ln_weight[size_t(j)] + (p.ln_bias ? dsum * p.ln_bias[j] : T(0))
                                        : dtk[j];
    }
  }
  std::copy_n(total.da_sum, r, gb_down);
  std::copy_n(total.ln_weight, d, gln_w);
  std::copy_n(total.ln_bias, d, gln_b);
  // y_j = s_j (W_up z + b_up)_j: dW_up = diag(s) mt^T, db_up = s g'_sum, ds_j = <W_up_j, mt^T_j> + b_up_j g'_sum_j.
  // In column blocks, k inside: along j alone mt's r rows thrash L1, and along k alone each ds is
  // one chain of r dependent adds.
  for (int64_t j0 = 0; j0 < d; j0 += kColumnBlock) {
    const int64_t j1 = std::min(d, j0 + kColumnBlock);
    T ds[kColumnBlock] = {};
    for (int64_t k = 0; k < r; ++k) {
      for (int64_t j = j0; j < j1; ++j) {
        const T mjk = total.mt[k * dp + j];
        gw_up[j * r + k] = p.scale[j] * mjk;
        ds[j - j0] += p.w_up[j * r + k] * mjk;
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      const T gs = total.g_sum[j];
      gb_up[j] = p.scale[j] * gs;
      gscale[j] = ds[j - j0] + (p.b_up ? p.b_up[j] * gs : T(0));
    }
  }
}

template <class S>
void dropout_typed(const View2D& x, const View2D& out, double p, uint64_t seed) {
  const Dropout drop(p, seed, x.cols);
#ifdef TRANSFEROPS_OPENMP
#pragma omp parallel for schedule(static) if (x.rows * x.cols > kParallelMinElements)
#endif
  for (int64_t n = 0; n < x.rows; ++n) drop.apply(n, x.row<S>(n), out.row<S>(n));
}

}  // namespace

void adapter_dropout_impl(const View2D& x, const View2D& out, double p, uint64_t seed) {
  dispatch_float(x.dtype, [&](auto s) { dropout_typed<decltype(s)>(x, out, p, seed); });
}

bool bottleneck_forward_impl(const Bottleneck& w, const View2D& x, const View2D* residual,
                             const View2D& out, void* a, void* mean, void* rstd) {
  return dispatch_float(x.dtype, [&](auto s) { return forward_typed<decltype(s)>(w, x, residual, out, a, mean, rstd); });
}

void bottleneck_backward_impl(const Bottleneck& w, const View2D& grad, const View2D& x, const void* a,
                              const void* mean, const void* rstd, const View2D& dx, const BottleneckGrads& grads) {
  dispatch_float(x.dtype, [&](auto s) { backward_typed<decltype(s)>(w, grad, x, a, mean, rstd, dx, grads); });
}

}  // namespace TRANSFEROPS_ISA

#ifdef TRANSFEROPS_ISA_BASE
TRANSFEROPS_IF_AVX2(namespace avx2 {
void adapter_dropout_impl(const View2D& x, const View2D& out, double p, uint64_t seed);
bool bottleneck_forward_impl(const Bottleneck& w, const View2D& x, const View2D* residual,
                             const View2D& out, void* a, void* mean, void* rstd);
void bottleneck_backward_impl(const Bottleneck& w, const View2D& grad, const View2D& x, const void* a,
                              const void* mean, const void* rstd, const View2D& dx, const BottleneckGrads& grads);
})

void adapter_dropout(const View2D& x, const View2D& out, double p, uint64_t seed) {
  TRANSFEROPS_RUN_UP_TO_AVX2(adapter_dropout_impl(x, out, p, seed));
}

bool bottleneck_forward(const Bottleneck& w, const View2D& x, const View2D* residual,
                        const View2D& out, void* a, void* mean, void* rstd) {
  TRANSFEROPS_RUN_UP_TO_AVX2(bottleneck_forward_impl(w, x, residual, out, a, mean, rstd));
}

void bottleneck_backward(const Bottleneck& w, const View2D& grad, const View2D& x, const void* a, const void* mean,
                         const void* rstd, const View2D& dx, const BottleneckGrads& grads) {
  TRANSFEROPS_RUN_UP_TO_AVX2(bottleneck_backward_impl(w, grad, x, a, mean, rstd, dx, grads));
}
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
