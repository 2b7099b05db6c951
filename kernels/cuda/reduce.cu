// CUDA reductions: sum_dim and its adjoint broadcast_dim, and sum_squares (gradient norms).
//
// Deterministic: no atomics. Every reduction is split into a fixed number of chunks that depends
// only on the shapes (never on the GPU or on timing); each chunk is summed by one block in a fixed
// order and the chunk partials are summed in index order by a second kernel. Accumulation is f32
// (sum_squares: f64 per thread, it feeds gradient clipping over ~1e8 elements).
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace nha {

using namespace cuda;

namespace {

constexpr int kRowThreads = 256;

// in viewed as [outer, n, 1]: each block sums chunk s = blockIdx.y of rows o = blockIdx.x, +gridDim.x..
//   splits == 1: out[o] = sum;  else partial[s, o] = sum (f32)
template <typename Tin, typename Tout>
__global__ void sum_rows_kernel(Tout* __restrict__ out, float* __restrict__ partial,
                                const Tin* __restrict__ in, int64_t outer, int64_t n,
                                int64_t chunk) {
  __shared__ float shared[32];
  const int64_t s = blockIdx.y, k0 = s * chunk, k1 = min(n, k0 + chunk);
  for (int64_t o = blockIdx.x; o < outer; o += gridDim.x) {
    const Tin* row = in + o * n;
    float acc = 0.f;
    for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) acc += to_f32(row[k]);
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) {
      if (gridDim.y == 1)
        out[o] = from_f32<Tout>(acc);
      else
        partial[s * outer + o] = acc;
    }
  }
}

// in viewed as [outer, n, inner], inner > 1: block (32, 8) owns 32 columns i of one o and chunk
// s = blockIdx.z of n; thread (x, y) sums k = k0 + y, k0 + y + 8, ...; then the 8 row partials are
// added in y order.  splits == 1: out[o, i] = sum;  else partial[s, o, i] = sum (f32)
template <typename Tin, typename Tout>
__global__ void sum_cols_kernel(Tout* __restrict__ out, float* __restrict__ partial,
                                const Tin* __restrict__ in, int64_t outer, int64_t n,
                                int64_t inner, int64_t chunk) {
  __shared__ float shared[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i = blockIdx.x * 32LL + tx;
  const int64_t s = blockIdx.z, k0 = s * chunk, k1 = min(n, k0 + chunk);
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    float acc = 0.f;
    if (i < inner)
      for (int64_t k = k0 + ty; k < k1; k += 8) acc += to_f32(in[(o * n + k) * inner + i]);
    shared[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && i < inner) {
      float total = 0.f;
#pragma unroll
      for (int y = 0; y < 8; ++y) total += shared[y][tx];
      if (gridDim.z == 1)
        out[o * inner + i] = from_f32<Tout>(total);
      else
        partial[(s * outer + o) * inner + i] = total;
    }
    __syncthreads();
  }
}

// out[j] = sum_s partial[s, j] in s order, j < m
template <typename Tout>
__global__ void sum_partials_kernel(Tout* __restrict__ out, const float* __restrict__ partial,
                                    int64_t m, int64_t splits) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < m;
       j += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < splits; ++s) acc += partial[s * m + j];
    out[j] = from_f32<Tout>(acc);
  }
}

// out[o, k, i] = in[o, i]
template <typename T>
__global__ void broadcast_dim_kernel(T* __restrict__ out, const T* __restrict__ in, int64_t total,
                                     int64_t n, int64_t inner) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % inner, o = idx / (n * inner);
    out[idx] = in[o * inner + i];
  }
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// partial[b] = sum over x[i]^2 for the grid-stride elements of block b (f64 accumulation)
template <typename T>
__global__ void sum_squares_kernel(double* __restrict__ partial, const T* __restrict__ x,
                                   int64_t n) {
  __shared__ double shared[32];
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double v = to_f32(x[i]);
    acc += v * v;
  }
  acc = warp_sum_d(acc);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    double t = lane < int(blockDim.x >> 5) ? shared[lane] : 0.0;
    t = warp_sum_d(t);
    if (lane == 0) partial[blockIdx.x] = t;
  }
}

// out[0] = sum of partial[0..m) (one warp, strided then butterfly: fixed order)
template <typename Tout>
__global__ void sum_squares_final_kernel(Tout* out, const double* __restrict__ partial, int m) {
  double acc = 0;
  for (int j = threadIdx.x; j < m; j += 32) acc += partial[j];
  acc = warp_sum_d(acc);
  if (threadIdx.x == 0) out[0] = Tout(acc);
}

template <typename F>
void dispatch_out_dtype(const Tensor& in, const Tensor& out, const char* op, F&& fn) {
  // out has in's dtype, or f32 for bf16 inputs (f32 accumulation of a bf16 tensor).
  NHA_CHECK(out.dtype() == in.dtype() || (in.dtype() == DType::BF16 && out.dtype() == DType::F32))
      << op << ": output " << out.str() << " for input " << in.str()
      << " must have the input's dtype (or f32 for bf16 input)";
  dispatch_f32_bf16(in, op, [&]<typename Tin>() {
    if (out.dtype() == DType::F32)
      fn.template operator()<Tin, float>();
    else
      fn.template operator()<Tin, bf16_t>();
  });
}

}  // namespace

void CudaBackend::sum_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n, int64_t inner) {
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "sum_dim", "out");
  check_cuda_tensor(in, dev, "sum_dim", "in");
  NHA_CHECK(in.numel() == outer * n * inner && out.numel() == outer * inner)
      << "sum_dim: " << in.str() << " -> " << out.str() << " with [outer, n, inner] = [" << outer
      << ", " << n << ", " << inner << "]";
  if (out.numel() == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  if (n == 0) {
    fill(out, 0.0);
    return;
  }
  dispatch_out_dtype(in, out, "sum_dim", [&]<typename Tin, typename Tout>() {
    const Tin* x = static_cast<const Tin*>(in.data_ptr());
    Tout* y = static_cast<Tout*>(out.data_ptr());
    // Split n into chunks so that about 1024 blocks work; the split depends on shapes only.
    constexpr int64_t kTargetBlocks = 1024;
    if (inner == 1) {
      const int64_t row_blocks = std::min<int64_t>(outer, 65535);
      int64_t splits = std::max<int64_t>(1, kTargetBlocks / row_blocks);
      splits = std::min<int64_t>({splits, (n + 2047) / 2048, 65535});
      const int64_t chunk = (n + splits - 1) / splits;
      splits = (n + chunk - 1) / chunk;
      Scratch partial(splits > 1 ? size_t(splits * outer) * sizeof(float) : 0, dev);
      sum_rows_kernel<Tin, Tout><<<dim3(unsigned(row_blocks), unsigned(splits)), kRowThreads, 0,
                                   st>>>(y, partial.as<float>(), x, outer, n, chunk);
      CUDA_CHECK_LAUNCH();
      if (splits > 1) {
        sum_partials_kernel<Tout><<<grid_for(outer, 256), 256, 0, st>>>(y, partial.as<float>(),
                                                                         outer, splits);
        CUDA_CHECK_LAUNCH();
      }
    } else {
      const int64_t col_tiles = (inner + 31) / 32;
      NHA_CHECK(col_tiles <= 0x7fffffff) << "sum_dim: inner " << inner << " too large";
      const int64_t o_blocks = std::min<int64_t>(outer, 65535);
      int64_t splits = std::max<int64_t>(1, kTargetBlocks / (col_tiles * o_blocks));
      splits = std::min<int64_t>({splits, (n + 63) / 64, 65535});
      const int64_t chunk = (n + splits - 1) / splits;
      splits = (n + chunk - 1) / chunk;
      Scratch partial(splits > 1 ? size_t(splits * outer * inner) * sizeof(float) : 0, dev);
      sum_cols_kernel<Tin, Tout>
          <<<dim3(unsigned(col_tiles), unsigned(o_blocks), unsigned(splits)), dim3(32, 8), 0,
             st>>>(y, partial.as<float>(), x, outer, n, inner, chunk);
      CUDA_CHECK_LAUNCH();
      if (splits > 1) {
        sum_partials_kernel<Tout><<<grid_for(outer * inner, 256), 256, 0, st>>>(
            y, partial.as<float>(), outer * inner, splits);
        CUDA_CHECK_LAUNCH();
      }
    }
  });
}

void CudaBackend::broadcast_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n,
                                int64_t inner) {
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "broadcast_dim", "out");
  check_cuda_tensor(in, dev, "broadcast_dim", "in");
  NHA_CHECK(out.numel() == outer * n * inner && in.numel() == outer * inner &&
            in.dtype() == out.dtype())
      << "broadcast_dim: " << in.str() << " -> " << out.str() << " with [outer, n, inner] = ["
      << outer << ", " << n << ", " << inner << "]";
  const int64_t total = out.numel();
  if (total == 0) return;
  DeviceGuard guard(dev);
  dispatch_f32_bf16(out, "broadcast_dim", [&]<typename T>() {
    broadcast_dim_kernel<T><<<grid_for(total, 256), 256, 0, current_stream(dev)>>>(
        static_cast<T*>(out.data_ptr()), static_cast<const T*>(in.data_ptr()), total, n, inner);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::sum_squares(Tensor& out, const Tensor& x) {
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "sum_squares", "out");
  check_cuda_tensor(x, dev, "sum_squares", "x");
  NHA_CHECK(out.numel() == 1 && (out.dtype() == DType::F32 || out.dtype() == DType::F64))
      << "sum_squares: out must be one f32 (or f64) element, got " << out.str();
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  const int64_t n = x.numel();
  // Fixed grid from n alone: at most 1024 blocks of 256 threads.
  const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(1024, (n + 2047) / 2048)));
  Scratch partial(size_t(blocks) * sizeof(double), dev);
  dispatch_f32_bf16(x, "sum_squares", [&]<typename T>() {
    sum_squares_kernel<T><<<blocks, 256, 0, st>>>(partial.as<double>(),
                                                  static_cast<const T*>(x.data_ptr()), n);
    CUDA_CHECK_LAUNCH();
  });
  if (out.dtype() == DType::F32)
    sum_squares_final_kernel<float><<<1, 32, 0, st>>>(static_cast<float*>(out.data_ptr()),
                                                      partial.as<double>(), blocks);
  else
    sum_squares_final_kernel<double><<<1, 32, 0, st>>>(static_cast<double*>(out.data_ptr()),
                                                       partial.as<double>(), blocks);
  CUDA_CHECK_LAUNCH();
}

}  // namespace nha
