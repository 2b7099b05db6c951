// CUDA RMSNorm over the last dim: forward and backward, alone and fused with the residual add
// before it.
//
//   forward:  rstd[n] = 1 / sqrt(mean_c x[n,c]^2 + eps);  out[n,c] = x[n,c] rstd[n] w[c]
//   backward: xhat = x rstd;  dx = rstd (w dout - xhat mean_c(xhat w dout));  dw[c] = sum_n dout xhat
//   fused:    h = x + delta is written and normalized as stored (the forward's x is h);
//             backward dx = dh + the dx above (the gradient of x and of delta)
//   x, delta, h, out, dout, dh, dx [N, C] (f32 or bf16); w, dw [C] (x's dtype; dw may be f32);
//   rstd [N] f32.
// One warp per row (C is the model width: the row stays in L1 between the two passes). The
// backward's dw is a column sum over N: each block owns a fixed range of rows and writes its
// column partials [blocks, C] f32, which a second kernel sums in block order (deterministic).
// The fused kernels are the plain ones with the add compiled in (template flag ADD): the same
// loops in the same order, so the fused forward equals add() + rmsnorm_forward() bit for bit.
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace nha {

using namespace cuda;

namespace {

constexpr int kNormWarps = 8;  // rows per forward block (one warp each)

// ADD: h = x + delta (rounded to T) is written first and normalized as stored; else x is
// normalized (h, delta unused).
template <typename T, int VEC, bool ADD>
__global__ void rmsnorm_forward_kernel(T* __restrict__ out, float* __restrict__ rstd,
                                       T* __restrict__ h, const T* __restrict__ x,
                                       const T* __restrict__ delta, const T* __restrict__ w,
                                       int64_t N, int64_t C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t(kNormWarps) + (threadIdx.x >> 5);
  if (n >= N) return;
  const T* xr = x + n * C;
  float ss = 0.f;
  for (int64_t c = lane * VEC; c < C; c += 32 * VEC) {
    Pack<T, VEC> v = load_pack<T, VEC>(xr + c);
    if constexpr (ADD) {
      const Pack<T, VEC> d = load_pack<T, VEC>(delta + n * C + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = from_f32<T>(to_f32(v.v[e]) + to_f32(d.v[e]));
      store_pack<T, VEC>(h + n * C + c, v);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float f = to_f32(v.v[e]);
      ss += f * f;
    }
  }
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf(ss / float(C) + eps);
  if (lane == 0) rstd[n] = r;
  // The normalized row: h as stored (each lane reads back the elements it wrote itself).
  const T* src = ADD ? h + n * C : xr;
  T* yr = out + n * C;
  for (int64_t c = lane * VEC; c < C; c += 32 * VEC) {
    const Pack<T, VEC> v = load_pack<T, VEC>(src + c), g = load_pack<T, VEC>(w + c);
    Pack<T, VEC> y;
#pragma unroll
    for (int e = 0; e < VEC; ++e) y.v[e] = from_f32<T>(to_f32(v.v[e]) * r * to_f32(g.v[e]));
    store_pack<T, VEC>(yr + c, y);
  }
}

// Block b owns rows [b*rows_per_block, ..): its warps compute dx row by row (ADD: plus dh), then
// the block's threads own columns and write partial[b, c] = sum over its rows of
// dout[n,c] x[n,c] rstd[n].
template <typename T, int VEC, bool ADD>
__global__ void rmsnorm_backward_kernel(T* __restrict__ dx, float* __restrict__ partial,
                                        const T* __restrict__ dout, const T* __restrict__ dh,
                                        const T* __restrict__ x, const T* __restrict__ w,
                                        const float* __restrict__ rstd, int64_t N, int64_t C,
                                        int64_t rows_per_block) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = blockIdx.x * rows_per_block, n1 = min(N, n0 + rows_per_block);
  for (int64_t n = n0 + warp; n < n1; n += kNormWarps) {
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
      if constexpr (ADD) o = load_pack<T, VEC>(dh + n * C + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = to_f32(xv.v[e]) * r;
        float d = r * (to_f32(wv.v[e]) * to_f32(gv.v[e]) - xhat * mean);
        if constexpr (ADD) d += to_f32(o.v[e]);
        o.v[e] = from_f32<T>(d);
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

// rmsnorm_forward (h, delta null) and add_rmsnorm_forward: checks, then one launch.
void launch_rmsnorm_forward(const char* op, Tensor& out, Tensor& rstd, Tensor* h, const Tensor& x,
                            const Tensor* delta, const Tensor& w, double eps) {
  const int dev = x.device().index;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&out, &rstd, &x, &w})
    check_cuda_tensor(*t, dev, op, "arg");
  const int64_t C = x.size(-1), N = x.numel() / std::max<int64_t>(C, 1);
  NHA_CHECK(w.numel() == C && rstd.numel() == N && out.numel() == x.numel())
      << op << ": x " << x.str() << ", weight " << w.str() << ", rstd " << rstd.str() << ", out "
      << out.str();
  NHA_CHECK(w.dtype() == x.dtype() && out.dtype() == x.dtype())
      << op << ": x, weight, out must share a dtype, got " << x.str() << ", " << w.str() << ", "
      << out.str();
  for (const Tensor* t : {static_cast<const Tensor*>(h), delta}) {
    if (!t) continue;
    check_cuda_tensor(*t, dev, op, "h/delta");
    NHA_CHECK(t->numel() == x.numel() && t->dtype() == x.dtype())
        << op << ": h and delta must be like x " << x.str() << ", got " << t->str();
  }
  check_dtype_is(rstd, DType::F32, op, "rstd");
  if (N == 0 || C == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  const unsigned grid = unsigned((N + kNormWarps - 1) / kNormWarps);
  dispatch_f32_bf16(x, op, [&]<typename T>() {
    T* o = static_cast<T*>(out.data_ptr());
    T* ph = h ? static_cast<T*>(h->data_ptr()) : nullptr;
    const T *px = static_cast<const T*>(x.data_ptr()), *pw = static_cast<const T*>(w.data_ptr());
    const T* pd = delta ? static_cast<const T*>(delta->data_ptr()) : nullptr;
    float* r = static_cast<float*>(rstd.data_ptr());
    auto launch = [&]<int VEC>() {
      if (h)
        rmsnorm_forward_kernel<T, VEC, true><<<grid, kNormWarps * 32, 0, st>>>(
            o, r, ph, px, pd, pw, N, C, float(eps));
      else
        rmsnorm_forward_kernel<T, VEC, false><<<grid, kNormWarps * 32, 0, st>>>(
            o, r, ph, px, pd, pw, N, C, float(eps));
    };
    if (can_vectorize<T>(C, {o, px, pw, ph ? ph : o, pd ? pd : px}))
      launch.template operator()<kVec16<T>>();
    else
      launch.template operator()<1>();
    CUDA_CHECK_LAUNCH();
  });
}

// rmsnorm_backward (dh null) and add_rmsnorm_backward: checks, then the dx kernel and the dw sum.
void launch_rmsnorm_backward(const char* op, Tensor& dx, Tensor& dw, const Tensor& dout,
                             const Tensor* dh, const Tensor& x, const Tensor& w,
                             const Tensor& rstd) {
  const int dev = x.device().index;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dx, &dw, &dout, &x, &w, &rstd})
    check_cuda_tensor(*t, dev, op, "arg");
  const int64_t C = x.size(-1), N = x.numel() / std::max<int64_t>(C, 1);
  NHA_CHECK(w.numel() == C && dw.numel() == C && rstd.numel() == N &&
            dout.numel() == x.numel() && dx.numel() == x.numel())
      << op << ": x " << x.str() << ", weight " << w.str() << ", rstd " << rstd.str();
  NHA_CHECK(w.dtype() == x.dtype() && dout.dtype() == x.dtype() && dx.dtype() == x.dtype() &&
            (dw.dtype() == x.dtype() || dw.dtype() == DType::F32))
      << op << ": dtypes x " << x.str() << ", dout " << dout.str() << ", dx " << dx.str()
      << ", dw " << dw.str();
  if (dh) {
    check_cuda_tensor(*dh, dev, op, "dh");
    NHA_CHECK(dh->numel() == x.numel() && dh->dtype() == x.dtype())
        << op << ": dh must be like h " << x.str() << ", got " << dh->str();
  }
  check_dtype_is(rstd, DType::F32, op, "rstd");
  if (C == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  if (N == 0) {
    backend_for(dw).fill(dw, 0.0);
    return;
  }
  // Rows per block from N alone (deterministic): about 1024 blocks, at least 16 rows each.
  const int64_t rows_per_block = std::max<int64_t>(16, (N + 1023) / 1024);
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  Scratch partial(size_t(blocks * C) * sizeof(float), dev);  // [blocks, C]
  dispatch_f32_bf16(x, op, [&]<typename T>() {
    T* pdx = static_cast<T*>(dx.data_ptr());
    const T *pg = static_cast<const T*>(dout.data_ptr()), *px = static_cast<const T*>(x.data_ptr()),
            *pw = static_cast<const T*>(w.data_ptr());
    const T* pdh = dh ? static_cast<const T*>(dh->data_ptr()) : nullptr;
    const float* r = static_cast<const float*>(rstd.data_ptr());
    auto launch = [&]<int VEC>() {
      if (dh)
        rmsnorm_backward_kernel<T, VEC, true><<<unsigned(blocks), kNormWarps * 32, 0, st>>>(
            pdx, partial.as<float>(), pg, pdh, px, pw, r, N, C, rows_per_block);
      else
        rmsnorm_backward_kernel<T, VEC, false><<<unsigned(blocks), kNormWarps * 32, 0, st>>>(
            pdx, partial.as<float>(), pg, pdh, px, pw, r, N, C, rows_per_block);
    };
    if (can_vectorize<T>(C, {pdx, pg, px, pw, pdh ? pdh : px}))
      launch.template operator()<kVec16<T>>();
    else
      launch.template operator()<1>();
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

}  // namespace

void CudaBackend::rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                                  double eps) {
  launch_rmsnorm_forward("rmsnorm_forward", out, rstd, nullptr, x, nullptr, w, eps);
}

void CudaBackend::rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x,
                                   const Tensor& w, const Tensor& rstd) {
  launch_rmsnorm_backward("rmsnorm_backward", dx, dw, dout, nullptr, x, w, rstd);
}

void CudaBackend::add_rmsnorm_forward(Tensor& h, Tensor& out, Tensor& rstd, const Tensor& x,
                                      const Tensor& delta, const Tensor& w, double eps) {
  launch_rmsnorm_forward("add_rmsnorm_forward", out, rstd, &h, x, &delta, w, eps);
}

void CudaBackend::add_rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout,
                                       const Tensor& dh, const Tensor& h, const Tensor& w,
                                       const Tensor& rstd) {
  launch_rmsnorm_backward("add_rmsnorm_backward", dx, dw, dout, &dh, h, w, rstd);
}

}  // namespace nha
