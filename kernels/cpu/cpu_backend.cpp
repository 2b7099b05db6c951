// CPU backend: memory, elementwise, reductions and GEMM.
#include "kernels/cpu/cpu_backend.h"

#include <omp.h>

#include <algorithm>
#include <cstring>

#include "core/profile.h"
#include "core/random.h"
#include "kernels/cpu/blas.h"

namespace nha {

namespace {
// Multiply-adds of one gemm call below which its parallel region costs more than it saves.
constexpr int64_t kGemmThreadingMacs = int64_t(1) << 18;
}  // namespace

// gemm threads over its own tasks and calls OpenBLAS inside them, so OpenBLAS stays on one thread.
CpuBackend::CpuBackend() { openblas_set_num_threads(1); }

Backend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

// ---- memory -------------------------------------------------------------------------------------

void CpuBackend::copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                            size_t nbytes) {
  NHA_PROFILE_SCOPE("copy_bytes");
  NHA_CHECK(dst_device.is_cpu() && src_device.is_cpu())
      << "cpu backend asked to copy " << src_device.str() << " -> " << dst_device.str();
  if (nbytes) std::memcpy(dst, src, nbytes);
}

void CpuBackend::copy_strided(Tensor& out, const Tensor& in) {
  NHA_PROFILE_SCOPE("copy_strided");
  check_same_shape(out, in, "copy_strided");
  const size_t esize = dtype_size(in.dtype());
  const int64_t n = in.numel(), nd = in.dim();
  const char* src = static_cast<const char*>(in.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const Shape& shape = in.shape();
  const Shape& strides = in.strides();
  // Each thread walks its own range of output indices, decoding the source offset per element.
#pragma omp parallel for schedule(static) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    int64_t rem = i, src_off = 0;
    for (int64_t d = nd - 1; d >= 0; --d) {
      src_off += (rem % shape[d]) * strides[d];
      rem /= shape[d];
    }
    std::memcpy(dst + i * esize, src + src_off * esize, esize);
  }
}

namespace {
// Element i of any dtype as double, and back.
double load_as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::BF16: return float(static_cast<const bf16*>(p)[i]);
    case DType::I32: return static_cast<const int32_t*>(p)[i];
    case DType::I64: return double(static_cast<const int64_t*>(p)[i]);
  }
  return 0;
}
void store_double(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = float(v); return;
    case DType::F64: static_cast<double*>(p)[i] = v; return;
    case DType::BF16: static_cast<bf16*>(p)[i] = bf16(float(v)); return;
    case DType::I32: static_cast<int32_t*>(p)[i] = int32_t(v); return;
    case DType::I64: static_cast<int64_t*>(p)[i] = int64_t(v); return;
  }
}
}  // namespace

void CpuBackend::fill(Tensor& out, double value) {
  NHA_PROFILE_SCOPE("fill");
  const int64_t n = out.numel();
  void* p = out.data_ptr();
  DType t = out.dtype();
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) store_double(p, t, i, value);
}

void CpuBackend::cast(Tensor& out, const Tensor& in) {
  NHA_PROFILE_SCOPE("cast");
  check_same_shape(out, in, "cast");
  const int64_t n = in.numel();
  const void* src = in.data_ptr();
  void* dst = out.data_ptr();
  DType ts = in.dtype(), td = out.dtype();
  if (ts == DType::I64 && td == DType::I32) {  // exact path: ids do not round-trip through double
    for (int64_t i = 0; i < n; ++i)
      static_cast<int32_t*>(dst)[i] = int32_t(static_cast<const int64_t*>(src)[i]);
    return;
  }
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) store_double(dst, td, i, load_as_double(src, ts, i));
}

void CpuBackend::fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double std) {
  NHA_PROFILE_SCOPE("fill_normal");
  const int64_t n = out.numel();
  void* p = out.data_ptr();
  DType t = out.dtype();
#pragma omp parallel for schedule(static) if (n > 16384)
  for (int64_t i = 0; i < n; ++i) store_double(p, t, i, std * philox_normal(seed, offset + i));
}

void CpuBackend::fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double lo, double hi) {
  NHA_PROFILE_SCOPE("fill_uniform");
  const int64_t n = out.numel();
  void* p = out.data_ptr();
  DType t = out.dtype();
#pragma omp parallel for schedule(static) if (n > 16384)
  for (int64_t i = 0; i < n; ++i) store_double(p, t, i, philox_uniform(seed, offset + i, lo, hi));
}

// ---- elementwise --------------------------------------------------------------------------------

void CpuBackend::add(Tensor& out, const Tensor& a, const Tensor& b, double alpha, double beta) {
  NHA_PROFILE_SCOPE("add");
  check_same_shape(a, b, "add");
  dispatch_floating(a, "add", [&]<typename T>() {
    const T *pa = a.data<T>(), *pb = b.data<T>();
    T* po = out.data<T>();
    const T al = T(alpha), be = T(beta);
    const int64_t n = a.numel();
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) po[i] = al * pa[i] + be * pb[i];
  });
}

void CpuBackend::mul(Tensor& out, const Tensor& a, const Tensor& b) {
  NHA_PROFILE_SCOPE("mul");
  check_same_shape(a, b, "mul");
  dispatch_floating(a, "mul", [&]<typename T>() {
    const T *pa = a.data<T>(), *pb = b.data<T>();
    T* po = out.data<T>();
    const int64_t n = a.numel();
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) po[i] = pa[i] * pb[i];
  });
}

void CpuBackend::scale(Tensor& out, const Tensor& a, double s) {
  NHA_PROFILE_SCOPE("scale");
  dispatch_floating(a, "scale", [&]<typename T>() {
    const T* pa = a.data<T>();
    T* po = out.data<T>();
    const T st = T(s);
    const int64_t n = a.numel();
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) po[i] = st * pa[i];
  });
}

// ---- reductions ---------------------------------------------------------------------------------

void CpuBackend::sum_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n, int64_t inner) {
  NHA_PROFILE_SCOPE("sum_dim");
  dispatch_floating(in, "sum_dim", [&]<typename T>() {
    const T* x = in.data<T>();
    T* y = out.data<T>();
    // Accumulate in double for f32 too: sums feed losses and gradient checks.
#pragma omp parallel for collapse(2) schedule(static) if (outer * inner > 1024)
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t i = 0; i < inner; ++i) {
        double acc = 0;
        for (int64_t k = 0; k < n; ++k) acc += x[(o * n + k) * inner + i];
        y[o * inner + i] = T(acc);
      }
  });
}

void CpuBackend::broadcast_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n,
                               int64_t inner) {
  NHA_PROFILE_SCOPE("broadcast_dim");
  dispatch_floating(in, "broadcast_dim", [&]<typename T>() {
    const T* x = in.data<T>();
    T* y = out.data<T>();
#pragma omp parallel for collapse(2) schedule(static) if (outer * n * inner > 65536)
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t k = 0; k < n; ++k)
        for (int64_t i = 0; i < inner; ++i) y[(o * n + k) * inner + i] = x[o * inner + i];
  });
}

void CpuBackend::sum_squares(Tensor& out, const Tensor& x) {
  NHA_PROFILE_SCOPE("sum_squares");
  dispatch_floating(x, "sum_squares", [&]<typename T>() {
    const T* p = x.data<T>();
    const int64_t n = x.numel();
    double acc = 0;
#pragma omp parallel for reduction(+ : acc) schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) acc += double(p[i]) * double(p[i]);
    store_double(out.data_ptr(), out.dtype(), 0, acc);
  });
}

// ---- GEMM ---------------------------------------------------------------------------------------

void CpuBackend::gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                      double alpha, double beta) {
  NHA_PROFILE_SCOPE("gemm");
  NHA_CHECK(a.dim() == b.dim() && a.dim() == c.dim() && (a.dim() == 2 || a.dim() == 3))
      << "gemm wants 2-D or 3-D operands of equal rank, got " << a.str() << ", " << b.str()
      << ", " << c.str();
  const bool batched = a.dim() == 3;
  const int64_t batch = batched ? c.size(0) : 1;
  const int64_t M = c.size(-2), N = c.size(-1);
  const int64_t K = trans_a ? a.size(-2) : a.size(-1);
  NHA_CHECK((trans_a ? a.size(-1) : a.size(-2)) == M && (trans_b ? b.size(-1) : b.size(-2)) == K &&
            (trans_b ? b.size(-2) : b.size(-1)) == N)
      << "gemm shapes do not chain: " << a.str() << (trans_a ? "^T" : "") << " @ " << b.str()
      << (trans_b ? "^T" : "") << " -> " << c.str();
  const int64_t a_batch = batched ? a.size(0) : 1, b_batch = batched ? b.size(0) : 1;
  NHA_CHECK((a_batch == batch || a_batch == 1) && (b_batch == batch || b_batch == 1))
      << "gemm batch sizes differ: " << a.str() << ", " << b.str() << ", " << c.str();
  const int64_t a_step = a_batch == 1 ? 0 : M * K, b_step = b_batch == 1 ? 0 : K * N;
  const int64_t lda = a.size(-1), ldb = b.size(-1);
  // OpenBLAS runs on one thread (the constructor): its own thread pool would share the cores with
  // OpenMP's threads, which spin for a while after every parallel region (docs/training.md, CPU
  // profile). The backend's OpenMP threads split the product instead, into tasks of (batch index,
  // block of rows of c): one single-threaded GEMM each, on rows of c no other task writes.
  const int64_t threads = omp_get_max_threads();
  const bool threaded = threads > 1 && batch * M * N * K >= kGemmThreadingMacs;
  const int64_t row_blocks =
      threaded && batch < threads ? std::min(M, (threads + batch - 1) / batch) : 1;
  const int64_t block_rows = (M + row_blocks - 1) / row_blocks;
  dispatch_floating(c, "gemm", [&]<typename T>() {
#pragma omp parallel for schedule(static) if (threaded)
    for (int64_t task = 0; task < batch * row_blocks; ++task) {
      const int64_t i = task / row_blocks, r0 = (task % row_blocks) * block_rows;
      const int64_t rows = std::min(block_rows, M - r0);
      if (rows <= 0) continue;
      // Rows r0.. of op(a): rows of a, or columns of a when it is transposed ([K, M]).
      const T* pa = a.data<T>() + i * a_step + (trans_a ? r0 : r0 * lda);
      const T* pb = b.data<T>() + i * b_step;
      T* pc = c.data<T>() + i * M * N + r0 * N;
      gemm_rm<T>(trans_a, trans_b, rows, N, K, T(alpha), pa, lda, pb, ldb, T(beta), pc, N);
    }
  });
}

}  // namespace nha
