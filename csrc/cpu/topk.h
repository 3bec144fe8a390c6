// Exact top-k of |x| per task, the trims of the merging pass: the k-th largest magnitude and,
// among the entries equal to it, the flat (row-major) position after which they are dropped.
// Plain C++17: no Python headers, testable alone.
//
// Keys are the bits of |x| as an unsigned integer: for non-negative IEEE values, integer order is
// value order, so selecting on bits selects on magnitudes. A key has 31 bits (float32), 63
// (float64) or 15 (bf16, fp16). With a `base` (same layout) the values are view - base, formed
// in the accumulation type (float32; float64 for float64), whose keys then have 31 (63) bits.
#pragma once
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <vector>

#include "common/view.h"

namespace transferops::cpu {

// ---- the select (cpu/topk.cpp) -----------------------------------------------------------------

// A top-k set as a trim: entries with |x| >= lo at flat index < cut and |x| >= hi (the next value
// above lo) from it on. k <= 0: lo = hi = +inf; k >= numel: lo = hi = 0, cut = numel.
struct Threshold {
  double lo, hi;
  int64_t cut;
};

// Ways to make the select fall back, for tests: `bracket` false runs the radix select alone;
// `max_kept` caps the (key, position) pairs a listed bracket keeps per task and chunk (an
// overflow falls back); `blind_sample` reads every sampled key as 0, a sample that brackets
// nothing near the thresholds.
struct SelectOptions {
  bool bracket = true;
  int64_t max_kept = std::numeric_limits<int64_t>::max();
  bool blind_sample = false;
};

// The top k of |x| of each of `tasks` tensors of `numel` elements, which the caller streams in
// chunks, pass after pass: next_pass() names the tasks the pass reads (none: done), then feed()
// takes their chunks in flat order, the same chunks on every pass (`chunk`: the largest one's
// size), until it returns false or the tensors end. Ties at the k-th largest are kept lowest
// flat index first, or all (`keep_ties`).
//
// The select first samples runs of consecutive elements and brackets each task's k-th key
// between two sample keys, wide enough that one counting pass finds it inside almost always
// (the bracketed select); a task whose bracket misses it, or holds more keys than the budget,
// is left to the radix select, a histogram pass per digit of the key's bits. Either way a tie
// cut, where some ties are dropped, takes one more pass over that task.
class TopkSelect {
 public:
  TopkSelect(int64_t k, int64_t numel, int tasks, int64_t chunk, bool keep_ties, SelectOptions options = {});
  std::vector<int> next_pass();
  bool feed(const std::vector<View2D>& views, const View2D* base);
  std::vector<Threshold> thresholds() const;
  int64_t radix_passes() const { return radix_passes_; }

 private:
  enum class Step { sample, bracket, marked_cut, digit, equal_cut, done };
  struct Task {
    bool found = false;
    uint64_t key = 0;  // found: the k-th key; in the radix select: the key's bits so far
    int64_t cut = 0;
    int64_t rank = 0, ties = 0;  // the radix's rank among the keys of those bits, and their count
    uint64_t lo = 0, hi = 0;     // the bracket
    std::vector<uint64_t> marks;
    int64_t above = 0, inside = 0;
    std::vector<uint64_t> keys;                      // a listed bracket's kept keys, all chunks
    std::vector<uint32_t> positions;                 // and their chunk-relative positions
    std::vector<std::pair<int64_t, int64_t>> parts;  // per chunk: (flat offset, pairs kept)
    std::vector<std::vector<uint32_t>> counts;       // a marked bracket's per-block bins, per chunk
    std::vector<int64_t> per_bin;
    int64_t bin = 0, seen = 0;  // a marked tie cut: the key's bin, its ties in the chunks before
  };
  struct SamplePart {
    std::unique_ptr<uint64_t[]> keys;  // [T][runs][kSampleRun]
    int64_t runs;
  };

  void begin(Step step, std::vector<int> which);
  void found(int t, uint64_t key, int64_t cut);
  void finish_pass();
  void plan();
  void take_sample(const std::vector<View2D>& views, const View2D* base, int64_t n);
  void make_brackets();
  void count_bracket(const std::vector<View2D>& views, const View2D* base);
  void resolve_brackets();
  void resolve_listed(int t, int64_t r);
  void resolve_marked(int t, int64_t r);
  void cut_marked(const View2D& view, const View2D* base);
  void count_digit(const std::vector<View2D>& views, const View2D* base);
  void take_digit();
  void cut_equal(const View2D& view, const View2D* base);

  int64_t k_, numel_, chunk_;
  bool keep_ties_;
  SelectOptions options_;
  std::vector<Task> tasks_;
  std::vector<int> all_;
  std::vector<Threshold> fixed_;  // k <= 0 or k >= numel: no pass
  DType type_ = DType::f32;       // of the values selected on, from the first chunk
  int nbits_ = -1;
  Step step_ = Step::done;
  std::vector<int> which_;
  bool in_pass_ = false, more_ = false;
  int64_t fed_ = 0, chunks_ = 0;  // the open pass's elements and chunks so far
  int64_t runs_ = 0, capacity_ = 0;
  std::vector<SamplePart> sample_;
  std::deque<int> marked_, equal_;  // tasks awaiting a tie-cut pass
  bool radix_started_ = false, radix_done_ = false;
  std::vector<int> radix_;
  int digit_ = 16, dbits_ = 0, shift_ = 0, known_ = 0;
  std::vector<int64_t> hist_;  // the open digit pass's [tasks][bins]
  int64_t radix_passes_ = 0;
};

// The same select over tasks held whole: one call runs every pass.
std::vector<Threshold> abs_topk(const std::vector<View2D>& tasks, const View2D* base, int64_t k, bool keep_ties);

// ---- the select's passes over the data (cpu/topk_passes.cpp) ------------------------------------

// Histograms, one per task ([T][2^dbits], flattened), of the digit of `dbits` bits at `shift`
// over the elements of tasks[t] whose key bits above the digit equal prefixes[t]. One pass for
// all tasks, reading a shared base once. All views share rows, cols and dtype.
std::vector<int64_t> abs_digit_histograms(const std::vector<View2D>& tasks, const View2D* base,
                                          const std::vector<uint64_t>& prefixes, int shift, int dbits);
// The flat (row-major) position just after the rank-th element (1-based) of `view` with key
// `key`; if there are fewer, minus their count (so a caller streaming chunks can subtract it
// from the rank and go on).
int64_t abs_equal_cut(const View2D& view, const View2D* base, uint64_t key, int64_t rank);

// The bracketed select's steps: keys at `runs` runs of kSampleRun consecutive elements spread
// over the views (seeded; written to `out` as [T][runs * kSampleRun]), from which
// abs_sample_brackets brackets each threshold; then abs_bracket counts per task the keys above
// hi[t] and the keys in [lo[t], hi[t]], and keeps the latter either as (key, flat position)
// pairs, at most `capacity` per task (marks[t] empty), or as counts per block of kSelectBlock
// columns of a row ([blocks][2 m - 1], blocks in row-major order) in 2 m - 1 bins: each of the
// m marked keys marks[t] (ascending, from lo to hi: heavily tied keys the sample found), and
// each gap between two of them. A tie cut is then found by scanning one block.
constexpr int64_t kSampleRun = 16;
constexpr int64_t kSelectBlock = 4096;
constexpr int kMaxMarks = 16;  // at most this many keys of a heavily tied bracket are counted per block
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
  // Per task, the kept pairs in parts (one per thread, in no order).
  std::vector<std::vector<std::vector<uint64_t>>> keys;
  std::vector<std::vector<std::vector<uint32_t>>> positions;
  std::vector<std::vector<uint32_t>> counts;
};
BracketResult abs_bracket(const std::vector<View2D>& tasks, const View2D* base, const std::vector<uint64_t>& lo,
                          const std::vector<uint64_t>& hi, const std::vector<std::vector<uint64_t>>& marks,
                          int64_t capacity);

}  // namespace transferops::cpu
