// CUDA softmax over the last dim and the fused softmax + cross-entropy: forward and backward.
//
//   softmax:  out[n,c] = exp(x[n,c] - m_n) / sum_c' exp(x[n,c'] - m_n)           x, out [N, C]
//             dx = out (dout - sum_c dout out)
//   cross-entropy (never materializes probabilities):
//             losses[n] = logsumexp_c(logits[n,c]) - logits[n, t_n]   (0 where t_n == ignore)
//             dlogits[n,c] = dlosses[n] (exp(logits[n,c] - lse_n) - [c == t_n])  (0 rows if ignored)
//             logits, dlogits [N, V] (f32/bf16); targets [N] i32/i64; losses, dlosses [N] f32
//   argmax:   out[n] = first c with x[n,c] = max (greedy decoding)           x [N, C]; out [N] i64
// One block per row. The statistics (max, sum of exponentials) are accumulated online per thread
// in f32, base 2, then merged across the block in a fixed order; a second pass over the row (from
// L2) writes the outputs. The backward recomputes lse from the logits, and reads each element
// before writing it, so dlogits may alias logits (in-place, saves N x V memory).
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace nha {

using namespace cuda;

namespace {

constexpr int kSoftmaxThreads = 256;

// Online (max, sum) of row[0..C) * log2(e), VEC elements per load.
template <typename T, int VEC>
__device__ __forceinline__ MaxSum row_stats(const T* row, int64_t C, float* shared) {
  MaxSum a{-INFINITY, 0.f};
  for (int64_t c = threadIdx.x * int64_t(VEC); c < C; c += int64_t(blockDim.x) * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(row + c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) add_value(a, to_f32(v.v[e]) * kLog2e);
  }
  return block_merge(a, shared);
}

template <typename T, int VEC>
__global__ void softmax_forward_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t C) {
  __shared__ float shared[64];
  const int64_t n = blockIdx.x;
  const T* xr = x + n * C;
  const MaxSum st = row_stats<T, VEC>(xr, C, shared);
  const float inv = 1.f / st.s;
  T* yr = out + n * C;
  for (int64_t c = threadIdx.x * int64_t(VEC); c < C; c += int64_t(blockDim.x) * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(xr + c);
    Pack<T, VEC> y;
#pragma unroll
    for (int e = 0; e < VEC; ++e) y.v[e] = from_f32<T>(exp2f(to_f32(v.v[e]) * kLog2e - st.m) * inv);
    store_pack<T, VEC>(yr + c, y);
  }
}

template <typename T, int VEC>
__global__ void softmax_backward_kernel(T* __restrict__ dx, const T* __restrict__ dout,
                                        const T* __restrict__ out, int64_t C) {
  __shared__ float shared[32];
  const int64_t n = blockIdx.x;
  const T *g = dout + n * C, *y = out + n * C;
  float dot = 0.f;
  for (int64_t c = threadIdx.x * int64_t(VEC); c < C; c += int64_t(blockDim.x) * VEC) {
    const Pack<T, VEC> gv = load_pack<T, VEC>(g + c), yv = load_pack<T, VEC>(y + c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) dot += to_f32(gv.v[e]) * to_f32(yv.v[e]);
  }
  dot = block_sum(dot, shared);
  T* dr = dx + n * C;
  for (int64_t c = threadIdx.x * int64_t(VEC); c < C; c += int64_t(blockDim.x) * VEC) {
    const Pack<T, VEC> gv = load_pack<T, VEC>(g + c), yv = load_pack<T, VEC>(y + c);
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      o.v[e] = from_f32<T>(to_f32(yv.v[e]) * (to_f32(gv.v[e]) - dot));
    store_pack<T, VEC>(dr + c, o);
  }
}

// out[n] = first c with x[n,c] = max_c' x[n,c'] (one block per row). Each thread keeps its
// running (max, first index); pairs merge by (larger value, then smaller index), so the result does
// not depend on the reduction order. NaN compares false and is skipped like in std::max_element.
__device__ __forceinline__ void argmax_merge(float& v, int64_t& i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename T>
__global__ void argmax_kernel(int64_t* __restrict__ out, const T* __restrict__ x, int64_t C) {
  __shared__ float shared_v[32];
  __shared__ int64_t shared_i[32];
  const T* row = x + int64_t(blockIdx.x) * C;
  float v = -INFINITY;
  int64_t i = C;  // C: no element seen yet (loses every merge)
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) argmax_merge(v, i, to_f32(row[c]), c);
  for (int off = 16; off > 0; off >>= 1)
    argmax_merge(v, i, __shfl_down_sync(0xffffffffu, v, off), __shfl_down_sync(0xffffffffu, i, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    shared_v[warp] = v;
    shared_i[warp] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x >> 5); ++w) argmax_merge(v, i, shared_v[w], shared_i[w]);
    out[blockIdx.x] = i < C ? i : 0;  // an all-NaN (or -inf) row: index 0
  }
}

__device__ __forceinline__ void report_target_error(int32_t* err, int64_t row, int64_t value,
                                                    int64_t limit) {
  if (atomicCAS(err, 0, int32_t(kCrossEntropyTarget)) == 0) {
    err[1] = int32_t(row);
    err[2] = int32_t(value);
    err[3] = int32_t(limit);
    __threadfence_system();
  }
}

template <typename T, typename I, int VEC>
__global__ void cross_entropy_forward_kernel(float* __restrict__ losses,
                                             const T* __restrict__ logits,
                                             const I* __restrict__ targets, int64_t V,
                                             int64_t ignore_index, int32_t* err) {
  __shared__ float shared[64];
  const int64_t n = blockIdx.x;
  const int64_t t = int64_t(targets[n]);
  if (t == ignore_index) {
    if (threadIdx.x == 0) losses[n] = 0.f;
    return;
  }
  if (t < 0 || t >= V) {
    if (threadIdx.x == 0) {
      report_target_error(err, n, t, V);
      losses[n] = NAN;
    }
    return;
  }
  const T* row = logits + n * V;
  const MaxSum st = row_stats<T, VEC>(row, V, shared);
  if (threadIdx.x == 0) losses[n] = (st.m + log2f(st.s)) * kLn2 - to_f32(row[t]);
}

template <typename T, typename I, int VEC>
__global__ void cross_entropy_backward_kernel(T* dlogits, const T* logits,
                                              const I* __restrict__ targets,
                                              const float* __restrict__ dlosses, int64_t V,
                                              int64_t ignore_index, int32_t* err) {
  __shared__ float shared[64];
  const int64_t n = blockIdx.x;
  const int64_t t = int64_t(targets[n]);
  T* dr = dlogits + n * V;
  if (t == ignore_index || t < 0 || t >= V) {
    if (t != ignore_index && threadIdx.x == 0) report_target_error(err, n, t, V);
    const float fillv = t == ignore_index ? 0.f : NAN;
    for (int64_t c = threadIdx.x; c < V; c += blockDim.x) dr[c] = from_f32<T>(fillv);
    return;
  }
  const T* row = logits + n * V;
  const MaxSum st = row_stats<T, VEC>(row, V, shared);
  const float g = dlosses[n], ginv = g / st.s;
  for (int64_t c = threadIdx.x * int64_t(VEC); c < V; c += int64_t(blockDim.x) * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(row + c);
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float p = exp2f(to_f32(v.v[e]) * kLog2e - st.m) * ginv;
      o.v[e] = from_f32<T>(c + e == t ? p - g : p);
    }
    store_pack<T, VEC>(dr + c, o);
  }
}

template <typename F>
void dispatch_targets(const Tensor& ids, const char* op, F&& fn) {
  switch (ids.dtype()) {
    case DType::I32: fn.template operator()<int32_t>(); return;
    case DType::I64: fn.template operator()<int64_t>(); return;
    default: NHA_FAIL() << op << ": targets must be i32 or i64, got " << ids.str();
  }
}

// Calls fn.template operator()<VEC>() with 16-byte packs when the rows allow it.
template <typename T, typename F>
void with_vec(int64_t C, std::initializer_list<const void*> ptrs, F&& fn) {
  bool vec = C % kVec16<T> == 0;
  for (const void* p : ptrs) vec = vec && aligned16(p);
  if (vec)
    fn.template operator()<kVec16<T>>();
  else
    fn.template operator()<1>();
}

}  // namespace

void CudaBackend::softmax_forward(Tensor& out, const Tensor& x) {
  const int dev = x.device().index;
  check_cuda_tensor(out, dev, "softmax_forward", "out");
  check_cuda_tensor(x, dev, "softmax_forward", "x");
  check_same_shape(out, x, "softmax");
  NHA_CHECK(out.dtype() == x.dtype()) << "softmax: dtypes differ, " << out.str() << ", " << x.str();
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  if (N == 0) return;
  NHA_CHECK(N < (1LL << 31)) << "softmax: too many rows in " << x.str();
  DeviceGuard guard(dev);
  dispatch_f32_bf16(x, "softmax_forward", [&]<typename T>() {
    T* o = static_cast<T*>(out.data_ptr());
    const T* px = static_cast<const T*>(x.data_ptr());
    with_vec<T>(C, {o, px}, [&]<int VEC>() {
      softmax_forward_kernel<T, VEC><<<unsigned(N), kSoftmaxThreads, 0, current_stream(dev)>>>(o, px, C);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void CudaBackend::argmax(Tensor& out, const Tensor& x) {
  const int dev = x.device().index;
  check_cuda_tensor(out, dev, "argmax", "out");
  check_cuda_tensor(x, dev, "argmax", "x");
  check_dtype_is(out, DType::I64, "argmax", "out");
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  NHA_CHECK(out.numel() == N) << "argmax: output " << out.str() << " for " << N << " rows";
  if (N == 0) return;
  NHA_CHECK(N < (1LL << 31)) << "argmax: too many rows in " << x.str();
  DeviceGuard guard(dev);
  dispatch_f32_bf16(x, "argmax", [&]<typename T>() {
    argmax_kernel<T><<<unsigned(N), kSoftmaxThreads, 0, current_stream(dev)>>>(
        static_cast<int64_t*>(out.data_ptr()), static_cast<const T*>(x.data_ptr()), C);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::softmax_backward(Tensor& dx, const Tensor& dout, const Tensor& out) {
  const int dev = out.device().index;
  check_cuda_tensor(dx, dev, "softmax_backward", "dx");
  check_cuda_tensor(dout, dev, "softmax_backward", "dout");
  check_cuda_tensor(out, dev, "softmax_backward", "out");
  check_same_shape(dout, out, "softmax backward");
  check_same_shape(dx, out, "softmax backward");
  NHA_CHECK(dx.dtype() == out.dtype() && dout.dtype() == out.dtype())
      << "softmax backward: dtypes differ";
  const int64_t C = out.size(-1), N = C == 0 ? 0 : out.numel() / C;
  if (N == 0) return;
  DeviceGuard guard(dev);
  dispatch_f32_bf16(out, "softmax_backward", [&]<typename T>() {
    T* d = static_cast<T*>(dx.data_ptr());
    const T *g = static_cast<const T*>(dout.data_ptr()), *y = static_cast<const T*>(out.data_ptr());
    with_vec<T>(C, {d, g, y}, [&]<int VEC>() {
      softmax_backward_kernel<T, VEC><<<unsigned(N), kSoftmaxThreads, 0, current_stream(dev)>>>(d, g, y,
                                                                                        C);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void CudaBackend::cross_entropy_forward(Tensor& losses, const Tensor& logits,
                                        const Tensor& targets, int64_t ignore_index) {
  const int dev = logits.device().index;
  check_cuda_tensor(losses, dev, "cross_entropy_forward", "losses");
  check_cuda_tensor(logits, dev, "cross_entropy_forward", "logits");
  check_cuda_tensor(targets, dev, "cross_entropy_forward", "targets");
  NHA_CHECK(logits.dim() == 2) << "cross_entropy: logits must be [N, V], got " << logits.str();
  const int64_t N = logits.size(0), V = logits.size(1);
  NHA_CHECK(targets.numel() == N && losses.numel() == N)
      << "cross_entropy: " << targets.str() << " targets and " << losses.str() << " losses for "
      << N << " rows of logits";
  check_dtype_is(losses, DType::F32, "cross_entropy_forward", "losses");
  if (N == 0) return;
  DeviceGuard guard(dev);
  int32_t* err = device_error_word(dev);
  dispatch_f32_bf16(logits, "cross_entropy_forward", [&]<typename T>() {
    dispatch_targets(targets, "cross_entropy_forward", [&]<typename I>() {
      const T* x = static_cast<const T*>(logits.data_ptr());
      with_vec<T>(V, {x}, [&]<int VEC>() {
        cross_entropy_forward_kernel<T, I, VEC><<<unsigned(N), kSoftmaxThreads, 0, current_stream(dev)>>>(
            static_cast<float*>(losses.data_ptr()), x, static_cast<const I*>(targets.data_ptr()),
            V, ignore_index, err);
        CUDA_CHECK_LAUNCH();
      });
    });
  });
}

void CudaBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& logits,
                                         const Tensor& targets, const Tensor& dlosses,
                                         int64_t ignore_index) {
  const int dev = logits.device().index;
  check_cuda_tensor(dlogits, dev, "cross_entropy_backward", "dlogits");
  check_cuda_tensor(logits, dev, "cross_entropy_backward", "logits");
  check_cuda_tensor(targets, dev, "cross_entropy_backward", "targets");
  check_cuda_tensor(dlosses, dev, "cross_entropy_backward", "dlosses");
  NHA_CHECK(logits.dim() == 2) << "cross_entropy: logits must be [N, V], got " << logits.str();
  check_same_shape(dlogits, logits, "cross_entropy backward");
  NHA_CHECK(dlogits.dtype() == logits.dtype())
      << "cross_entropy backward: dlogits " << dlogits.str() << " vs logits " << logits.str();
  const int64_t N = logits.size(0), V = logits.size(1);
  NHA_CHECK(targets.numel() == N && dlosses.numel() == N)
      << "cross_entropy backward: " << targets.str() << " targets and " << dlosses.str()
      << " dlosses for " << N << " rows";
  check_dtype_is(dlosses, DType::F32, "cross_entropy_backward", "dlosses");
  if (N == 0) return;
  DeviceGuard guard(dev);
  int32_t* err = device_error_word(dev);
  dispatch_f32_bf16(logits, "cross_entropy_backward", [&]<typename T>() {
    dispatch_targets(targets, "cross_entropy_backward", [&]<typename I>() {
      T* d = static_cast<T*>(dlogits.data_ptr());
      const T* x = static_cast<const T*>(logits.data_ptr());
      with_vec<T>(V, {d, x}, [&]<int VEC>() {
        cross_entropy_backward_kernel<T, I, VEC>
            <<<unsigned(N), kSoftmaxThreads, 0, current_stream(dev)>>>(
                d, x, static_cast<const I*>(targets.data_ptr()),
                static_cast<const float*>(dlosses.data_ptr()), V, ignore_index, err);
        CUDA_CHECK_LAUNCH();
      });
    });
  });
}

}  // namespace nha
