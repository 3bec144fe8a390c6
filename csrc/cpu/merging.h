// CPU kernels of the merging hot path. Plain C++17: no Python headers, testable alone.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/view.h"
#include "cpu/isa.h"

namespace transferops::cpu {

enum class SignRule : int { sum = 0, count = 1 };

// Exact top-k of |x| without sorting, as a radix select over the bits of |x| driven by the
// caller (so the data may stream from disk between passes). For non-negative IEEE values,
// integer order of the bits is value order. `nbits` of a key: 31 (float32), 63 (float64),
// 15 (bf16, fp16).
//
// With `base` (same layout) the values are view - base formed in the accumulation type
// (float32; float64 for float64), whose keys then have 31 (63) bits.
//
// Histograms, one per task ([T][2^dbits], flattened), of the digit of `dbits` bits at `shift`
// over the elements of tasks[t] whose key bits above the digit equal prefixes[t]. One pass for
// all tasks, reading a shared base once. All views share rows, cols and dtype.
std::vector<int64_t> abs_digit_histograms(const std::vector<View2D>& tasks, const View2D* base,
                                          const std::vector<uint64_t>& prefixes, int shift, int dbits);
// The flat (row-major) position just after the rank-th element (1-based) of `view` with key
// `key`; if there are fewer, minus their count (so a caller streaming chunks can subtract it
// from the rank and go on).
int64_t abs_equal_cut(const View2D& view, const View2D* base, uint64_t key, int64_t rank);

// The bracketed form of the same select, one pass where the radix takes two or more: keys at
// `runs` runs of kSampleRun consecutive elements spread over the views (seeded; written to
// `out` as [T][runs * kSampleRun]), from which the caller brackets each threshold; then
// abs_bracket counts per task the keys above hi[t] and the keys in [lo[t], hi[t]], and keeps
// the latter either as (key, flat position) pairs, at most `capacity` per task (marks[t]
// empty), or as counts per block of kSelectBlock columns of a row ([blocks][2 m - 1], blocks
// in row-major order) in 2 m - 1 bins: each of the m marked keys marks[t] (ascending, from lo
// to hi: heavily tied keys the sample found), and each gap between two of them. A tie cut is
// then found by scanning one block.
constexpr int64_t kSampleRun = 16;
constexpr int64_t kSelectBlock = 4096;
void abs_sample_keys(const std::vector<View2D>& tasks, const View2D* base, int64_t runs, uint64_t seed,
                     uint64_t* out);
// From such a sample (`keys`: [T][runs * kSampleRun]), per task the bracket [lo, hi] around
// the top fraction q of its keys: the sample's position of that quantile, four standard errors
// of it either side (the larger of the binomial one and the spread between runs, which are
// correlated inside), plus four positions; hi = 2^nbits - 1 (lo = 0) where that runs past the
// sample. `expected` is the keys inside scaled to `numel`. Where it exceeds 2^16 and one key
// holds a quarter of those inside the sample, `marks` lists lo, hi and the (up to
// max_marks - 2) keys the sample holds most often (the larger key first among equal counts),
// ascending; else it is empty.
struct SampleBracket {
  uint64_t lo, hi;
  std::vector<uint64_t> marks;
  double expected;
};
std::vector<SampleBracket> abs_sample_brackets(const uint64_t* keys, int64_t tasks, int64_t runs, double q,
                                               int64_t numel, int nbits, int max_marks);
// The key at position i (0-based) of `keys` sorted ascending, without sorting them all.
uint64_t abs_order_statistic(const uint64_t* keys, int64_t n, int64_t i);
struct BracketResult {
  std::vector<int64_t> above, inside;
  // Per task, the kept pairs in parts (one per thread, in no order), concatenated by the caller.
  std::vector<std::vector<std::vector<uint64_t>>> keys;
  std::vector<std::vector<std::vector<uint32_t>>> positions;
  std::vector<std::vector<uint32_t>> counts;
};
BracketResult abs_bracket(const std::vector<View2D>& tasks, const View2D* base, const std::vector<uint64_t>& lo,
                          const std::vector<uint64_t>& hi, const std::vector<std::vector<uint64_t>>& marks,
                          int64_t capacity);

// Per task: entries kept by a trim are |v| >= lo at flat index < cut and |v| >= hi after it,
// where hi is the next float above lo (so "> threshold"), i.e. a top-k set; entries of a
// second, smaller top-k set (the same form, drop_*) are dropped again (Model Breadcrumbs'
// outliers). No trim: lo = hi = 0; no drop: drop_lo = drop_hi = +inf.
struct Trim {
  double lo, hi;
  int64_t cut;
  double drop_lo, drop_hi;
  int64_t drop_cut;
};

// DARE (Yu et al., ICML 2024): keep each entry with probability keep_below / 2^32, where its
// Philox draw (common/philox.h) of (flat element index, task index, stream; seed) < keep_below
// (2^32 keeps all), and divide survivors by `rescale` (the density, PEFT; 1 for none). `offset`
// is the flat index of the views' first element in the whole tensor, so a tensor merged in
// chunks draws the same mask.
struct Dare {
  uint64_t seed;
  uint32_t stream;
  uint64_t keep_below;
  double rescale;
  int64_t offset;
};

struct MergeSpec {
  bool elect;                   // TIES sign election + disjoint mean; false: weighted sum
  SignRule rule;                // how the sign is elected
  bool weight_before_election;  // mergekit: elect on w_t * tv_t and divide by the agreeing
                                // weight; PEFT: elect on tv_t and divide by the agreeing count
  int zero_sign;                // the sign a vote of exactly 0 elects: +1 (PEFT, mergekit) or
                                // -1 (the TIES paper's code, when its majority is not positive)
  double lam;                   // with a base: out = base + lam * merged
};

struct MergeResult {
  int64_t nonfinite;  // element positions where some input was NaN or Inf
  int64_t sign_sum;   // sum over positions of sign(vote) (election only): the TIES paper's
                      // code elects the sign of this sum where a vote is exactly 0
};

// One pass over the task vectors (TIES-Merging, Yadav et al. 2023, eq. 1-3): trim each task
// by magnitude and/or DARE (both optional), then either out = sum_t w_t tv_t, or elect s = sign of the vote (zero elects +1)
// and out = (sum over agreeing t of w_t tv_t) / den, den = their count (PEFT) or their weight
// (mergekit), 1 where it is 0. Zeros never vote nor count. All views share rows, cols, dtype.
// `weights`, `trims` and `dare` may be null (all ones, no trim, no DARE). With `base`, the
// views hold models theta_t: tv_t = theta_t - base is formed in the accumulation type and
// out = base + lam * merged. An `out` with null data is not written (a counting pass).
MergeResult merge(const std::vector<View2D>& task_vectors, const View2D* base, const View2D& out,
                  const double* weights, const Trim* trims, const Dare* dare, MergeSpec spec);

struct FisherResult {
  int64_t nonfinite;  // element positions where some model or Fisher value was NaN or Inf
  int64_t negative;   // element positions where some Fisher value was negative
};

// Fisher merging (Matena & Raffel, NeurIPS 2022, eq. 3) in one pass:
// out = sum_t w_t F_t theta_t / sum_t w_t F_t with F_t floored at eps > 0 (w_t > 0), so the
// denominator never vanishes and entries no model is informed about get the weighted mean.
FisherResult fisher_average(const std::vector<View2D>& models, const std::vector<View2D>& fishers, const View2D& out,
                            const double* weights, double eps);

}  // namespace transferops::cpu
