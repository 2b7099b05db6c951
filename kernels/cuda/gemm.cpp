// GEMM through cuBLASLt: c = alpha * op(a) @ op(b) + beta * c (row-major, see kernels/backend.h).
//
// Types: f32 x f32 -> f32 with CUBLAS_COMPUTE_32F (true fp32: the f32 mode is the debugging
// reference, so no TF32), and bf16 x bf16 -> bf16 or f32 with fp32 accumulation
// (CUBLAS_COMPUTE_32F; an f32 c lets callers accumulate bf16 products into fp32 buffers).
//
// Row-major to cuBLAS's column-major: a row-major [R, C] matrix is a column-major [C, R] one, so
//   c[M,N] = op(a)[M,K] op(b)[K,N]   <=>   c^T[N,M] = op(b)^T[N,K] op(a)^T[K,M]
// and we ask cuBLASLt for D = op(B') op(A') with A' = b (its row-major storage read as column-
// major), B' = a, m = N, n = M, k = K. Batches are strided (stride 0 broadcasts a leading 1).
//
// The matmul descriptors and the algorithm chosen by the heuristic are cached per problem (shape,
// transposes, dtypes, batch, alignment), so the steady state makes no heuristic queries.
#include <cstring>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.h"

namespace nha {

using namespace cuda;

namespace {

struct GemmKey {
  int device;
  int64_t m, n, k, batch, stride_a, stride_b, stride_c;
  int lda, ldb, ldc;
  bool ta, tb;
  DType ab, c;
  int align_a, align_b, align_c;
  bool operator==(const GemmKey& o) const {
    return std::memcmp(this, &o, sizeof(GemmKey)) == 0;
  }
};
struct GemmKeyHash {
  size_t operator()(const GemmKey& key) const {
    // FNV-1a over the bytes (the key is zero-initialized, so padding bytes are 0 too)
    const unsigned char* p = reinterpret_cast<const unsigned char*>(&key);
    size_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(GemmKey); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }
};

struct GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    default: NHA_FAIL() << "gemm: unsupported dtype " << dtype_name(t);
  }
}

int alignment_of(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  for (int a = 256; a > 1; a >>= 1)
    if (v % uintptr_t(a) == 0) return a > 16 ? 16 : a;
  return 1;
}

cublasLtMatrixLayout_t make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld,
                                   int64_t batch, int64_t stride) {
  cublasLtMatrixLayout_t l = nullptr;
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, uint64_t(rows), uint64_t(cols), ld));
  if (batch > 1) {
    const int32_t count = int32_t(batch);
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                  sizeof(count)));
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                  &stride, sizeof(stride)));
  }
  return l;
}

const GemmPlan& plan_for(const GemmKey& key) {
  static std::mutex mutex;
  static auto* cache = new std::unordered_map<GemmKey, GemmPlan, GemmKeyHash>();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;

  GemmPlan plan;
  const cudaDataType_t tab = cuda_type(key.ab), tc = cuda_type(key.c);
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLAS A' = our b, B' = our a (see the header comment).
  const cublasOperation_t opa = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opb = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa,
                                              sizeof(opa)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb,
                                              sizeof(opb)));
  // Stored (column-major) shapes: A' is m x k (or k x m when transposed), B' k x n (or n x k).
  plan.la = key.tb ? make_layout(tab, key.k, key.m, key.ldb, key.batch, key.stride_b)
                   : make_layout(tab, key.m, key.k, key.ldb, key.batch, key.stride_b);
  plan.lb = key.ta ? make_layout(tab, key.n, key.k, key.lda, key.batch, key.stride_a)
                   : make_layout(tab, key.k, key.n, key.lda, key.batch, key.stride_a);
  plan.lc = make_layout(tc, key.m, key.n, key.ldc, key.batch, key.stride_c);

  BlasLt& blas = blaslt(key.device);
  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = blas.workspace_bytes;
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const uint32_t al_a = uint32_t(key.align_b), al_b = uint32_t(key.align_a),
                 al_c = uint32_t(key.align_c);
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(blas.handle, plan.op, plan.la, plan.lb, plan.lc,
                                              plan.lc, pref, 1, &result, &found));
  cublasLtMatmulPreferenceDestroy(pref);
  NHA_CHECK(found > 0) << "gemm: cuBLASLt found no algorithm for m=" << key.m << " n=" << key.n
                       << " k=" << key.k << " batch=" << key.batch << " ("
                       << dtype_name(key.ab) << " -> " << dtype_name(key.c) << ")";
  plan.algo = result.algo;
  return cache->emplace(key, plan).first->second;
}

}  // namespace

void CudaBackend::gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                       double alpha, double beta) {
  const int dev = c.device().index;
  check_cuda_tensor(c, dev, "gemm", "c");
  check_cuda_tensor(a, dev, "gemm", "a");
  check_cuda_tensor(b, dev, "gemm", "b");
  NHA_CHECK(a.dim() == b.dim() && a.dim() == c.dim() && (a.dim() == 2 || a.dim() == 3))
      << "gemm wants 2-D or 3-D operands of equal rank, got " << a.str() << ", " << b.str()
      << ", " << c.str();
  NHA_CHECK(a.dtype() == b.dtype() &&
            (c.dtype() == a.dtype() || (a.dtype() == DType::BF16 && c.dtype() == DType::F32)))
      << "gemm on CUDA: a and b must share a dtype and c must have it too (or be f32 for bf16 "
         "a, b), got "
      << a.str() << ", " << b.str() << ", " << c.str();
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
  if (c.numel() == 0) return;
  DeviceGuard guard(dev);
  if (K == 0) {  // empty sum: c = beta c
    scale(c, c, beta);
    return;
  }
  NHA_CHECK(M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31) && batch < (1LL << 31))
      << "gemm: dimensions too large for cuBLASLt: " << a.str() << " @ " << b.str();

  GemmKey key;
  std::memset(&key, 0, sizeof(key));
  key.device = dev;
  key.m = N;
  key.n = M;
  key.k = K;
  key.batch = batch;
  key.stride_a = a_batch == 1 ? 0 : M * K;
  key.stride_b = b_batch == 1 ? 0 : K * N;
  key.stride_c = M * N;
  key.lda = int(a.size(-1));
  key.ldb = int(b.size(-1));
  key.ldc = int(N);
  key.ta = trans_a;
  key.tb = trans_b;
  key.ab = a.dtype();
  key.c = c.dtype();
  key.align_a = alignment_of(a.data_ptr());
  key.align_b = alignment_of(b.data_ptr());
  key.align_c = alignment_of(c.data_ptr());
  const GemmPlan& plan = plan_for(key);

  BlasLt& blas = blaslt(dev);
  const float al = float(alpha), be = float(beta);
  CUBLAS_CHECK(cublasLtMatmul(blas.handle, plan.op, &al, b.data_ptr(), plan.la, a.data_ptr(),
                              plan.lb, &be, c.data_ptr(), plan.lc, c.data_ptr(), plan.lc,
                              &plan.algo, blas.workspace, blas.workspace_bytes,
                              current_stream(dev)));
}

}  // namespace nha
