// CUDA RMSNorm over the last dim: forward and backward.
//
//   forward:  rstd[n] = 1 / sqrt(mean_c x[n,c]^2 + eps);  out[n,c] = x[n,c] rstd[n] w[c]
//   backward: xhat = x rstd;  dx = rstd (w dout - xhat mean_c(xhat w dout));  dw[c] = sum_n dout xhat
//   x, out, dout, dx [N, C] (f32 or bf16); w, dw [C] (x's dtype; dw may be f32); rstd [N] f32.
// One warp per row (C is the model width: the row stays in L1 between the two passes). The
// backward's dw is a column sum over N: each block owns a fixed range of rows and writes its
// column partials [blocks, C] f32, which a second kernel sums in block order (deterministic).
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace nha {

using namespace cuda;

namespace {

constexpr int kWarps = 8;  // rows per forward block (one warp each)

template <typename T, int VEC>
__global__ void rmsnorm_forward_kernel(T* __restrict__ out, float* __restrict__ rstd,
                                       const T* __restrict__ x, const T* __restrict__ w,
                                       int64_t N, int64_t C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (n >= N) return;
  const T* xr = x + n * C;
  float ss = 0.f;
  for (int64_t c = lane * VEC; c < C; c += 32 * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(xr + c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float f = to_f32(v.v[e]);
      ss += f * f;
    }
  }
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf(ss / float(C) + eps);
  if (lane == 0) rstd[n] = r;
  T* yr = out + n * C;
  for (int64_t c = lane * VEC; c < C; c += 32 * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(xr + c), g = load_pack<T, VEC>(w + c);
    Pack<T, VEC> y;
#pragma unroll
    for (int e = 0; e < VEC; ++e) y.v[e] = from_f32<T>(to_f32(v.v[e]) * r * to_f32(g.v[e]));
    store_pack<T, VEC>(yr + c, y);
  }
}

// Block b owns rows [b*rows_per_block, ..): its warps compute dx row by row, then the block's
// threads own columns and write partial[b, c] = sum over its rows of dout[n,c] x[n,c] rstd[n].
template <typename T, int VEC>
__global__ void rmsnorm_backward_kernel(T* __restrict__ dx, float* __restrict__ partial,
                                        const T* __restrict__ dout, const T* __restrict__ x,
                                        const T* __restrict__ w, const float* __restrict__ rstd,
                                        int64_t N, int64_t C, int64_t rows_per_block) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = blockIdx.x * rows_per_block, n1 = min(N, n0 + rows_per_block);
  for (int64_t n = n0 + warp; n < n1; n += kWarps) {
    const T *g = dout + n * C, *xr = x + n * C;
    const float r = rstd[n];
    float dot = 0.f;  // sum_c xhat w dout
    for (int64_t c = lane * VEC; c < C; c += 32 * VEC) {
      const Pack<T, VEC> gv = load_pack<T, VEC>(g + c), xv = load_pack<T, VEC>(xr + c),
                         wv = load_pack<T, VEC>(w + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += to_f32(xv.v[e]) * to_f32(wv.v[e]) * to_f32(gv.v[e]);
    }
    const float mean = warp_sum(dot) * r / float(C);
    T* dxr = dx + n * C;
    for (int64_t c = lane * VEC; c < C; c += 32 * VEC) {
      const Pack<T, VEC> gv = load_pack<T, VEC>(g + c), xv = load_pack<T, VEC>(xr + c),
                         wv = load_pack<T, VEC>(w + c);
      Pack<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = to_f32(xv.v[e]) * r;
        o.v[e] = from_f32<T>(r * (to_f32(wv.v[e]) * to_f32(gv.v[e]) - xhat * mean));
      }
      store_pack<T, VEC>(dxr + c, o);
    }
  }
  // Column partials of dw over this block's rows, in row order.
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.f;
    for (int64_t n = n0; n < n1; ++n) acc += to_f32(dout[n * C + c]) * to_f32(x[n * C + c]) * rstd[n];
    partial[blockIdx.x * C + c] = acc;
  }
}

// dw[c] = sum_b partial[b, c] in b order
template <typename Tw>
__global__ void rmsnorm_dw_kernel(Tw* __restrict__ dw, const float* __restrict__ partial,
                                  int64_t blocks, int64_t C) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t b = 0; b < blocks; ++b) acc += partial[b * C + c];
    dw[c] = from_f32<Tw>(acc);
  }
}

template <typename T>
bool can_vectorize(int64_t C, std::initializer_list<const void*> ptrs) {
  if (C % kVec16<T> != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

}  // namespace

void CudaBackend::rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                                  double eps) {
  const int dev = x.device().index;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&out, &rstd, &x, &w}) check_cuda_tensor(*t, dev, "rmsnorm_forward", "arg");
  const int64_t C = x.size(-1), N = x.numel() / std::max<int64_t>(C, 1);
  NHA_CHECK(w.numel() == C && rstd.numel() == N && out.numel() == x.numel())
      << "rmsnorm: x " << x.str() << ", weight " << w.str() << ", rstd " << rstd.str()
      << ", out " << out.str();
  NHA_CHECK(w.dtype() == x.dtype() && out.dtype() == x.dtype())
      << "rmsnorm: x, weight, out must share a dtype, got " << x.str() << ", " << w.str() << ", "
      << out.str();
  check_dtype_is(rstd, DType::F32, "rmsnorm_forward", "rstd");
  if (N == 0 || C == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  const unsigned grid = unsigned((N + kWarps - 1) / kWarps);
  dispatch_f32_bf16(x, "rmsnorm_forward", [&]<typename T>() {
    T* o = static_cast<T*>(out.data_ptr());
    const T *px = static_cast<const T*>(x.data_ptr()), *pw = static_cast<const T*>(w.data_ptr());
    float* r = static_cast<float*>(rstd.data_ptr());
    if (can_vectorize<T>(C, {o, px, pw}))
      rmsnorm_forward_kernel<T, kVec16<T>><<<grid, kWarps * 32, 0, st>>>(o, r, px, pw, N, C,
                                                                          float(eps));
    else
      rmsnorm_forward_kernel<T, 1><<<grid, kWarps * 32, 0, st>>>(o, r, px, pw, N, C, float(eps));
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x,
                                   const Tensor& w, const Tensor& rstd) {
  const int dev = x.device().index;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dx, &dw, &dout, &x, &w, &rstd})
    check_cuda_tensor(*t, dev, "rmsnorm_backward", "arg");
  const int64_t C = x.size(-1), N = x.numel() / std::max<int64_t>(C, 1);
  NHA_CHECK(w.numel() == C && dw.numel() == C && rstd.numel() == N &&
            dout.numel() == x.numel() && dx.numel() == x.numel())
      << "rmsnorm backward: x " << x.str() << ", weight " << w.str() << ", rstd " << rstd.str();
  NHA_CHECK(w.dtype() == x.dtype() && dout.dtype() == x.dtype() && dx.dtype() == x.dtype() &&
            (dw.dtype() == x.dtype() || dw.dtype() == DType::F32))
      << "rmsnorm backward: dtypes x " << x.str() << ", dout " << dout.str() << ", dx "
      << dx.str() << ", dw " << dw.str();
  check_dtype_is(rstd, DType::F32, "rmsnorm_backward", "rstd");
  if (C == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  if (N == 0) {
    fill(dw, 0.0);
    return;
  }
  // Rows per block from N alone (deterministic): about 1024 blocks, at least 16 rows each.
  const int64_t rows_per_block = std::max<int64_t>(16, (N + 1023) / 1024);
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  Scratch partial(size_t(blocks * C) * sizeof(float), dev);  // [blocks, C]
  dispatch_f32_bf16(x, "rmsnorm_backward", [&]<typename T>() {
    T* pdx = static_cast<T*>(dx.data_ptr());
    const T *pg = static_cast<const T*>(dout.data_ptr()), *px = static_cast<const T*>(x.data_ptr()),
            *pw = static_cast<const T*>(w.data_ptr());
    const float* r = static_cast<const float*>(rstd.data_ptr());
    if (can_vectorize<T>(C, {pdx, pg, px, pw}))
      rmsnorm_backward_kernel<T, kVec16<T>><<<unsigned(blocks), kWarps * 32, 0, st>>>(
          pdx, partial.as<float>(), pg, px, pw, r, N, C, rows_per_block);
    else
      rmsnorm_backward_kernel<T, 1><<<unsigned(blocks), kWarps * 32, 0, st>>>(
          pdx, partial.as<float>(), pg, px, pw, r, N, C, rows_per_block);
    CUDA_CHECK_LAUNCH();
    if (dw.dtype() == DType::F32)
      rmsnorm_dw_kernel<float><<<grid_for(C, 256), 256, 0, st>>>(
          static_cast<float*>(dw.data_ptr()), partial.as<float>(), blocks, C);
    else
      rmsnorm_dw_kernel<T><<<grid_for(C, 256), 256, 0, st>>>(static_cast<T*>(dw.data_ptr()),
                                                            partial.as<float>(), blocks, C);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace nha
