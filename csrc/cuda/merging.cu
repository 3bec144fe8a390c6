#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/merging.h"

namespace transferops::cuda {
namespace {

struct MergeParams {
  const void* tv[kMaxTasks];
  int64_t tv_stride[kMaxTasks];
  double w[kMaxTasks];
  int T;
  int rule;
  int64_t rows, cols, out_stride;
  void* out;
  unsigned long long* nonfinite;
};

__device__ inline float widen(float v) { return v; }
__device__ inline double widen(double v) { return v; }
__device__ inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float widen(__half v) { return __half2float(v); }
template <class S, class A> __device__ inline S narrow(A v) { return S(v); }
template <> __device__ inline __nv_bfloat16 narrow<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ inline __half narrow<__half, float>(float v) { return __float2half_rn(v); }

// One thread per element, grid-stride; the single-pass accumulation mirrors the CPU kernel so
// both backends keep and drop the same entries.
template <class S, class A>
__global__ void disjoint_merge_kernel(const __grid_constant__ MergeParams p) {
  const int64_t n = p.rows * p.cols;
  unsigned long long bad = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, c = i - r * p.cols;
    A vote = 0, pos_sum = 0, neg_sum = 0, pos_cnt = 0, neg_cnt = 0, nf = 0;
    for (int t = 0; t < p.T; ++t) {
      const A v = widen(static_cast<const S*>(p.tv[t])[r * p.tv_stride[t] + c]);
      const bool pos = v > A(0), neg = v < A(0);
      nf += v - v;  // stays 0 unless some input here is NaN or Inf
      vote += p.rule == 0 ? v : A(pos) - A(neg);
      const A wv = A(p.w[t]) * v;
      pos_sum += pos ? wv : A(0);
      neg_sum += neg ? wv : A(0);
      pos_cnt += A(pos);
      neg_cnt += A(neg);
    }
    const A merged = vote >= A(0) ? pos_sum / max(pos_cnt, A(1)) : neg_sum / max(neg_cnt, A(1));
    static_cast<S*>(p.out)[r * p.out_stride + c] = narrow<S, A>(merged);
    bad += nf != A(0);
  }
  if (bad) atomicAdd(p.nonfinite, bad);
}

}  // namespace

void disjoint_merge(const std::vector<View2D>& tvs, const View2D& out, const double* weights,
                    int rule, int64_t* nonfinite, uintptr_t stream) {
  if (tvs.empty() || int(tvs.size()) > kMaxTasks) {
    throw std::invalid_argument("cuda disjoint_merge takes 1 to " + std::to_string(kMaxTasks) +
                                " task vectors, got " + std::to_string(tvs.size()));
  }
  MergeParams p{};
  p.T = int(tvs.size());
  for (int t = 0; t < p.T; ++t) {
    p.tv[t] = tvs[t].data;
    p.tv_stride[t] = tvs[t].row_stride;
    p.w[t] = weights ? weights[t] : 1.0;
  }
  p.rule = rule;
  p.rows = out.rows;
  p.cols = out.cols;
  p.out_stride = out.row_stride;
  p.out = out.data;
  p.nonfinite = reinterpret_cast<unsigned long long*>(nonfinite);
  const int64_t n = out.rows * out.cols;
  if (n == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((n + threads - 1) / threads, 65536));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (out.dtype) {
    case DType::f32: disjoint_merge_kernel<float, float><<<blocks, threads, 0, s>>>(p); break;
    case DType::f64: disjoint_merge_kernel<double, double><<<blocks, threads, 0, s>>>(p); break;
    case DType::bf16: disjoint_merge_kernel<__nv_bfloat16, float><<<blocks, threads, 0, s>>>(p); break;
    case DType::f16: disjoint_merge_kernel<__half, float><<<blocks, threads, 0, s>>>(p); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("disjoint_merge kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace transferops::cuda
