// Device-side helpers shared by the CUDA kernels: element conversion, 16-byte packs, warp and block
// reductions with a fixed combination order (deterministic), and the f32/bf16 dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "core/tensor.h"
#include "kernels/cuda/cuda_common.h"

namespace nha::cuda {

using bf16_t = __nv_bfloat16;

// ---- element conversion: every kernel computes in f32 ------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) { return __float2bfloat16_rn(x); }

// ---- 16-byte packs: VEC elements loaded/stored with one instruction ------------------------------
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}
// Elements per 16-byte pack.
template <typename T>
constexpr int kVec16 = int(16 / sizeof(T));

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- reductions (butterfly over a warp, then warps in order: the same order every run) ---------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block; every thread gets the result. `shared` holds >= 32 floats. blockDim.x must
// be a multiple of 32. Contains __syncthreads: call from all threads.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? shared[lane] : 0.f;
  return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? shared[lane] : -INFINITY;
  return warp_max(t);
}

// Online softmax statistics in base 2: m = max of the values scaled by log2(e), s = sum of
// exp2(value - m); merging two partial results rescales the smaller-max one.
struct MaxSum {
  float m, s;
};
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * exp2f(a.m - m) + b.s * exp2f(b.m - m)};
}
// Adds one value already scaled by log2(e).
__device__ __forceinline__ void add_value(MaxSum& a, float x2) {
  if (x2 > a.m) {
    a.s = a.s * exp2f(a.m - x2) + 1.f;
    a.m = x2;
  } else if (x2 != -INFINITY) {
    a.s += exp2f(x2 - a.m);
  }
}
__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum w{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, w);
  }
  return v;
}
// `shared` holds >= 64 floats. Contains __syncthreads: call from all threads.
__device__ __forceinline__ MaxSum block_merge(MaxSum v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_merge(v);
  __syncthreads();
  if (lane == 0) {
    shared[warp] = v.m;
    shared[32 + warp] = v.s;
  }
  __syncthreads();
  MaxSum t = lane < nwarps ? MaxSum{shared[lane], shared[32 + lane]} : MaxSum{-INFINITY, 0.f};
  return warp_merge(t);
}

// ---- dtype dispatch ------------------------------------------------------------------------------
// Calls fn.template operator()<T>() with T = float or bf16_t after t's dtype.
template <typename F>
void dispatch_f32_bf16(const Tensor& t, const char* op, F&& fn) {
  switch (t.dtype()) {
    case DType::F32: fn.template operator()<float>(); return;
    case DType::BF16: fn.template operator()<bf16_t>(); return;
    default:
      NHA_FAIL() << op << " on CUDA needs f32 or bf16 tensors, got " << t.str()
                 << ". HINT: f64 is CPU-only; convert with .to(DType::F32)";
  }
}

}  // namespace nha::cuda
