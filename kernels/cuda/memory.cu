// CUDA memory ops: strided copy, fill, dtype cast, and Philox random fills.
//
// fill, cast and the random fills convert through double exactly like the CPU backend
// (kernels/cpu/cpu_backend.cpp: load_as_double / store_double), and bf16 rounding uses the same
// nha::bf16 routine, so CPU and GPU give identical bits for the same inputs. The random fills
// evaluate core/random.h's philox_normal/philox_uniform (host+device code) at counter offset + i.
#include "core/random.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace nha {

using namespace cuda;

namespace {

// ---- element access by dtype (device) ----------------------------------------------------------
// Element i of a tensor of dtype t as double, and back (the CPU backend's conversions).
__device__ __forceinline__ double load_as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::BF16: return float(static_cast<const nha::bf16*>(p)[i]);
    case DType::I32: return static_cast<const int32_t*>(p)[i];
    case DType::I64: return double(static_cast<const int64_t*>(p)[i]);
  }
  return 0;
}
__device__ __forceinline__ void store_double(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = float(v); return;
    case DType::F64: static_cast<double*>(p)[i] = v; return;
    case DType::BF16: static_cast<nha::bf16*>(p)[i] = nha::bf16(float(v)); return;
    case DType::I32: static_cast<int32_t*>(p)[i] = int32_t(v); return;
    case DType::I64: static_cast<int64_t*>(p)[i] = int64_t(v); return;
  }
}

// ---- copy_strided --------------------------------------------------------------------------------
// out[i] = in[offset(i)] where offset decodes the row-major index i of `shape` with `strides`
// (in elements). Up to kMaxDims dims; elements moved as raw words of ESIZE bytes.
constexpr int kMaxDims = 10;
struct StridedLayout {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];
};

template <typename W>
__global__ void copy_strided_kernel(W* __restrict__ out, const W* __restrict__ in, int64_t n,
                                    StridedLayout layout) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rem = i, off = 0;
    for (int d = layout.ndim - 1; d >= 0; --d) {
      const int64_t s = layout.shape[d];
      off += (rem % s) * layout.strides[d];
      rem /= s;
    }
    out[i] = in[off];
  }
}

// ---- fill / cast / random ------------------------------------------------------------------------
// out[i] = value (converted to out's dtype like the CPU)
__global__ void fill_kernel(void* out, DType t, int64_t n, double value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_double(out, t, i, value);
}

// out[i] = convert(in[i]); i64 -> i32 is exact (ids do not round-trip through double)
__global__ void cast_kernel(void* out, DType to, const void* in, DType from, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (from == DType::I64 && to == DType::I32)
      static_cast<int32_t*>(out)[i] = int32_t(static_cast<const int64_t*>(in)[i]);
    else
      store_double(out, to, i, load_as_double(in, from, i));
  }
}

// out[i] = std * N(0,1) from Philox counter (offset + i)
__global__ void fill_normal_kernel(void* out, DType t, int64_t n, uint64_t seed, uint64_t offset,
                                   double std) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_double(out, t, i, std * philox_normal(seed, offset + uint64_t(i)));
}

// out[i] = U[lo, hi) from Philox counter (offset + i)
__global__ void fill_uniform_kernel(void* out, DType t, int64_t n, uint64_t seed, uint64_t offset,
                                    double lo, double hi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_double(out, t, i, philox_uniform(seed, offset + uint64_t(i), lo, hi));
}

constexpr int kCopyThreads = 256;

}  // namespace

void CudaBackend::copy_strided(Tensor& out, const Tensor& in) {
  check_same_shape(out, in, "copy_strided");
  NHA_CHECK(out.dtype() == in.dtype()) << "copy_strided: dtypes differ, " << out.str() << " vs "
                                       << in.str();
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "copy_strided", "out");
  NHA_CHECK(in.device() == out.device()) << "copy_strided: " << in.str() << " -> " << out.str();
  const int64_t n = in.numel();
  if (n == 0) return;
  NHA_CHECK(in.dim() <= kMaxDims) << "copy_strided: at most " << kMaxDims << " dims, got "
                                  << in.str();
  DeviceGuard guard(dev);
  const size_t es = dtype_size(in.dtype());
  if (in.is_contiguous()) {
    CUDA_CHECK(cudaMemcpyAsync(out.data_ptr(), in.data_ptr(), size_t(n) * es,
                               cudaMemcpyDeviceToDevice, current_stream(dev)));
    return;
  }
  StridedLayout layout{};
  layout.ndim = int(in.dim());
  for (int d = 0; d < layout.ndim; ++d) {
    layout.shape[d] = in.shape()[d];
    layout.strides[d] = in.strides()[d];
  }
  const unsigned grid = grid_for(n, kCopyThreads);
  cudaStream_t st = current_stream(dev);
  switch (es) {
    case 2:
      copy_strided_kernel<<<grid, kCopyThreads, 0, st>>>(static_cast<uint16_t*>(out.data_ptr()),
                                                     static_cast<const uint16_t*>(in.data_ptr()),
                                                     n, layout);
      break;
    case 4:
      copy_strided_kernel<<<grid, kCopyThreads, 0, st>>>(static_cast<uint32_t*>(out.data_ptr()),
                                                     static_cast<const uint32_t*>(in.data_ptr()),
                                                     n, layout);
      break;
    case 8:
      copy_strided_kernel<<<grid, kCopyThreads, 0, st>>>(static_cast<uint64_t*>(out.data_ptr()),
                                                     static_cast<const uint64_t*>(in.data_ptr()),
                                                     n, layout);
      break;
    default: NHA_FAIL() << "copy_strided: element size " << es;
  }
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::fill(Tensor& out, double value) {
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "fill", "out");
  const int64_t n = out.numel();
  if (n == 0) return;
  DeviceGuard guard(dev);
  if (value == 0.0) {  // all-zero bits for every dtype (and -0.0 is not 0.0 bitwise: excluded)
    if (!std::signbit(value)) {
      CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0, out.nbytes(), current_stream(dev)));
      return;
    }
  }
  fill_kernel<<<grid_for(n, kCopyThreads), kCopyThreads, 0, current_stream(dev)>>>(out.data_ptr(),
                                                                          out.dtype(), n, value);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::cast(Tensor& out, const Tensor& in) {
  check_same_shape(out, in, "cast");
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "cast", "out");
  check_cuda_tensor(in, dev, "cast", "in");
  const int64_t n = in.numel();
  if (n == 0) return;
  DeviceGuard guard(dev);
  if (in.dtype() == out.dtype()) {
    CUDA_CHECK(cudaMemcpyAsync(out.data_ptr(), in.data_ptr(), in.nbytes(),
                               cudaMemcpyDeviceToDevice, current_stream(dev)));
    return;
  }
  cast_kernel<<<grid_for(n, kCopyThreads), kCopyThreads, 0, current_stream(dev)>>>(
      out.data_ptr(), out.dtype(), in.data_ptr(), in.dtype(), n);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double std) {
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "fill_normal", "out");
  const int64_t n = out.numel();
  if (n == 0) return;
  DeviceGuard guard(dev);
  fill_normal_kernel<<<grid_for(n, kCopyThreads), kCopyThreads, 0, current_stream(dev)>>>(
      out.data_ptr(), out.dtype(), n, seed, offset, std);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double lo, double hi) {
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "fill_uniform", "out");
  const int64_t n = out.numel();
  if (n == 0) return;
  DeviceGuard guard(dev);
  fill_uniform_kernel<<<grid_for(n, kCopyThreads), kCopyThreads, 0, current_stream(dev)>>>(
      out.data_ptr(), out.dtype(), n, seed, offset, lo, hi);
  CUDA_CHECK_LAUNCH();
}

}  // namespace nha
