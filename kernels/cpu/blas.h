// One row-major OpenBLAS GEMM on the calling thread, for float or double: the CPU kernels call it
// on blocks of their own tensors (strided rows: lda/ldb/ldc are the distances between rows).
// OpenBLAS runs single-threaded (CpuBackend's constructor), so calls from OpenMP tasks are safe.
#pragma once
#include <cblas.h>

#include <cstdint>
#include <type_traits>

namespace nha {

// c [m, n] = alpha op(a) op(b) + beta c, op(a) [m, k], op(b) [k, n]. Empty products are allowed:
// m or n = 0 does nothing, k = 0 leaves beta c (OpenBLAS would reject some of these leading
// dimensions, and callers have empty windows or chunks without memory writes).
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
             int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  const auto ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb),
                beta, c, int(ldc));
  else
    cblas_dgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb),
                beta, c, int(ldc));
}

}  // namespace nha
