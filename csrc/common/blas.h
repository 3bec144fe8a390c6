// BLAS GEMM entry points, taken at run time from scipy.linalg.cython_blas capsules (the module
// links no BLAS of its own): LP64 Fortran conventions, column-major, everything by pointer.
#pragma once
#include <cstdint>
#include <type_traits>

namespace transferops {

struct Gemm {
  void (*sgemm)(char* ta, char* tb, int* m, int* n, int* k, float* alpha, float* a, int* lda, float* b, int* ldb,
                float* beta, float* c, int* ldc);
  void (*dgemm)(char* ta, char* tb, int* m, int* n, int* k, double* alpha, double* a, int* lda, double* b, int* ldb,
                double* beta, double* c, int* ldc);
};

// Row-major C [m x n] = alpha op(A) op(B) + beta C, op(X) = X^T where trans_x; lda, ldb, ldc are
// row strides. A row-major matrix is its transpose in column-major, so this is the
// column-major product C^T = op(B)^T op(A)^T with the operands swapped and the flags kept.
template <class T>
void gemm_rm(const Gemm& g, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
             int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  if constexpr (std::is_same_v<T, float>) {
    g.sgemm(&ta, &tb, &M, &N, &K, &alpha, const_cast<T*>(b), &LDA, const_cast<T*>(a), &LDB, &beta, c, &LDC);
  } else {
    g.dgemm(&ta, &tb, &M, &N, &K, &alpha, const_cast<T*>(b), &LDA, const_cast<T*>(a), &LDB, &beta, c, &LDC);
  }
}

}  // namespace transferops
