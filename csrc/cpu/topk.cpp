// The select's driver: which pass comes next, and what each pass's counts decide. The passes
// themselves are in cpu/topk_passes.cpp; this file runs once per chunk and per pass, so it is
// built for the baseline ISA only.
#include "cpu/topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/dtype.h"

namespace transferops::cpu {
namespace {

// Below this many elements the radix select's passes stay in cache: no sample is taken.
constexpr int64_t kBracketMin = int64_t(1) << 20;
// Fewer runs than this bracket too loosely to be worth the pass.
constexpr int64_t kMinRuns = 256;

// Bits per radix digit: 2^16 bins over large chunks (magnitudes cluster, so the bins in use stay
// in cache whatever the width, and wider digits save passes: 2 for float32, 1 for 16-bit keys);
// 2^11 over small chunks, whose per-thread copies of the bins then cost less to zero and merge.
int digit_bits(int64_t chunk) { return chunk >= (int64_t(1) << 20) ? 16 : 11; }

// The type whose magnitudes are selected: the views' own, or with a base the accumulation type
// in which x = view - base is formed.
DType key_type(DType views, bool base) {
  if (!base) return views;
  return views == DType::f64 ? DType::f64 : DType::f32;
}

int key_bits(DType t) {
  switch (t) {
    case DType::f64: return 63;
    case DType::f32: return 31;
    default: return 15;
  }
}

int64_t element_bytes(DType t) {
  return dispatch_float(t, [](auto tag) { return int64_t(sizeof(tag)); });
}

// The trim of key `key`: lo = its value in the accumulation type, hi = the next value above.
Threshold threshold_of(DType type, uint64_t key, int64_t cut) {
  if (type == DType::f64) {
    double lo;
    std::memcpy(&lo, &key, sizeof lo);
    return {lo, std::nextafter(lo, std::numeric_limits<double>::infinity()), cut};
  }
  const float lo = type == DType::f32  ? f32_from_bits(uint32_t(key))
                   : type == DType::bf16 ? widen(bf16{uint16_t(key)})
                                         : widen(f16{uint16_t(key)});
  return {double(lo), double(std::nextafter(lo, std::numeric_limits<float>::infinity())), cut};
}

// (the bin of `counts` (ascending keys) holding the r-th largest element, its rank in that bin)
std::pair<int64_t, int64_t> rth_largest_bin(const int64_t* counts, int64_t bins, int64_t r) {
  int64_t above = 0;
  for (int64_t b = bins - 1; b >= 0; --b) {
    if (above + counts[b] >= r) return {b, r - above};
    above += counts[b];
  }
  throw std::logic_error("TopkSelect: fewer keys counted than the rank sought");
}

// View `v`'s block `item` of kSelectBlock columns of a row (row-major order), as a 1-row view,
// and the flat position of its first element.
std::pair<View2D, int64_t> select_block(const View2D& v, int64_t item) {
  const int64_t per_row = (v.cols + kSelectBlock - 1) / kSelectBlock;
  const int64_t row = item / per_row, col = item % per_row * kSelectBlock;
  View2D block = v;
  block.data = static_cast<char*>(v.data) + (row * v.row_stride + col) * element_bytes(v.dtype);
  block.rows = 1;
  block.cols = std::min(kSelectBlock, v.cols - col);
  return {block, row * v.cols + col};
}

}  // namespace

TopkSelect::TopkSelect(int64_t k, int64_t numel, int tasks, int64_t chunk, bool keep_ties, SelectOptions options)
    : k_(k), numel_(numel), chunk_(chunk), keep_ties_(keep_ties), options_(options), tasks_(size_t(std::max(tasks, 0))) {
  if (tasks < 1) throw std::invalid_argument("TopkSelect: tasks must be >= 1");
  if (numel < 0 || chunk < 1) throw std::invalid_argument("TopkSelect: numel must be >= 0 and chunk >= 1");
  if (options.max_kept < 0) throw std::invalid_argument("TopkSelect: max_kept must be >= 0");
  for (int t = 0; t < tasks; ++t) all_.push_back(t);
  if (k <= 0 || k >= numel) {
    const double inf = std::numeric_limits<double>::infinity();
    fixed_.assign(size_t(tasks), k <= 0 ? Threshold{inf, inf, 0} : Threshold{0.0, 0.0, numel});
    step_ = Step::done;
    return;
  }
  runs_ = std::min({int64_t(16384), std::max(int64_t(1024), numel / 1024), chunk / (32 * int64_t(tasks))});
  if (options.bracket && numel >= kBracketMin && runs_ >= kMinRuns) {
    begin(Step::sample, all_);
  } else {
    plan();
  }
}

std::vector<int> TopkSelect::next_pass() {
  if (in_pass_) finish_pass();
  if (step_ == Step::done) return {};
  in_pass_ = more_ = true;
  fed_ = chunks_ = 0;
  return which_;
}

bool TopkSelect::feed(const std::vector<View2D>& views, const View2D* base) {
  if (!in_pass_ || !more_) throw std::invalid_argument("TopkSelect.feed: no pass open (call next_pass)");
  if (views.size() != which_.size()) {
    throw std::invalid_argument("TopkSelect.feed: expected " + std::to_string(which_.size()) + " views, one per task of the pass");
  }
  const int64_t n = views[0].rows * views[0].cols;
  if (fed_ + n > numel_) throw std::invalid_argument("TopkSelect.feed: the pass exceeds numel elements");
  const DType type = key_type(views[0].dtype, base != nullptr);
  if (nbits_ < 0) {
    type_ = type;
    nbits_ = key_bits(type);
  } else if (type != type_) {
    throw std::invalid_argument("TopkSelect.feed: the keys' type differs from the first chunk's");
  }
  switch (step_) {
    case Step::sample: take_sample(views, base, n); break;
    case Step::bracket: count_bracket(views, base); break;
    case Step::marked_cut: cut_marked(views[0], base); break;
    case Step::digit: count_digit(views, base); break;
    case Step::equal_cut: cut_equal(views[0], base); break;
    case Step::done: break;
  }
  fed_ += n;
  ++chunks_;
  return more_;
}

std::vector<Threshold> TopkSelect::thresholds() const {
  if (step_ != Step::done || in_pass_) throw std::invalid_argument("TopkSelect.thresholds: passes remain (see next_pass)");
  if (!fixed_.empty()) return fixed_;
  std::vector<Threshold> out;
  for (const Task& t : tasks_) out.push_back(threshold_of(type_, t.key, t.cut));
  return out;
}

void TopkSelect::begin(Step step, std::vector<int> which) {
  step_ = step;
  which_ = std::move(which);
}

void TopkSelect::found(int t, uint64_t key, int64_t cut) {
  tasks_[size_t(t)].found = true;
  tasks_[size_t(t)].key = key;
  tasks_[size_t(t)].cut = cut;
}

void TopkSelect::finish_pass() {
  in_pass_ = false;
  if (more_ && fed_ != numel_) {
    throw std::invalid_argument("TopkSelect: a pass fed " + std::to_string(fed_) + " of the " + std::to_string(numel_) +
                                " elements");
  }
  switch (step_) {
    case Step::sample: return make_brackets();
    case Step::bracket: resolve_brackets(); break;
    case Step::marked_cut:
    case Step::equal_cut:
      if (!tasks_[size_t(which_[0])].found) throw std::logic_error("TopkSelect: fewer ties than counted");
      (step_ == Step::marked_cut ? marked_ : equal_).pop_front();
      break;
    case Step::digit: take_digit(); break;
    case Step::done: break;
  }
  plan();
}

// After the bracket: the marked tasks' tie cuts, one pass each; then the radix select of the
// tasks left, a pass per digit; then its tie cuts, one pass each.
void TopkSelect::plan() {
  if (!marked_.empty()) return begin(Step::marked_cut, {marked_.front()});
  if (!radix_started_) {
    radix_started_ = true;
    for (int t : all_) {
      if (!tasks_[size_t(t)].found) radix_.push_back(t), tasks_[size_t(t)].rank = k_;
    }
    digit_ = digit_bits(chunk_);
  }
  if (!radix_.empty() && (nbits_ < 0 || known_ < nbits_)) return begin(Step::digit, radix_);
  if (!radix_done_) {
    radix_done_ = true;
    for (int t : radix_) {
      Task& s = tasks_[size_t(t)];
      if (keep_ties_ || s.rank >= s.ties) found(t, s.key, numel_);
      else equal_.push_back(t);
    }
  }
  if (!equal_.empty()) return begin(Step::equal_cut, {equal_.front()});
  step_ = Step::done;
}

// ---- the bracketed select ----------------------------------------------------------------------

// Each chunk takes its share of the runs, seeded by its index, so a tensor streamed in chunks is
// sampled alike on every pass.
void TopkSelect::take_sample(const std::vector<View2D>& views, const View2D* base, int64_t n) {
  const int64_t runs = runs_ * n / numel_;
  if (runs == 0) return;
  const size_t size = size_t(int64_t(views.size()) * runs * kSampleRun);
  std::unique_ptr<uint64_t[]> keys(new uint64_t[size]);  // uninitialized: the sample writes every key
  abs_sample_keys(views, base, runs, uint64_t(chunks_), keys.get());
  if (options_.blind_sample) std::fill(keys.get(), keys.get() + size, uint64_t(0));
  sample_.push_back({std::move(keys), runs});
}

void TopkSelect::make_brackets() {
  int64_t runs = 0;
  for (const auto& part : sample_) runs += part.runs;
  if (runs == 0) return plan();
  const int64_t T = int64_t(tasks_.size());
  const uint64_t* keys = sample_[0].keys.get();
  std::unique_ptr<uint64_t[]> joined;
  if (sample_.size() > 1) {  // [T][runs][kSampleRun] from the chunks' [T][their runs][kSampleRun]
    joined.reset(new uint64_t[size_t(T * runs * kSampleRun)]);
    for (int64_t t = 0, at = 0; t < T; ++t) {
      for (const auto& part : sample_) {
        const uint64_t* from = part.keys.get() + t * part.runs * kSampleRun;
        at = std::copy(from, from + part.runs * kSampleRun, joined.get() + at) - joined.get();
      }
    }
    keys = joined.get();
  }
  const std::vector<SampleBracket> brackets =
      abs_sample_brackets(keys, T, runs, double(k_) / double(numel_), numel_, nbits_, kMaxMarks);
  sample_.clear();
  int64_t listed = 0;  // the budget of kept (key, position) pairs per task and chunk
  for (size_t t = 0; t < tasks_.size(); ++t) {
    Task& s = tasks_[t];
    s.lo = brackets[t].lo;
    s.hi = brackets[t].hi;
    s.marks = brackets[t].marks;
    if (s.marks.empty()) listed = std::max(listed, int64_t(2 * brackets[t].expected) + 4096);
    else s.per_bin.assign(2 * s.marks.size() - 1, 0);
  }
  capacity_ = std::min({listed, chunk_ / (2 * T), options_.max_kept});
  begin(Step::bracket, all_);
}

void TopkSelect::count_bracket(const std::vector<View2D>& views, const View2D* base) {
  std::vector<uint64_t> lo, hi;
  std::vector<std::vector<uint64_t>> marks;
  for (const Task& s : tasks_) lo.push_back(s.lo), hi.push_back(s.hi), marks.push_back(s.marks);
  BracketResult r = abs_bracket(views, base, lo, hi, marks, capacity_);
  for (size_t t = 0; t < tasks_.size(); ++t) {
    Task& s = tasks_[t];
    s.above += r.above[t];
    s.inside += r.inside[t];
    if (s.marks.empty()) {
      size_t kept = 0;
      for (size_t part = 0; part < r.keys[t].size(); ++part) {
        s.keys.insert(s.keys.end(), r.keys[t][part].begin(), r.keys[t][part].end());
        s.positions.insert(s.positions.end(), r.positions[t][part].begin(), r.positions[t][part].end());
        kept += r.keys[t][part].size();
      }
      s.parts.push_back({fed_, int64_t(kept)});
    } else {
      const size_t bins = s.per_bin.size();
      for (size_t i = 0; i < r.counts[t].size(); ++i) s.per_bin[i % bins] += r.counts[t][i];
      s.counts.push_back(std::move(r.counts[t]));
    }
  }
}

void TopkSelect::resolve_brackets() {
  for (int t : all_) {
    Task& s = tasks_[size_t(t)];
    const int64_t r = k_ - s.above;  // the k-th largest is the r-th largest in the bracket
    if (1 <= r && r <= s.inside) {
      if (s.marks.empty()) resolve_listed(t, r);
      else resolve_marked(t, r);
    }
    s.keys = {};
    s.positions = {};
    if (marked_.empty() || marked_.back() != t) s.counts = {};  // kept only for a tie-cut pass
  }
}

// The r-th largest of the bracket's kept keys, and the tie cut from their positions; left to the
// radix if the budget kept fewer than were inside.
void TopkSelect::resolve_listed(int t, int64_t r) {
  Task& s = tasks_[size_t(t)];
  const int64_t n = int64_t(s.keys.size());
  if (n < s.inside) return;
  const uint64_t key = abs_order_statistic(s.keys.data(), n, n - r);
  int64_t greater = 0, tied = 0;
  for (const uint64_t k : s.keys) greater += k > key, tied += k == key;
  const int64_t rank = r - greater;
  if (keep_ties_ || rank >= tied) return found(t, key, numel_);
  // Positions stay chunk-relative and 32-bit until here: only the tied ones are widened.
  std::vector<uint64_t> at;
  at.reserve(size_t(tied));
  size_t i = 0;
  for (const auto& [offset, kept] : s.parts) {
    for (const size_t end = i + size_t(kept); i < end; ++i) {
      if (s.keys[i] == key) at.push_back(uint64_t(offset) + s.positions[i]);
    }
  }
  found(t, key, int64_t(abs_order_statistic(at.data(), int64_t(at.size()), rank - 1)) + 1);
}

// The r-th largest key of a bracket counted per block in bins (each marked key, each gap between
// two); left to the radix if it lies in a gap. A tie cut needs a pass of its own, which scans
// only the block holding it.
void TopkSelect::resolve_marked(int t, int64_t r) {
  Task& s = tasks_[size_t(t)];
  const auto [bin, rank] = rth_largest_bin(s.per_bin.data(), int64_t(s.per_bin.size()), r);
  if (bin % 2) return;
  s.key = s.marks[size_t(bin / 2)];
  if (keep_ties_ || rank >= s.per_bin[size_t(bin)]) return found(t, s.key, numel_);
  s.bin = bin;
  s.rank = rank;
  marked_.push_back(t);
}

void TopkSelect::cut_marked(const View2D& view, const View2D* base) {
  const int t = which_[0];
  Task& s = tasks_[size_t(t)];
  const std::vector<uint32_t>& counts = s.counts[size_t(chunks_)];
  const size_t bins = s.per_bin.size();
  int64_t tied = 0;
  for (size_t i = size_t(s.bin); i < counts.size(); i += bins) tied += counts[i];
  if (s.seen + tied < s.rank) {
    s.seen += tied;
    return;
  }
  int64_t item = 0, before = s.seen;
  while (before + counts[size_t(item) * bins + size_t(s.bin)] < s.rank) before += counts[size_t(item++) * bins + size_t(s.bin)];
  const auto [block, start] = select_block(view, item);
  std::optional<View2D> base_block;
  if (base) base_block = select_block(*base, item).first;
  const int64_t at = abs_equal_cut(block, base_block ? &*base_block : nullptr, s.key, s.rank - before);
  if (at <= 0) throw std::logic_error("TopkSelect: fewer ties in the block than counted");
  found(t, s.key, fed_ + start + at);
  s.counts = {};
  more_ = false;
}

// ---- the radix select over the bits of |x| -------------------------------------------------------

void TopkSelect::count_digit(const std::vector<View2D>& views, const View2D* base) {
  if (chunks_ == 0) {
    dbits_ = std::min(digit_, nbits_ - known_);
    shift_ = nbits_ - known_ - dbits_;
    hist_.assign(which_.size() << dbits_, 0);
  }
  std::vector<uint64_t> prefixes;
  for (int t : which_) prefixes.push_back(tasks_[size_t(t)].key);
  const std::vector<int64_t> h = abs_digit_histograms(views, base, prefixes, shift_, dbits_);
  for (size_t i = 0; i < h.size(); ++i) hist_[i] += h[i];
}

// Each task narrows to the digit holding its k-th largest key: its key's bits so far, its rank
// among the keys sharing them, and how many do.
void TopkSelect::take_digit() {
  const int64_t bins = int64_t(1) << dbits_;
  for (size_t i = 0; i < which_.size(); ++i) {
    Task& s = tasks_[size_t(which_[i])];
    const int64_t* h = hist_.data() + int64_t(i) * bins;
    const auto [digit, rank] = rth_largest_bin(h, bins, s.rank);
    s.key = (s.key << dbits_) | uint64_t(digit);
    s.rank = rank;
    s.ties = h[digit];
  }
  known_ += dbits_;
  ++radix_passes_;
}

void TopkSelect::cut_equal(const View2D& view, const View2D* base) {
  const int t = which_[0];
  Task& s = tasks_[size_t(t)];
  const int64_t at = abs_equal_cut(view, base, s.key, s.rank);
  if (at > 0) {
    found(t, s.key, fed_ + at);
    more_ = false;
  } else {
    s.rank += at;  // at = -(ties in this chunk)
  }
}

std::vector<Threshold> abs_topk(const std::vector<View2D>& tasks, const View2D* base, int64_t k, bool keep_ties) {
  if (tasks.empty()) throw std::invalid_argument("abs_topk: no tasks");
  const int64_t numel = tasks[0].rows * tasks[0].cols;
  TopkSelect select(k, numel, int(tasks.size()), std::max<int64_t>(numel, 1), keep_ties);
  for (std::vector<int> which = select.next_pass(); !which.empty(); which = select.next_pass()) {
    std::vector<View2D> views;
    for (int t : which) views.push_back(tasks[size_t(t)]);
    select.feed(views, base);
  }
  return select.thresholds();
}

}  // namespace transferops::cpu
