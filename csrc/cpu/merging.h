// CPU kernels of the merging hot path. Plain C++17: no Python headers, testable alone.
#pragma once
#include <cstdint>
#include <vector>

#include "common/view.h"
#include "cpu/isa.h"

namespace transferops::cpu {

enum class SignRule : int { sum = 0, count = 1 };

// Per task: entries kept by a trim are |v| >= lo at flat index < cut and |v| >= hi after it,
// where hi is the next float above lo (so "> threshold"), i.e. a top-k set; entries of a
// second, smaller top-k set (the same form, drop_*) are dropped again (Model Breadcrumbs'
// outliers). No trim: lo = hi = 0; no drop: drop_lo = drop_hi = +inf. cpu/topk.h finds them.
struct Trim {
  double lo, hi;
  int64_t cut;
  double drop_lo, drop_hi;
  int64_t drop_cut;
};

// DARE (Yu et al., ICML 2024): keep each entry of task t with probability keep_below[t] / 2^32,
// where its Philox draw (common/philox.h) of (flat element index, task index, stream; seed) <
// keep_below[t] (2^32 keeps all), and divide survivors by rescale[t] (the density, PEFT; 1 for
// none: mergekit, whose L1 rescale comes as `scales`). Both arrays hold one value per task.
// `offset` is the flat index of the views' first element in the whole tensor, so a tensor merged
// in chunks draws the same mask.
struct Dare {
  uint64_t seed;
  uint32_t stream;
  const uint64_t* keep_below;
  const double* rescale;
  int64_t offset;
};

struct MergeSpec {
  bool elect;                   // TIES sign election + disjoint mean; false: weighted sum
  SignRule rule;                // how the sign is elected
  bool weight_before_election;  // mergekit: elect on w_t * tv_t and divide by the agreeing
                                // weight; PEFT: elect on tv_t and divide by the agreeing count
  bool normalize;               // election: divide by that count or weight (false: by 1, mergekit's
                                // normalize: false); sum: divide by sum_t w_t (mergekit's
                                // normalize: true; by 1 where |sum_t w_t| < 1e-8)
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
// by magnitude and/or DARE (both optional) and multiply what task t keeps by scales[t], then
// either out = sum_t w_t tv_t, or elect s = sign of the vote (zero elects zero_sign) and
// out = (sum over agreeing t of w_t tv_t) / den, den = their count (PEFT) or their weight w_t
// (mergekit: unscaled), 1 where it is 0 (see MergeSpec::normalize). Zeros never vote nor count.
// All views share rows, cols, dtype. `weights`, `scales`, `trims` and `dare` may be null (all
// ones, no trim, no DARE). With `base`, the views hold models theta_t: tv_t = theta_t - base is
// formed in the accumulation type and out = base + lam * merged. An `out` with null data is not
// written (a counting pass).
MergeResult merge(const std::vector<View2D>& task_vectors, const View2D* base, const View2D& out,
                  const double* weights, const double* scales, const Trim* trims, const Dare* dare,
                  MergeSpec spec);

// The L1 norms of each task vector and of what its trim and DARE keep (before any rescale), for
// mergekit's rescale of the kept values to the task vector's L1 norm. The views' first element
// is at flat index `offset` of the whole tensor (DARE draws by dare->offset, as in merge). Sums
// are partial, per block of kL1Block flat indices of the whole tensor (aligned to multiples of
// kL1Block from its start): the b-th block the views touch writes
// partials[(b * T + t) * 2 + {0: sum |tv_t|, 1: sum |kept tv_t|}], summed in an order fixed by
// the block alone. Views that start on a block boundary therefore give a block the same bits
// however the tensor is split and whatever the thread count, and the caller adds the blocks
// exactly. NaN or Inf inputs make the sums NaN or Inf; the merge pass counts them.
constexpr int64_t kL1Block = 4096;
int64_t l1_blocks(int64_t offset, int64_t numel);  // how many blocks views of numel elements touch
void kept_l1(const std::vector<View2D>& task_vectors, const View2D* base, const Trim* trims, const Dare* dare,
             int64_t offset, double* partials);

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
