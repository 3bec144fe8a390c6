// The top-k select's passes over the data (cpu/topk.h). Compiled three times on x86-64 (see
// cpu/isa.h); the entry points pick one build at run time, and every build counts, keeps and
// bins the same keys.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/abs_key.h"
#include "cpu/blocks.h"
#include "cpu/topk.h"

#ifdef __AVX512BW__
#include <immintrin.h>
#endif

namespace transferops::cpu {
namespace TRANSFEROPS_ISA {
namespace {

// The bracket pass reads the tasks in turn 256 bytes at a time (a step), not a block (8-16 KB)
// at a time: short runs of many streams, which the hardware prefetcher follows unaided.
constexpr int64_t kStepBytes = 256;
constexpr int64_t kLocateStep = kStepBytes / 2;  // elements of a step, at most (16-bit values)

// The tasks' common view, for the select passes that count (histograms) or locate (bracket)
// its elements in 32 bits.
inline const View2D& uint32_view(const std::vector<View2D>& tasks, const char* op) {
  const View2D& v = tasks[0];
  if (uint64_t(v.rows * v.cols) > std::numeric_limits<uint32_t>::max()) {
    throw std::invalid_argument(std::string(op) + ": a view of 2^32 elements or more (split it)");
  }
  return v;
}

// The keys of one work item's tasks: the base's block widened once (diff), then each task's
// key at j formed against it, in a form GCC vectorizes.
template <class S, bool diff>
struct ItemKeys {
  alignas(64) acc_t<S> base[kSelectBlock];
  // The base's values at columns c + j0 ... of row r, len of them, without software
  // prefetching: the bracket pass reads a step of 256 bytes at a time (see kStepBytes).
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
  // The keys at j ... j + 15 in 32-bit lanes, formed in registers for the bracket pass, not
  // stored to a buffer and loaded back. f16 models take the scalar keys: vcvtph2ps quiets a
  // signaling NaN, and keys must not depend on the ISA.
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
    int64_t r = start / v.cols, c = start % v.cols;  // one division a run, not one per element
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
// key, and a misprediction costs most while the pass streams from memory. So the streaming
// loop has no branch on them: portably it sets a flag per key and a
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
    // Per thread, so that no slot is shared; reserved (untouched pages cost nothing), so that
    // they never grow by copies and page faults.
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
// key - min over their range, then only the digit holding a wanted position, sorted on demand,
// where a full sort of a 2^18-key sample per task and tensor would weigh on a merge. Also picks
// the k-th of a bracket's keys.
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
#define TRANSFEROPS_TOPK_IMPLS                                                                        \
  std::vector<int64_t> histograms_impl(const std::vector<View2D>& tasks, const View2D* base,          \
                                       const std::vector<uint64_t>& prefixes, int shift, int dbits);  \
  int64_t equal_cut_impl(const View2D& view, const View2D* base, uint64_t key, int64_t rank);         \
  BracketResult bracket_impl(const std::vector<View2D>& tasks, const View2D* base,                    \
                             const std::vector<uint64_t>& lo, const std::vector<uint64_t>& hi,        \
                             const std::vector<std::vector<uint64_t>>& marks, int64_t capacity);      \
  std::vector<SampleBracket> sample_brackets_impl(const uint64_t* keys, int64_t tasks, int64_t runs,  \
                                                  double q, int64_t numel, int nbits, int max_marks); \
  uint64_t order_statistic_impl(const uint64_t* keys, int64_t n, int64_t i);
TRANSFEROPS_IF_AVX2(namespace avx2 { TRANSFEROPS_TOPK_IMPLS })
TRANSFEROPS_IF_AVX512(namespace avx512 { TRANSFEROPS_TOPK_IMPLS })

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
#endif  // TRANSFEROPS_ISA_BASE

}  // namespace transferops::cpu
