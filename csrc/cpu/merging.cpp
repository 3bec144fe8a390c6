#include "cpu/merging.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/philox_run.h"

#ifdef __AVX512BW__
#include <immintrin.h>
#endif

// This file is compiled three times on x86-64 (see cpu/isa.h); its entry points pick one build at
// run time. All use -ffp-contract=off and the same per-element order of operations, so their
// results are bit-identical.

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {
namespace {

// The fused pass's loops index stack arrays through lambdas' captures: unless every level is
// inlined into the function that owns the arrays, GCC must assume that they alias the inputs,
// and past ten pairs it stops checking at run time and leaves the loop scalar (10x slower).
#define TRANSFEROPS_INLINE __attribute__((always_inline))

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag becomes a template one.
template <class F>
decltype(auto) with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// Columns handled per work item: the per-column accumulators stay in L1 and the inner loops
// over them vectorize. Such stack arrays are declared 64-byte aligned: GCC 12's AVX-512 build
// had placed the bracket's flags 16 bytes off a 32-byte boundary and stored to them with aligned
// 32-byte moves (a segfault on float64).
constexpr int64_t kBlock = 512;

// Work items are (row, column block) pairs, so a 1-D tensor still splits across threads.
struct Blocks {
  int64_t rows, cols, block, per_row;
  Blocks(const View2D& v, int64_t b) : rows(v.rows), cols(v.cols), block(b), per_row((v.cols + b - 1) / b) {}
  int64_t count() const { return rows * per_row; }
  int64_t row(int64_t item) const { return item / per_row; }
  int64_t col(int64_t item) const { return (item % per_row) * block; }
  int64_t len(int64_t item) const { return std::min(block, cols - col(item)); }
};

// The passes here read T + 1 streams (tasks and a base), a block of each in turn, and the
// hardware prefetcher fell behind them: out of cache, one thread's bracket pass at T = 8 (then
// so) ran at a third of its in-cache rate. So each loop over a block runs in chunks of four
// cache lines, first asking for the lines kPrefetchBytes ahead in each stream. Lines past a
// block's end are those of the next block of the row, which the same thread reads next.
constexpr int64_t kPrefetchBytes = 8192;

// The bracket pass reads the tasks in turn 256 bytes at a time (a step), not a block (8-16 KB)
// at a time, and needs no prefetching: on two cores, nine streams read so ran at 35 GB/s,
// against 20 GB/s by 8 KB (with or without prefetching).
constexpr int64_t kStepBytes = 256;
constexpr int64_t kLocateStep = kStepBytes / 2;  // elements of a step, at most (16-bit values)

template <class S, size_t N, class F>
TRANSFEROPS_INLINE inline void prefetching(const S* const (&streams)[N], int64_t j0, int64_t j1, F&& body) {
  constexpr int64_t line = 64 / int64_t(sizeof(S)), chunk = 4 * line;
  for (int64_t c0 = j0; c0 < j1; c0 += chunk) {
    for (const S* s : streams) {
      const char* ahead = reinterpret_cast<const char*>(s + c0) + kPrefetchBytes;
      for (int l = 0; l < 4; ++l) __builtin_prefetch(ahead + 64 * l);
    }
    body(c0, std::min(j1, c0 + chunk));
  }
}
template <class S, class F>
TRANSFEROPS_INLINE inline void prefetching(const S* stream, int64_t j0, int64_t j1, F&& body) {
  const S* one[1] = {stream};
  prefetching(one, j0, j1, body);
}

// ---- radix select over the bits of |x| ----------------------------------------------------

// The bits of |x| as an unsigned integer: for non-negative IEEE values, integer order is
// value order, so selecting on bits selects on magnitudes.
template <class S> struct AbsKey;
template <> struct AbsKey<float> { using K = uint32_t; static constexpr int bits = 31; };
template <> struct AbsKey<double> { using K = uint64_t; static constexpr int bits = 63; };
template <> struct AbsKey<bf16> { using K = uint16_t; static constexpr int bits = 15; };
template <> struct AbsKey<f16> { using K = uint16_t; static constexpr int bits = 15; };

template <class S>
inline typename AbsKey<S>::K abs_key(const S& x) {
  typename AbsKey<S>::K k;
  std::memcpy(&k, &x, sizeof(k));
  return k & (std::numeric_limits<typename AbsKey<S>::K>::max() >> 1);
}

// Element j of a task vector: the stored value, or with models given (diff) theta - theta_0
// formed in the accumulation type, so no task-vector buffer is ever written.
template <class S, bool diff>
inline auto tau(const S* p, const S* q, int64_t j) {
  if constexpr (diff) return widen(p[j]) - widen(q[j]);
  else return p[j];
}
template <class S, bool diff> using Tau = std::conditional_t<diff, acc_t<S>, S>;

// The tasks' common view, for the select passes that count (histograms) or locate (bracket)
// its elements in 32 bits.
inline const View2D& uint32_view(const std::vector<View2D>& tasks, const char* op) {
  const View2D& v = tasks[0];
  if (uint64_t(v.rows * v.cols) > std::numeric_limits<uint32_t>::max()) {
    throw std::invalid_argument(std::string(op) + ": a view of 2^32 elements or more (split it)");
  }
  return v;
}

// n values from q widened into out: a base's block, read once per task by the loops after it.
template <class S>
inline void widen_block(const S* q, int64_t n, acc_t<S>* out) {
  prefetching(q, 0, n, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) out[j] = widen(q[j]);
  });
}

// The keys of one work item's tasks: the base's block widened once (diff), then each task's
// key at j formed against it, in a form GCC vectorizes.
template <class S, bool diff>
struct ItemKeys {
  alignas(64) acc_t<S> base[kSelectBlock];
  // The base's values at columns c + j0 ... of row r, len of them. Not widen_block: the
  // bracket pass reads a step of 256 bytes at a time, and widen_block's prefetching slowed it
  // (8 bf16 models, 45M elements, two threads: 30.4-32.3 -> 33.3-33.6 ms, A/B alternated).
  void load_base(const View2D* b, int64_t r, int64_t c, int64_t j0, int64_t len) {
    if constexpr (diff) {
      const S* q = b->row<S>(r) + c + j0;
      for (int64_t j = 0; j < len; ++j) base[j0 + j] = widen(q[j]);
    }
  }
  auto operator()(const S* p, int64_t j) const {
    if constexpr (diff) return abs_key(Tau<S, diff>(widen(p[j]) - base[j]));
    else return abs_key(p[j]);
  }
#ifdef __AVX512BW__
  // The keys at j ... j + 15 in 32-bit lanes, formed in registers for the bracket pass, which
  // had stored every key to a buffer and loaded it back (with the one-compare bracket test, a
  // pass over eight bf16 models of 45M elements on one thread went 92 -> 55-59 ms). f16 models
  // take the scalar keys: vcvtph2ps quiets a signaling NaN, and keys must not depend on the ISA.
  __m512i sixteen(const S* p, int64_t j) const {
    static_assert(sizeof(operator()(p, j)) <= 4, "32-bit lanes hold the keys");
    if constexpr (!diff || std::is_same_v<S, float> || std::is_same_v<S, bf16>) {
      __m512i raw;
      if constexpr (sizeof(S) == 4) {
        raw = _mm512_loadu_si512(p + j);
      } else {
        raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j)));
        if constexpr (diff) raw = _mm512_slli_epi32(raw, 16);
      }
      if constexpr (diff) raw = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(raw), _mm512_load_ps(base + j)));
      return _mm512_and_si512(raw, _mm512_set1_epi32(int32_t(typename AbsKey<Tau<S, diff>>::K(~0) >> 1)));
    } else {
      alignas(64) uint32_t k[16];
      for (int i = 0; i < 16; ++i) k[i] = (*this)(p, j + i);
      return _mm512_load_si512(k);
    }
  }
#endif
};

// Histograms of the digit at `shift` for T tasks in one pass, so the shared base (diff) is read
// once for all of them; each task matches its own prefix. `hist` is [T][bins].
template <class S, bool diff>
void digit_histograms(const std::vector<View2D>& tasks, const View2D* base, const std::vector<uint64_t>& prefixes,
                      int shift, int dbits, std::vector<int64_t>& hist) {
  using V = Tau<S, diff>;
  using K = typename AbsKey<V>::K;
  const View2D& v = uint32_view(tasks, "abs_digit_histograms");
  const int T = int(tasks.size());
  const int64_t bins = int64_t(1) << dbits;
  const int high = shift + dbits;
  // The first digit has no higher bits to match (and a shift by the key's width is undefined).
  const bool first = high == AbsKey<V>::bits;
  // Two interleaved copies per task on the unconditional first digit: runs of equal digits
  // (common: magnitudes cluster) then do not wait on the previous increment of one counter.
  const int copies = first ? 2 : 1;
  const Blocks b(v, kSelectBlock);
#pragma omp parallel if (v.rows * v.cols > kParallelMinElements)
  {
    std::vector<uint32_t> local(size_t(T) * copies * bins, 0);
    ItemKeys<S, diff> key;
    alignas(64) K keys[kSelectBlock];
#pragma omp for schedule(static) nowait
    for (int64_t item = 0; item < b.count(); ++item) {
      const int64_t r = b.row(item), c = b.col(item), n = b.len(item);
      key.load_base(base, r, c, 0, n);
      for (int t = 0; t < T; ++t) {
        const S* p = tasks[t].row<S>(r) + c;
        prefetching(p, 0, n, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) keys[j] = key(p, j);  // vectorizes
        });
        uint32_t* h = local.data() + size_t(t) * copies * bins;
        if (first) {
          int64_t j = 0;
          for (; j + 1 < n; j += 2) {
            ++h[keys[j] >> shift];
            ++h[bins + (keys[j + 1] >> shift)];
          }
          if (j < n) ++h[keys[j] >> shift];
        } else {
          // Few keys match a prefix (about 1 in 300 past the first digit): a vectorized count
          // per 64 keys skips most of them without a branch per key.
          const K prefix = K(prefixes[t]);
          for (int64_t j0 = 0; j0 < n; j0 += 64) {
            const int64_t j1 = std::min<int64_t>(n, j0 + 64);
            int hits = 0;
            for (int64_t j = j0; j < j1; ++j) hits += K(keys[j] >> high) == prefix;
            if (hits == 0) continue;
            for (int64_t j = j0; j < j1; ++j) {
              if (K(keys[j] >> high) == prefix) ++h[(keys[j] >> shift) & K(bins - 1)];
            }
          }
        }
      }
    }
#pragma omp critical
    for (int t = 0; t < T; ++t) {
      const uint32_t* h = local.data() + size_t(t) * copies * bins;
      int64_t* out = hist.data() + size_t(t) * bins;
      for (int64_t d = 0; d < bins; ++d) out[d] += h[d] + (first ? h[bins + d] : 0);  // order-free
    }
  }
}

// Elements with key `key` per work item (row, column block), counted in parallel.
template <class S, bool diff>
std::vector<int64_t> equal_per_item(const View2D& v, const View2D* base, const Blocks& b, uint64_t key) {
  std::vector<int64_t> counts(b.count(), 0);
#pragma omp parallel for schedule(static) if (v.rows * v.cols > kParallelMinElements)
  for (int64_t item = 0; item < b.count(); ++item) {
    const S* p = v.row<S>(b.row(item)) + b.col(item);
    const S* q = diff ? base->row<S>(b.row(item)) + b.col(item) : nullptr;
    int64_t c = 0;
    for (int64_t j = 0, n = b.len(item); j < n; ++j) c += uint64_t(abs_key(tau<S, diff>(p, q, j))) == key;
    counts[item] = c;
  }
  return counts;
}

// One parallel counting pass, then a scan of the single block that holds the cut.
template <class S, bool diff>
int64_t equal_cut(const View2D& v, const View2D* base, uint64_t key, int64_t rank) {
  const Blocks b(v, kSelectBlock);
  const std::vector<int64_t> counts = equal_per_item<S, diff>(v, base, b, key);
  int64_t seen = 0;
  for (int64_t item = 0; item < b.count(); ++item) {
    if (seen + counts[item] < rank) {
      seen += counts[item];
      continue;
    }
    const S* p = v.row<S>(b.row(item)) + b.col(item);
    const S* q = diff ? base->row<S>(b.row(item)) + b.col(item) : nullptr;
    for (int64_t j = 0, n = b.len(item); j < n; ++j) {
      if (uint64_t(abs_key(tau<S, diff>(p, q, j))) == key && ++seen == rank) {
        return b.row(item) * v.cols + b.col(item) + j + 1;
      }
    }
  }
  return -seen;
}

// ---- bracketed select: a sample brackets each threshold, one pass finds it ---------------------

inline uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Runs of kSampleRun consecutive elements, one per span of n / runs, at a hashed offset inside
// it: a run costs about one cache line, and the offsets keep the runs out of step with rows.
template <class S, bool diff>
void sample_keys(const std::vector<View2D>& tasks, const View2D* base, int64_t runs, uint64_t seed, uint64_t* out) {
  const View2D& v = tasks[0];
  const int64_t n = v.rows * v.cols, span = n / runs, T = int64_t(tasks.size());
  auto start_of = [&](int64_t i) {
    return i * span + int64_t(mix64(seed * 0x9e3779b97f4a7c15ull + uint64_t(i)) % uint64_t(span - kSampleRun + 1));
  };
  // Each run is a cache miss per task: the loop asks for the lines of the run kAhead ahead,
  // and the threads split the runs.
  constexpr int64_t kAhead = 8;
#pragma omp parallel for schedule(static) if (runs * T * kSampleRun > kParallelMinElements)
  for (int64_t i = 0; i < runs; ++i) {
    if (i + kAhead < runs) {
      const int64_t f = start_of(i + kAhead);
      for (const int64_t g : {f, f + kSampleRun - 1}) {
        const int64_t r = g / v.cols, c = g % v.cols;
        if (diff) __builtin_prefetch(base->row<S>(r) + c);
        for (int64_t t = 0; t < T; ++t) __builtin_prefetch(tasks[t].row<S>(r) + c);
      }
    }
    const int64_t start = start_of(i);
    int64_t r = start / v.cols, c = start % v.cols;  // one division a run (one thread, T = 8: 8.7 -> 7.4 ms)
    for (int64_t e = 0; e < kSampleRun; ++e, ++c) {
      if (c == v.cols) c = 0, ++r;
      const S* q = diff ? base->row<S>(r) + c : nullptr;
      for (int64_t t = 0; t < T; ++t) {
        out[(t * runs + i) * kSampleRun + e] = abs_key(tau<S, diff>(tasks[t].row<S>(r) + c, q, 0));
      }
    }
  }
}

// What a Locator keeps of the keys in a bracket: their count only (a bracket of one key, models
// in 16-bit floats mostly), their positions (a bracket counted in bins), or their positions
// and keys (a listed bracket).
enum class Kept { count, positions, keyed };

// One task's share of a work item in the bracket pass: counts the keys above `top` and the keys
// in [bottom, top], and lists the latter's positions (ascending) and keys as `kept` asks. Keys
// in a bracket are 1-2% of all, at random places. A branch on them mispredicts about once per
// key, and while the pass streamed from memory each misprediction cost 26 ns, against 10 in
// cache. So the streaming loop has no branch on them: portably it sets a flag per key and a
// scan per step lists the set ones; with AVX-512 and keys of 32 bits or fewer it keeps each 16
// keys' compare mask (or counts them in vectors), and the item's masks are scanned at its end,
// when its data are in cache.
template <class K>
class Locator {
 public:
  using Listed = std::conditional_t<sizeof(K) <= 4, uint32_t, uint64_t>;
#ifdef __AVX512BW__
  static constexpr bool masked = sizeof(K) <= 4;
#else
  static constexpr bool masked = false;
#endif
  // Room per item: positions and keys (room_listed each), masks (room_masks).
  static constexpr int64_t room_listed = kSelectBlock, room_masks = kSelectBlock / 16 + 4;

  Locator(Kept kept, K bottom, K top, uint32_t* at, Listed* keys, uint16_t* masks)
      : kept_(kept), bottom_(bottom), top_(top), at_(at), keys_(keys), masks_(masks) {}

  // The keys at positions j0, j0 + 1, ..., len of them, a multiple of 16: keys(j) is the key at
  // j0 + j, or with AVX-512 (masked) the 16 keys from there in a vector.
  template <class F>
  TRANSFEROPS_INLINE void step(F&& keys, int64_t j0, int64_t len) {
    switch (kept_) {
      case Kept::count: return run<Kept::count>(keys, j0, len);
      case Kept::positions: return run<Kept::positions>(keys, j0, len);
      case Kept::keyed: return run<Kept::keyed>(keys, j0, len);
    }
  }
  // After the steps over positions [0, whole): the keys at positions [whole, n), one by one;
  // key_at(j) is the key at j.
  template <class F>
  void finish(int64_t whole, int64_t n, F&& key_at) {
    if (masked && kept_ != Kept::count) {
      std::fill(masks_ + whole / 16, masks_ + whole / 16 + 4, uint16_t(0));
      for (int64_t w = 0; w < whole / 16; w += 4) {
        uint64_t word;
        std::memcpy(&word, masks_ + w, 8);
        for (; word; word &= word - 1) list(16 * w + __builtin_ctzll(word), key_at);
      }
    }
    for (int64_t j = whole; j < n; ++j) {
      const K k = key_at(j);
      above_ += k > top_;
      if (k >= bottom_ && k <= top_) list(j, key_at);
    }
  }
  Kept kept() const { return kept_; }
  int64_t above() const { return above_ + vector_sum(above_v_); }
  int64_t hits() const { return hits_ + (kept_ == Kept::count ? vector_sum(from_bottom_v_) - vector_sum(above_v_) : 0); }

 private:
  template <class F>
  void list(int64_t j, F&& key_at) {
    if (kept_ != Kept::count) at_[hits_] = uint32_t(j);
    if (kept_ == Kept::keyed) keys_[hits_] = Listed(key_at(j));
    ++hits_;
  }
  template <Kept kept, class F>
  TRANSFEROPS_INLINE void run(F&& keys, int64_t j0, int64_t len) {
#ifdef __AVX512BW__
    if constexpr (masked) {
      const __m512i low = _mm512_set1_epi32(int(bottom_)), high = _mm512_set1_epi32(int(top_));
      const __m512i minus_one = _mm512_set1_epi32(-1);
      __m512i above = above_v_, from_bottom = from_bottom_v_;
      for (int64_t j = 0; j < len; j += 16) {
        const __m512i v = keys(j);
        const __mmask16 over = _mm512_cmpgt_epu32_mask(v, high);
        above = _mm512_mask_sub_epi32(above, over, above, minus_one);
        // A count is (keys >= bottom) - (keys > top): one compare and one add a task fewer
        // than testing the bracket itself.
        if constexpr (kept == Kept::count) {
          from_bottom = _mm512_mask_sub_epi32(from_bottom, _mm512_cmpge_epu32_mask(v, low), from_bottom, minus_one);
        } else {
          masks_[(j0 + j) / 16] = _mm512_mask_cmpge_epu32_mask(__mmask16(~over), v, low);
        }
      }
      above_v_ = above, from_bottom_v_ = from_bottom;
    } else
#endif
    {
      int32_t above = 0, from_bottom = 0;
      alignas(64) uint8_t flags[kLocateStep];
      for (int64_t j = 0; j < len; ++j) {  // vectorizes
        const K k = keys(j);
        above += k > top_;
        if constexpr (kept == Kept::count) from_bottom += k >= bottom_;
        else flags[j] = (k >= bottom_) & (k <= top_);
      }
      above_ += above;
      if constexpr (kept == Kept::count) {
        hits_ += from_bottom - above;
      } else {
        for (int64_t j = 0; j < len; j += 8) {
          uint64_t word;
          std::memcpy(&word, flags + j, 8);
          for (; word; word &= word - 1) {
            const int64_t i = j + __builtin_ctzll(word) / 8;
            list(j0 + i, [&](int64_t) { return keys(i); });
          }
        }
      }
    }
  }
#ifdef __AVX512BW__
  static int64_t vector_sum(__m512i v) { return _mm512_reduce_add_epi32(v); }
  __m512i above_v_ = _mm512_setzero_si512(), from_bottom_v_ = _mm512_setzero_si512();
#else
  static int64_t vector_sum(int) { return 0; }
  int above_v_ = 0, from_bottom_v_ = 0;
#endif
  Kept kept_;
  K bottom_, top_;
  uint32_t* at_;
  Listed* keys_;
  uint16_t* masks_;
  int64_t hits_ = 0, above_ = 0;
};

template <class S, bool diff>
BracketResult bracket_typed(const std::vector<View2D>& tasks, const View2D* base, const std::vector<uint64_t>& lo,
                            const std::vector<uint64_t>& hi, const std::vector<std::vector<uint64_t>>& marks, int64_t capacity) {
  using V = Tau<S, diff>;
  using K = typename AbsKey<V>::K;
  const View2D& v = uint32_view(tasks, "abs_bracket");
  const int T = int(tasks.size());
  const Blocks b(v, kSelectBlock);
  BracketResult res;
  res.above.assign(T, 0);
  res.inside.assign(T, 0);
  res.keys.resize(T);
  res.positions.resize(T);
  res.counts.resize(T);
  // Marked keys m_0 < ... < m_last get bins 0, 2, ..., 2 last; the keys strictly between m_i
  // and m_i+1 share bin 2 i + 1.
  auto bins = [&](int t) { return int64_t(2 * marks[t].size() - 1); };
  for (int t = 0; t < T; ++t) {
    if (!marks[t].empty()) res.counts[t].assign(size_t(b.count() * bins(t)), 0);
  }
#pragma omp parallel if (v.rows * v.cols > kParallelMinElements)
  {
    std::vector<int64_t> above(T, 0), inside(T, 0);
    // Per thread, so that no slot is shared; reserved (untouched pages cost nothing), since
    // growing them had cost 40% of the pass in copies and page faults.
    std::vector<std::vector<uint64_t>> kept_keys(T);
    std::vector<std::vector<uint32_t>> kept_at(T);
    for (int t = 0; t < T; ++t) {
      if (marks[t].empty()) kept_keys[t].reserve(size_t(capacity)), kept_at[t].reserve(size_t(capacity));
    }
    using L = Locator<K>;
    using Listed = typename L::Listed;
    std::vector<uint32_t> at(size_t(T * L::room_listed));
    std::vector<Listed> listed(size_t(T * L::room_listed));
    std::vector<uint16_t> masks(size_t(T * L::room_masks));
    std::vector<L> locators;
    locators.reserve(size_t(T));
    ItemKeys<S, diff> key;
    constexpr int64_t step = kStepBytes / int64_t(sizeof(S));
    alignas(64) K keys[L::masked ? 1 : step];
#pragma omp for schedule(static) nowait
    for (int64_t item = 0; item < b.count(); ++item) {
      const int64_t r = b.row(item), c = b.col(item), n = b.len(item), whole = n / 16 * 16;
      locators.clear();
      for (int t = 0; t < T; ++t) {
        const Kept kept = marks[t].size() == 1 ? Kept::count : marks[t].empty() ? Kept::keyed : Kept::positions;
        locators.emplace_back(kept, K(lo[t]), K(hi[t]), at.data() + t * L::room_listed,
                              listed.data() + t * L::room_listed, masks.data() + t * L::room_masks);
      }
      for (int64_t j0 = 0; j0 < whole; j0 += step) {
        const int64_t len = std::min(step, whole - j0);
        key.load_base(base, r, c, j0, len);
        for (int t = 0; t < T; ++t) {
          const S* q = tasks[t].row<S>(r) + c;
#ifdef __AVX512BW__
          if constexpr (L::masked) {
            locators[size_t(t)].step([&](int64_t j) TRANSFEROPS_INLINE { return key.sixteen(q, j0 + j); }, j0, len);
          } else
#endif
          {
            for (int64_t j = 0; j < len; ++j) keys[j] = key(q, j0 + j);  // vectorizes
            locators[size_t(t)].step([&](int64_t j) TRANSFEROPS_INLINE { return keys[j]; }, j0, len);
          }
        }
      }
      key.load_base(base, r, c, whole, n - whole);
      for (int t = 0; t < T; ++t) {
        const S* q = tasks[t].row<S>(r) + c;
        L& loc = locators[size_t(t)];
        loc.finish(whole, n, [&](int64_t j) { return key(q, j); });
        const int64_t hits = loc.hits();
        above[t] += loc.above();
        inside[t] += hits;
        const uint32_t* at_t = at.data() + t * L::room_listed;
        if (loc.kept() == Kept::count) {
          res.counts[t][size_t(item)] += uint32_t(hits);
        } else if (loc.kept() == Kept::keyed) {
          auto& ks = kept_keys[t];
          auto& ps = kept_at[t];
          const size_t held = ks.size(), take = size_t(std::min<int64_t>(hits, capacity - int64_t(held)));
          const Listed* keys_t = listed.data() + t * L::room_listed;
          ks.insert(ks.end(), keys_t, keys_t + take);
          ps.resize(held + take);
          const uint32_t flat = uint32_t(r * v.cols + c);
          for (size_t i = 0; i < take; ++i) ps[held + i] = flat + at_t[i];
        } else {
          for (int64_t i = 0; i < hits; ++i) {
            const uint64_t k = key(q, at_t[i]);
            int64_t below = 0;
            for (const uint64_t m : marks[t]) below += m < k;
            const int64_t bin = 2 * below - (k != marks[t][size_t(below)]);
            ++res.counts[t][size_t(item * bins(t) + bin)];  // one thread owns an item
          }
        }
      }
    }
#pragma omp critical
    for (int t = 0; t < T; ++t) {
      res.above[t] += above[t];
      res.inside[t] += inside[t];
      // More than `capacity` in all reads as an overflow: the caller sees fewer kept than inside.
      size_t held = 0;
      for (const auto& part : res.keys[t]) held += part.size();
      const size_t take = std::min(size_t(capacity) - std::min(size_t(capacity), held), kept_keys[t].size());
      kept_keys[t].resize(take);
      kept_at[t].resize(take);
      res.keys[t].push_back(std::move(kept_keys[t]));
      res.positions[t].push_back(std::move(kept_at[t]));
    }
  }
  return res;
}

// ---- the fused merge pass --------------------------------------------------------------------

// x where c holds, else +0, by a bit mask: GCC vectorizes it to one and, where `c ? x : 0`
// added into an accumulator became two additions and a blend (adding +0 changes a -0).
template <class A>
inline A kept_if(bool c, A x) {
  using K = typename AbsKey<A>::K;
  K bits;
  std::memcpy(&bits, &x, sizeof(x));
  bits &= K(0) - K(c);
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// n + 1 where c holds. AVX-512 adds under a mask in one instruction (the fused pass over eight
// bf16 tasks in cache: 10% faster than adding the 0 or 1); AVX2 adds the 0 or 1 faster (by 8%).
template <class I>
TRANSFEROPS_INLINE inline I counted_if(bool c, I n) {
#ifdef __AVX512F__
  return c ? n + 1 : n;
#else
  return n + c;
#endif
}

template <class S, SignRule rule, bool elect, bool wbefore, bool dare, bool diff>
MergeResult merge_typed(const std::vector<View2D>& tvs, const View2D* base, const View2D& out,
                        const double* weights, const Trim* trims, const Dare* dr, MergeSpec spec) {
  using A = acc_t<S>;
  using K = typename AbsKey<A>::K;
  // PEFT's denominators count the agreeing tasks: integers, which the loop adds as masks.
  using Den = std::conditional_t<wbefore, A, std::make_signed_t<K>>;
  const int T = int(tvs.size());
  const A inf = std::numeric_limits<A>::infinity();
  const K inf_key = abs_key(inf);
  std::vector<A> w(T, A(1));
  std::vector<Trim> tr(T, Trim{0, 0, 0, inf, inf, 0});
  for (int t = 0; t < T; ++t) {
    if (weights) w[t] = A(weights[t]);
    if (trims) tr[t] = trims[t];
  }
  const Dare d = dare ? *dr : Dare{0, 0, 0, 1.0, 0};
  const A rescale = A(d.rescale), lam = A(spec.lam);
  const bool keep_all = d.keep_below >= (uint64_t(1) << 32);
  const uint32_t keep_below = keep_all ? 0u : uint32_t(d.keep_below);
  const bool zero_elects_plus = spec.zero_sign > 0;
  const bool store = out.data != nullptr;
  const Blocks b(tvs[0], kBlock);
  const int64_t cols = tvs[0].cols;
  int64_t nonfinite = 0, sign_sum = 0;
#ifdef __AVX512F__
  // Whether the pass runs the loop written with intrinsics (below).
  constexpr bool intrinsic = elect && rule == SignRule::sum && !wbefore && !dare &&
                             (std::is_same_v<S, float> || std::is_same_v<S, bf16>);
#else
  constexpr bool intrinsic = false;
#endif
  // The most tasks one sweep takes (below). The intrinsic loop keeps eight tasks' kept values in
  // its 32 registers: at eight tasks one sweep ran 15-18% (f32) and 4% (bf16) faster than two
  // groups of four, on one core. GCC's code for the generic loop takes four.
  constexpr int one_sweep_max = intrinsic ? 8 : 4;

#pragma omp parallel for schedule(static) reduction(+ : nonfinite, sign_sum) \
    if (b.rows * b.cols > kParallelMinElements)
  for (int64_t item = 0; item < b.count(); ++item) {
    const int64_t r = b.row(item), c0 = b.col(item), n = b.len(item);
    const int64_t flat0 = r * cols + c0;
    alignas(64) A base_row[diff ? kBlock : 1];  // widened once, not once per task
    if constexpr (diff) widen_block(base->row<S>(r) + c0, n, base_row);
    const uint64_t index0 = uint64_t(d.offset + flat0);
    // Up to one_sweep_max tasks (`whole`, the common case) go in one sweep that keeps each
    // entry's accumulators in registers: the votes first, then the sum over the elected side only.
    // Zeroing, storing and reloading per-entry arrays had been 24 bytes of L1 traffic per element
    // beside T = 2 bf16 models' 6 of input. More tasks go four per sweep (then one by one) over
    // arrays of both sides' sums, loaded and stored once per sweep, not per task (at eight tasks
    // their traffic, not the inputs', bounded the pass). Either way the additions keep task
    // order, so results do not depend on grouping.
    // The block is swept in segments between the trims' cuts, inside each of which every task
    // keeps |v| in one [bound, drop): the cuts fall in one block per task in the tensor, and
    // per-element index compares and selects had cost a third of the loop's instructions.
    const bool whole = T <= one_sweep_max;
    alignas(64) A vote[kBlock], pos_sum[kBlock], neg_sum[kBlock];
    alignas(64) Den pos_den[kBlock], neg_den[kBlock];
    alignas(64) K top[kBlock];
    if (!whole) {
      for (int64_t j = 0; j < n; ++j) {
        vote[j] = pos_sum[j] = neg_sum[j] = A(0);
        pos_den[j] = neg_den[j] = Den(0);
        top[j] = K(0);
      }
    }
    // The block's results in the accumulation type: one loop after either way of sweeping
    // rounds them to S and stores them (none in a counting pass).
    alignas(64) A merged[kBlock];
    const A zero_vote = zero_elects_plus ? A(1) : A(-1);
    auto elects_plus = [&](A vt) TRANSFEROPS_INLINE { return (vt == A(0) ? zero_vote : vt) > A(0); };
    // Entry j from the elected side's sum and denominator (all tasks' sum without an election).
    auto finish = [&](int64_t j, A sum, A den) TRANSFEROPS_INLINE {
      A m = elect ? sum / (den == A(0) ? A(1) : den) : sum;
      if constexpr (diff) m = lam * m + base_row[j];
      return m;
    };
    int32_t bad = 0, signs = 0;  // per block: 32-bit counts vectorize without widening
    auto sweep = [&](int t0, auto group, auto one_sweep, int j0, int j1) TRANSFEROPS_INLINE {
      constexpr int G = decltype(group)::value;
      constexpr bool W = decltype(one_sweep)::value;
      const S* p[G];
      A wt[G], dw[G], bound[G], drop[G];
      for (int g = 0; g < G; ++g) {
        const Trim& m = tr[t0 + g];
        p[g] = tvs[t0 + g].row<S>(r) + c0;
        wt[g] = w[t0 + g];
        dw[g] = wbefore ? w[t0 + g] : A(1);
        bound[g] = A(flat0 + j0 < m.cut ? m.lo : m.hi);
        drop[g] = A(flat0 + j0 < m.drop_cut ? m.drop_lo : m.drop_hi);
      }
      // DARE's draws for the segment, 32 per AVX2 block of eight Philox counters (the
      // per-element Philox that GCC vectorizes in this loop took 2.4x as long).
      alignas(64) uint32_t draw[dare ? G : 1][dare ? kBlock : 1];
      if constexpr (dare) {
        for (int g = 0; g < G; ++g) {
          philox_run(index0 + uint64_t(j0), uint32_t(t0 + g), d.stream, d.seed, j1 - j0, draw[g] + j0);
        }
      }
      // Branch-free selects only, so GCC vectorizes this loop under -fno-trapping-math (check
      // with -fopt-info-vec). No software prefetching: the loop reads its tasks in turn 32-64
      // bytes at a time, and without it ran 10-20% faster (one and two threads, T = 2 and 8).
      int32_t segment_bad = 0, segment_signs = 0;  // local, so that their sums vectorize
      int64_t j = j0;
#ifdef __AVX512F__
      // PEFT's TIES over float32 or bf16 tasks, written with intrinsics: GCC's code for the
      // loop below took 27 instructions per task and 16 entries in groups (two loads of each
      // bf16 vector, |x| twice, v > 0 compared twice, a multiply under a mask then an addition
      // for each side's sum). Here the additions themselves are masked. The same results bit
      // for bit: each sum starts at +0, so it never holds -0, and adding the +0 of an entry not
      // kept or not agreeing changes nothing else. Unaligned accesses: a segment starts at a
      // trim's cut.
      if constexpr (intrinsic) {
        const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)), zero = _mm512_setzero_ps();
        const __m512i minus_one = _mm512_set1_epi32(-1);
        auto values = [&](int g) TRANSFEROPS_INLINE {  // task g's 16 values of tau from j
          __m512 raw;
          if constexpr (std::is_same_v<S, float>) {
            raw = _mm512_loadu_ps(p[g] + j);
          } else {
            const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[g] + j));
            raw = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
          }
          if constexpr (diff) raw = _mm512_sub_ps(raw, _mm512_loadu_ps(base_row + j));
          return raw;
        };
        auto kept = [&](int g, __m512 mag) TRANSFEROPS_INLINE {
          return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(mag, _mm512_set1_ps(bound[g]), _CMP_GE_OQ), mag,
                                         _mm512_set1_ps(drop[g]), _CMP_LT_OQ);
        };
        if constexpr (!W) {
          for (; j + 16 <= j1; j += 16) {
            __m512 vt = _mm512_loadu_ps(vote + j), ps = _mm512_loadu_ps(pos_sum + j), ns = _mm512_loadu_ps(neg_sum + j);
            __m512i pd = _mm512_loadu_si512(pos_den + j), nd = _mm512_loadu_si512(neg_den + j);
            __m512i key = _mm512_loadu_si512(top + j);
            for (int g = 0; g < G; ++g) {
              const __m512 raw = values(g), mag = _mm512_and_ps(raw, sign_off);
              key = _mm512_max_epu32(key, _mm512_castps_si512(mag));
              const __mmask16 in = kept(g, mag);
              const __mmask16 pos = _mm512_mask_cmp_ps_mask(in, raw, zero, _CMP_GT_OQ);
              const __mmask16 neg = _mm512_mask_cmp_ps_mask(in, raw, zero, _CMP_LT_OQ);
              const __m512 wv = _mm512_mul_ps(_mm512_set1_ps(wt[g]), raw);
              vt = _mm512_mask_add_ps(vt, in, vt, raw);
              ps = _mm512_mask_add_ps(ps, pos, ps, wv);
              ns = _mm512_mask_add_ps(ns, neg, ns, wv);
              pd = _mm512_mask_sub_epi32(pd, pos, pd, minus_one);
              nd = _mm512_mask_sub_epi32(nd, neg, nd, minus_one);
            }
            _mm512_storeu_ps(vote + j, vt), _mm512_storeu_ps(pos_sum + j, ps), _mm512_storeu_ps(neg_sum + j, ns);
            _mm512_storeu_si512(pos_den + j, pd), _mm512_storeu_si512(neg_den + j, nd), _mm512_storeu_si512(top + j, key);
          }
        } else {
          // One sweep: the kept values stay in registers (+0 where not kept) between the vote
          // and the sum; a task agrees where its value, with its sign flipped under a minus
          // election, is above 0.
          // With no drop cut and unit weights (PEFT's TIES unweighted), a vector is first tried
          // light: one compare keeps a value (NaN and Inf too), no largest key is tracked and no
          // weight multiplies, 3 of 14 instructions per task. A NaN or Inf input then shows in
          // the vote, and that vector is redone in full, so results and counts do not change.
          const __m512 sign_bit = _mm512_castsi512_ps(_mm512_set1_epi32(int32_t(0x80000000u)));
          const __m512 inf_v = _mm512_set1_ps(inf);
          const __m512i inf_keys = _mm512_set1_epi32(int32_t(inf_key));
          auto merge_sixteen = [&](auto light) TRANSFEROPS_INLINE {  // entries j ... j + 15; false: redo
            constexpr bool L = decltype(light)::value;
            __m512 v[G];
            __m512 vt = zero;
            __m512i key = _mm512_setzero_si512();
            for (int g = 0; g < G; ++g) {
              const __m512 raw = values(g), mag = _mm512_and_ps(raw, sign_off);
              if constexpr (L) {
                v[g] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mag, _mm512_set1_ps(bound[g]), _CMP_NLT_UQ), raw);
              } else {
                key = _mm512_max_epu32(key, _mm512_castps_si512(mag));
                v[g] = _mm512_maskz_mov_ps(kept(g, mag), raw);
              }
              vt = _mm512_add_ps(vt, v[g]);
            }
            if constexpr (L) {
              if (_mm512_cmp_ps_mask(_mm512_and_ps(vt, sign_off), inf_v, _CMP_NLT_UQ)) return false;
            } else {
              segment_bad += __builtin_popcount(_mm512_cmp_epu32_mask(key, inf_keys, _MM_CMPINT_NLT));
            }
            const __mmask16 up = _mm512_cmp_ps_mask(vt, zero, _CMP_GT_OQ), down = _mm512_cmp_ps_mask(vt, zero, _CMP_LT_OQ);
            segment_signs += __builtin_popcount(up) - __builtin_popcount(down);
            const __mmask16 plus = zero_elects_plus ? __mmask16(up | _mm512_cmp_ps_mask(vt, zero, _CMP_EQ_OQ)) : up;
            const __m512 flip = _mm512_maskz_mov_ps(__mmask16(~plus), sign_bit);
            __m512 sum = zero;
            __m512i den = _mm512_setzero_si512();
            for (int g = 0; g < G; ++g) {
              const __mmask16 agree = _mm512_cmp_ps_mask(_mm512_xor_ps(v[g], flip), zero, _CMP_GT_OQ);
              sum = _mm512_mask_add_ps(sum, agree, sum, L ? v[g] : _mm512_mul_ps(_mm512_set1_ps(wt[g]), v[g]));
              den = _mm512_mask_sub_epi32(den, agree, den, minus_one);
            }
            const __m512 by = _mm512_mask_blend_ps(_mm512_test_epi32_mask(den, den), _mm512_set1_ps(1.0f),
                                                   _mm512_cvtepi32_ps(den));
            __m512 m = _mm512_div_ps(sum, by);
            if constexpr (diff) m = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(lam), m), _mm512_loadu_ps(base_row + j));
            _mm512_storeu_ps(merged + j, m);
            return true;
          };
          bool light = true;
          for (int g = 0; g < G; ++g) light &= drop[g] == inf && wt[g] == A(1);
          if (light) {
            for (; j + 16 <= j1; j += 16) {
              if (!merge_sixteen(std::true_type{})) merge_sixteen(std::false_type{});
            }
          } else {
            for (; j + 16 <= j1; j += 16) merge_sixteen(std::false_type{});
          }
        }
      }
#endif
      for (; j < j1; ++j) {
        K key = W ? K(0) : top[j];
        A v[G], wv[G];
        auto take = [&](int g) TRANSFEROPS_INLINE {  // task g's kept value, and the largest key
          const A raw = diff ? widen(p[g][j]) - base_row[j] : widen(p[g][j]);
          const A mag = std::abs(raw);
          key = std::max(key, abs_key(mag));  // NaN and Inf have the largest keys
          v[g] = kept_if(mag >= bound[g] && mag < drop[g], raw);
          if constexpr (dare) v[g] = kept_if(keep_all | (draw[g][j] < keep_below), v[g] / rescale);
          wv[g] = wt[g] * v[g];
        };
        // What task g votes with, and its ballot under the sign rule.
        auto said = [&](int g) TRANSFEROPS_INLINE { return wbefore ? wv[g] : v[g]; };
        auto ballot = [&](int g) TRANSFEROPS_INLINE {
          const A s = said(g);
          return rule == SignRule::sum ? s : kept_if(s > A(0), A(1)) - kept_if(s < A(0), A(1));
        };
        if constexpr (!W) {
          A vt = vote[j], ps = pos_sum[j], ns = neg_sum[j];
          Den pd = pos_den[j], nd = neg_den[j];
          for (int g = 0; g < G; ++g) {  // each task accumulated as it is read: fewer registers live
            take(g);
            if constexpr (!elect) {
              ps += wv[g];
            } else {
              const bool pos = said(g) > A(0), neg = said(g) < A(0);
              vt += ballot(g);
              ps += kept_if(pos, wv[g]);
              ns += kept_if(neg, wv[g]);
              if constexpr (wbefore) {
                pd += kept_if(pos, dw[g]);
                nd += kept_if(neg, dw[g]);
              } else {
                pd = counted_if(pos, pd);
                nd = counted_if(neg, nd);
              }
            }
          }
          vote[j] = vt, pos_sum[j] = ps, neg_sum[j] = ns, pos_den[j] = pd, neg_den[j] = nd, top[j] = key;
        } else {
          for (int g = 0; g < G; ++g) take(g);
          A sum = A(0);
          Den den = Den(0);
          if constexpr (!elect) {
            for (int g = 0; g < G; ++g) sum += wv[g];
          } else {
            A vt = A(0);
            for (int g = 0; g < G; ++g) vt += ballot(g);
            segment_signs += (vt > A(0)) - (vt < A(0));
            const bool plus = elects_plus(vt);
            for (int g = 0; g < G; ++g) {
              // A select of floats: GCC 12 did not vectorize the loop with `plus ? pos : neg`.
              const bool agree = (plus ? said(g) : -said(g)) > A(0);
              sum += kept_if(agree, wv[g]);
              if constexpr (wbefore) den += kept_if(agree, dw[g]);
              else den = counted_if(agree, den);
            }
          }
          segment_bad += key >= inf_key;
          merged[j] = finish(j, sum, A(den));
        }
      }
      bad += segment_bad;
      signs += segment_signs;
    };
    for (int j0 = 0, j1; j0 < int(n); j0 = j1) {
      j1 = int(n);  // the next cut after j0
      for (int t = 0; t < T; ++t) {
        for (const int64_t at : {tr[t].cut - flat0, tr[t].drop_cut - flat0}) {
          if (at > j0 && at < j1) j1 = int(at);
        }
      }
      if (!whole) {
        int t0 = 0;
        for (; t0 + 4 <= T; t0 += 4) sweep(t0, std::integral_constant<int, 4>{}, std::false_type{}, j0, j1);
        for (; t0 < T; ++t0) sweep(t0, std::integral_constant<int, 1>{}, std::false_type{}, j0, j1);
      } else if (T > 4) {
        if constexpr (one_sweep_max == 8) {
          switch (T) {
            case 8: sweep(0, std::integral_constant<int, 8>{}, std::true_type{}, j0, j1); break;
            case 7: sweep(0, std::integral_constant<int, 7>{}, std::true_type{}, j0, j1); break;
            case 6: sweep(0, std::integral_constant<int, 6>{}, std::true_type{}, j0, j1); break;
            default: sweep(0, std::integral_constant<int, 5>{}, std::true_type{}, j0, j1);
          }
        }
      } else {
        switch (T) {
          case 4: sweep(0, std::integral_constant<int, 4>{}, std::true_type{}, j0, j1); break;
          case 3: sweep(0, std::integral_constant<int, 3>{}, std::true_type{}, j0, j1); break;
          case 2: sweep(0, std::integral_constant<int, 2>{}, std::true_type{}, j0, j1); break;
          default: sweep(0, std::integral_constant<int, 1>{}, std::true_type{}, j0, j1);
        }
      }
    }
    if (!whole) {  // separate simple loops, each of which vectorizes
      for (int64_t j = 0; j < n; ++j) bad += top[j] >= inf_key;
      if constexpr (elect) {
        for (int64_t j = 0; j < n; ++j) signs += (vote[j] > A(0)) - (vote[j] < A(0));
      }
      if (store) {
        for (int64_t j = 0; j < n; ++j) {
          const bool plus = !elect || elects_plus(vote[j]);
          merged[j] = finish(j, plus ? pos_sum[j] : neg_sum[j], plus ? A(pos_den[j]) : A(neg_den[j]));
        }
      }
    }
    nonfinite += bad;
    sign_sum += signs;
    if (store) {
      S* o = out.row<S>(r) + c0;
      for (int64_t j = 0; j < n; ++j) o[j] = narrow<S>(merged[j]);
    }
  }
  return {nonfinite, sign_sum};
}

// Fisher merging, one pass: numerator and denominator accumulate per column block.
template <class S>
FisherResult fisher_typed(const std::vector<View2D>& models, const std::vector<View2D>& fishers, const View2D& out,
                          const double* weights, double eps) {
  using A = acc_t<S>;
  const int T = int(models.size());
  const Blocks b(out, kBlock);
  const A floor = A(eps);
  int64_t nonfinite = 0, negative = 0;
#pragma omp parallel for schedule(static) reduction(+ : nonfinite, negative) \
    if (out.rows * out.cols > kParallelMinElements)
  for (int64_t item = 0; item < b.count(); ++item) {
    const int64_t r = b.row(item), c0 = b.col(item), n = b.len(item);
    alignas(64) A num[kBlock], den[kBlock], nf[kBlock], neg[kBlock];
    for (int64_t j = 0; j < n; ++j) num[j] = den[j] = nf[j] = neg[j] = A(0);
    for (int t = 0; t < T; ++t) {
      const S* p = models[t].row<S>(r) + c0;
      const S* f = fishers[t].row<S>(r) + c0;
      const A w = weights ? A(weights[t]) : A(1);
      const S* streams[2] = {p, f};
      prefetching(streams, 0, n, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {  // vectorizes
          const A theta = widen(p[j]), fisher = widen(f[j]);
          nf[j] += (theta - theta) + (fisher - fisher);  // 0 unless some input is NaN or Inf
          neg[j] += fisher < A(0) ? A(1) : A(0);
          const A wf = w * (fisher < floor ? floor : fisher);
          num[j] += wf * theta;
          den[j] += wf;
        }
      });
    }
    int64_t bad = 0, below = 0;
    for (int64_t j = 0; j < n; ++j) bad += nf[j] != A(0);
    for (int64_t j = 0; j < n; ++j) below += neg[j] != A(0);
    nonfinite += bad;
    negative += below;
    S* o = out.row<S>(r) + c0;
    for (int64_t j = 0; j < n; ++j) o[j] = narrow<S>(num[j] / den[j]);
  }
  return {nonfinite, negative};
}

// The keys for which in(key) holds, in order (`room`: at least how many do). Each key is written
// and kept where it holds, without a branch that would mispredict on keys at random places.
template <class F>
std::vector<uint64_t> kept_where(const uint64_t* keys, int64_t n, size_t room, F&& in) {
  std::vector<uint64_t> kept(room + 1);
  size_t held = 0;
  for (int64_t i = 0; i < n; ++i) {
    kept[held] = keys[i];
    held += in(keys[i]);
  }
  kept.resize(held);
  return kept;
}

// Order statistics of a sample's keys without sorting them all: a histogram of 2^16 digits of
// key - min over their range, then only the digit holding a wanted position, sorted on demand.
// numpy's version over the uint64 keys of a 2^18-key sample had cost 1.2-1.7 ms per task and
// tensor (a seventh of a merge of eight bf16 models). Also picks the k-th of a bracket's keys.
class SampleOrder {
 public:
  SampleOrder(const uint64_t* keys, int64_t n) : keys_(keys), n_(n) {
    uint64_t mn = keys[0], mx = keys[0];
    for (int64_t i = 0; i < n; ++i) mn = std::min(mn, keys[i]), mx = std::max(mx, keys[i]);
    min_ = mn;
    shift_ = std::max(0, 64 - __builtin_clzll((mx - mn) | 1) - 16);
    ends_.assign((size_t(1) << 16) + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++ends_[((keys[i] - min_) >> shift_) + 1];
    for (size_t d = 1; d < ends_.size(); ++d) ends_[d] += ends_[d - 1];  // ends_[d]: keys of digits < d
  }
  // The key at position i (0-based) of the keys sorted ascending.
  uint64_t operator()(int64_t i) {
    const int64_t d = std::upper_bound(ends_.begin(), ends_.end(), i) - ends_.begin() - 1;
    if (shift_ == 0) return min_ + uint64_t(d);
    auto it = std::find_if(sorted_.begin(), sorted_.end(), [&](const auto& b) { return b.first == d; });
    if (it == sorted_.end()) {
      std::vector<uint64_t> digit =
          kept_where(keys_, n_, size_t(ends_[d + 1] - ends_[d]), [&](uint64_t k) { return int64_t((k - min_) >> shift_) == d; });
      std::sort(digit.begin(), digit.end());
      it = sorted_.insert(sorted_.end(), {d, std::move(digit)});
    }
    return it->second[size_t(i - ends_[d])];
  }

 private:
  const uint64_t* keys_;
  int64_t n_;
  uint64_t min_;
  int shift_;
  std::vector<int64_t> ends_;
  std::vector<std::pair<int64_t, std::vector<uint64_t>>> sorted_;
};

SampleBracket sample_bracket(const uint64_t* keys, int64_t runs, double q, int64_t numel, int nbits, int max_marks) {
  const int64_t s = runs * kSampleRun;
  SampleOrder select(keys, s);
  const uint64_t guess = select(s - 1 - std::min(int64_t(q * double(s)), s - 1));
  std::vector<double> share(size_t(runs), 0.0);  // per run, the share of its keys >= guess
  double mean = 0.0, var = 0.0;
  for (int64_t r = 0; r < runs; ++r) {
    int count = 0;
    for (int64_t j = 0; j < kSampleRun; ++j) count += keys[r * kSampleRun + j] >= guess;
    share[r] = double(count) / double(kSampleRun);
    mean += share[r];
  }
  mean /= double(runs);
  for (const double x : share) var += (x - mean) * (x - mean);
  const double spread = std::sqrt(var / double(runs)) / std::sqrt(double(runs));
  const double margin = 4 * std::max(spread, std::sqrt(q * (1 - q) / double(s))) + 4.0 / double(s);
  const auto top = int64_t(std::floor((q - margin) * double(s))), bottom = int64_t(std::ceil((q + margin) * double(s)));
  SampleBracket b;
  b.hi = top >= 0 ? select(s - 1 - top) : (uint64_t(1) << nbits) - 1;
  b.lo = bottom < s ? select(s - 1 - bottom) : 0;
  std::vector<uint64_t> inside = kept_where(keys, s, size_t(s), [&](uint64_t k) { return (k >= b.lo) & (k <= b.hi); });
  std::sort(inside.begin(), inside.end());
  b.expected = double(inside.size()) / double(s) * double(numel);
  std::vector<std::pair<int64_t, uint64_t>> counted;  // (count, key)
  for (size_t i = 0; i < inside.size();) {
    size_t j = i;
    while (j < inside.size() && inside[j] == inside[i]) ++j;
    counted.emplace_back(int64_t(j - i), inside[i]);
    i = j;
  }
  std::sort(counted.begin(), counted.end(), std::greater<>());
  // A large bracket with heavy ties: its ends and heaviest keys are marked, and the pass counts
  // per block between them, where a list of every key inside would not fit.
  if (b.expected > double(1 << 16) && !counted.empty() && 4 * size_t(counted.front().first) >= inside.size()) {
    b.marks = {b.lo, b.hi};
    for (size_t i = 0; i < counted.size() && int64_t(i) < int64_t(max_marks) - 2; ++i) b.marks.push_back(counted[i].second);
    std::sort(b.marks.begin(), b.marks.end());
    b.marks.erase(std::unique(b.marks.begin(), b.marks.end()), b.marks.end());
  }
  return b;
}

}  // namespace

MergeResult merge_impl(const std::vector<View2D>& tvs, const View2D* base, const View2D& out,
                       const double* weights, const Trim* trims, const Dare* dare, MergeSpec spec) {
  return dispatch_float(tvs[0].dtype, [&](auto tag) -> MergeResult {
    using S = decltype(tag);
    return with_flag(spec.elect, [&](auto elect) {
      // Without an election the sign rule and the weights' place do not matter: one instance.
      return with_flag(elect && spec.rule == SignRule::count, [&](auto count) {
        return with_flag(elect && spec.weight_before_election, [&](auto wbefore) {
          return with_flag(dare != nullptr, [&](auto use_dare) {
            return with_flag(base != nullptr, [&](auto diff) {
              constexpr SignRule rule = decltype(count)::value ? SignRule::count : SignRule::sum;
              return merge_typed<S, rule, decltype(elect)::value, decltype(wbefore)::value,
                                 decltype(use_dare)::value, decltype(diff)::value>(tvs, base, out, weights,
                                                                                  trims, dare, spec);
            });
          });
        });
      });
    });
  });
}

FisherResult fisher_impl(const std::vector<View2D>& models, const std::vector<View2D>& fishers, const View2D& out,
                         const double* weights, double eps) {
  return dispatch_float(out.dtype, [&](auto tag) { return fisher_typed<decltype(tag)>(models, fishers, out, weights, eps); });
}

std::vector<int64_t> histograms_impl(const std::vector<View2D>& tasks, const View2D* base,
                                     const std::vector<uint64_t>& prefixes, int shift, int dbits) {
  return dispatch_float(tasks[0].dtype, [&](auto tag) {
    using S = decltype(tag);
    return with_flag(base != nullptr, [&](auto diff) {
      constexpr bool D = decltype(diff)::value;
      if (dbits < 1 || dbits > 16 || shift < 0 || shift + dbits > AbsKey<Tau<S, D>>::bits) {
        throw std::invalid_argument("abs_digit_histograms: digit out of the key's range");
      }
      std::vector<int64_t> hist(tasks.size() << dbits, 0);
      digit_histograms<S, D>(tasks, base, prefixes, shift, dbits, hist);
      return hist;
    });
  });
}

int64_t equal_cut_impl(const View2D& view, const View2D* base, uint64_t key, int64_t rank) {
  return dispatch_float(view.dtype, [&](auto tag) {
    return with_flag(base != nullptr, [&](auto diff) { return equal_cut<decltype(tag), decltype(diff)::value>(view, base, key, rank); });
  });
}

BracketResult bracket_impl(const std::vector<View2D>& tasks, const View2D* base, const std::vector<uint64_t>& lo,
                           const std::vector<uint64_t>& hi, const std::vector<std::vector<uint64_t>>& marks, int64_t capacity) {
  return dispatch_float(tasks[0].dtype, [&](auto tag) {
    return with_flag(base != nullptr, [&](auto diff) {
      return bracket_typed<decltype(tag), decltype(diff)::value>(tasks, base, lo, hi, marks, capacity);
    });
  });
}

std::vector<SampleBracket> sample_brackets_impl(const uint64_t* keys, int64_t tasks, int64_t runs, double q,
                                                int64_t numel, int nbits, int max_marks) {
  std::vector<SampleBracket> out(size_t(tasks), SampleBracket{});
#pragma omp parallel for schedule(dynamic, 1) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) out[t] = sample_bracket(keys + t * runs * kSampleRun, runs, q, numel, nbits, max_marks);
  return out;
}

uint64_t order_statistic_impl(const uint64_t* keys, int64_t n, int64_t i) { return SampleOrder(keys, n)(i); }

}  // namespace TRANSFEROPS_ISA

#ifdef TRANSFEROPS_ISA_BASE
#define TRANSFEROPS_MERGE_IMPLS                                                                       \
  MergeResult merge_impl(const std::vector<View2D>& tvs, const View2D* base, const View2D& out,       \
                         const double* weights, const Trim* trims, const Dare* dare, MergeSpec spec); \
  FisherResult fisher_impl(const std::vector<View2D>& models, const std::vector<View2D>& fishers,     \
                           const View2D& out, const double* weights, double eps);                     \
  std::vector<int64_t> histograms_impl(const std::vector<View2D>& tasks, const View2D* base,          \
                                       const std::vector<uint64_t>& prefixes, int shift, int dbits);  \
  int64_t equal_cut_impl(const View2D& view, const View2D* base, uint64_t key, int64_t rank);         \
  BracketResult bracket_impl(const std::vector<View2D>& tasks, const View2D* base,                    \
                             const std::vector<uint64_t>& lo, const std::vector<uint64_t>& hi,        \
                             const std::vector<std::vector<uint64_t>>& marks, int64_t capacity);        \
  std::vector<SampleBracket> sample_brackets_impl(const uint64_t* keys, int64_t tasks, int64_t runs, double q, \
                                                  int64_t numel, int nbits, int max_marks);                  \
  uint64_t order_statistic_impl(const uint64_t* keys, int64_t n, int64_t i);
TRANSFEROPS_IF_AVX2(namespace avx2 { TRANSFEROPS_MERGE_IMPLS })
TRANSFEROPS_IF_AVX512(namespace avx512 { TRANSFEROPS_MERGE_IMPLS })

std::vector<int64_t> abs_digit_histograms(const std::vector<View2D>& tasks, const View2D* base,
                                          const std::vector<uint64_t>& prefixes, int shift, int dbits) {
  if (tasks.empty()) throw std::invalid_argument("abs_digit_histograms: no tasks");
  if (prefixes.size() != tasks.size()) throw std::invalid_argument("abs_digit_histograms: one prefix per task");
  TRANSFEROPS_RUN_UP_TO_AVX512(histograms_impl(tasks, base, prefixes, shift, dbits));
}

int64_t abs_equal_cut(const View2D& view, const View2D* base, uint64_t key, int64_t rank) {
  if (rank < 1) throw std::invalid_argument("abs_equal_cut: rank must be >= 1");
  TRANSFEROPS_RUN_UP_TO_AVX512(equal_cut_impl(view, base, key, rank));
}

void abs_sample_keys(const std::vector<View2D>& tasks, const View2D* base, int64_t runs, uint64_t seed,
                     uint64_t* out) {
  if (tasks.empty()) throw std::invalid_argument("abs_sample_keys: no tasks");
  if (runs < 1 || runs * kSampleRun > tasks[0].rows * tasks[0].cols) {
    throw std::invalid_argument("abs_sample_keys: runs must be >= 1 and fit the view");
  }
  dispatch_float(tasks[0].dtype, [&](auto tag) {
    base::with_flag(base != nullptr, [&](auto diff) {
      base::sample_keys<decltype(tag), decltype(diff)::value>(tasks, base, runs, seed, out);
      return 0;
    });
    return 0;
  });
}

uint64_t abs_order_statistic(const uint64_t* keys, int64_t n, int64_t i) {
  if (i < 0 || i >= n) throw std::invalid_argument("abs_order_statistic: position i must lie in [0, keys)");
  TRANSFEROPS_RUN_UP_TO_AVX512(order_statistic_impl(keys, n, i));
}

std::vector<SampleBracket> abs_sample_brackets(const uint64_t* keys, int64_t tasks, int64_t runs, double q,
                                               int64_t numel, int nbits, int max_marks) {
  if (tasks < 1 || runs < 1) throw std::invalid_argument("abs_sample_brackets: keys must hold >= 1 task and run");
  if (!(q > 0.0 && q < 1.0)) throw std::invalid_argument("abs_sample_brackets: q must lie in (0, 1)");
  if (nbits < 1 || nbits > 63) throw std::invalid_argument("abs_sample_brackets: nbits must lie in [1, 63]");
  if (max_marks < 2) throw std::invalid_argument("abs_sample_brackets: max_marks must be >= 2");
  TRANSFEROPS_RUN_UP_TO_AVX512(sample_brackets_impl(keys, tasks, runs, q, numel, nbits, max_marks));
}

BracketResult abs_bracket(const std::vector<View2D>& tasks, const View2D* base, const std::vector<uint64_t>& lo,
                          const std::vector<uint64_t>& hi, const std::vector<std::vector<uint64_t>>& marks, int64_t capacity) {
  const size_t T = tasks.size();
  if (T == 0) throw std::invalid_argument("abs_bracket: no tasks");
  if (lo.size() != T || hi.size() != T || marks.size() != T) {
    throw std::invalid_argument("abs_bracket: one lo, hi and list of marks per task");
  }
  for (size_t t = 0; t < T; ++t) {
    if (lo[t] > hi[t]) throw std::invalid_argument("abs_bracket: lo above hi");
    const auto& m = marks[t];
    if (!m.empty() && (m.front() != lo[t] || m.back() != hi[t] || !std::is_sorted(m.begin(), m.end()) ||
                       std::adjacent_find(m.begin(), m.end()) != m.end())) {
      throw std::invalid_argument("abs_bracket: marks must be empty or rise strictly from lo to hi");
    }
  }
  if (capacity < 0) throw std::invalid_argument("abs_bracket: capacity must be >= 0");
  TRANSFEROPS_RUN_UP_TO_AVX512(bracket_impl(tasks, base, lo, hi, marks, capacity));
}

MergeResult merge(const std::vector<View2D>& tvs, const View2D* base, const View2D& out, const double* weights,
                  const Trim* trims, const Dare* dare, MergeSpec spec) {
  TRANSFEROPS_RUN_UP_TO_AVX512(merge_impl(tvs, base, out, weights, trims, dare, spec));
}

FisherResult fisher_average(const std::vector<View2D>& models, const std::vector<View2D>& fishers, const View2D& out,
                            const double* weights, double eps) {
  if (models.empty() || fishers.size() != models.size()) {
    throw std::invalid_argument("fisher_average: expected one Fisher per model, and at least one model");
  }
  TRANSFEROPS_RUN_UP_TO_AVX512(fisher_impl(models, fishers, out, weights, eps));
}
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
