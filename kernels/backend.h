// The device interface every op dispatches through.
//
// One Backend per device kind: the CPU backend implements everything (float32 and float64, the
// reference for all others); the CUDA backend (kernels/cuda) overrides what it has, in bf16/f32.
// A method a backend lacks fails with a message naming the op and device.
//
// Conventions for every kernel method:
//  * all tensor arguments are contiguous and on this backend's device; outputs are preallocated by
//    the caller with the documented shape and are fully overwritten (never accumulated into,
//    unless the name says so);
//  * floating tensors of one call share one dtype (f32 or f64 on the CPU); ids are i32 or i64;
//  * layouts are row-major; attention uses [B, T, H, D] (batch, time, head, head dim).
//  * statistics and losses (rstd, lse, per-row losses and dlosses, sum_squares' output) are f32 when
//    the floating inputs are bf16 (f64 for f64 inputs on the CPU). The CUDA backend also accepts, for
//    mixed precision: an f32 c in gemm with bf16 a, b; an f32 out in sum_dim with bf16 in; an f32 dw
//    in (add_)rmsnorm_backward with bf16 x, w; dlogits aliasing logits in cross_entropy_backward
//    (docs/cuda.md).
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace nha {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Every kernel (kernels/kernels.inc: name, parameters and the math): `virtual void name(...);`
#define NHA_KERNEL(name, params) virtual void name params;
#include "kernels/kernels.inc"
#undef NHA_KERNEL

  // ---- device-wide ------------------------------------------------------------------------------
  virtual void synchronize() {}
};

// The backend that owns tensors on `device` (the CPU one always exists).
Backend& backend_for(Device device);
Backend& backend_for(const Tensor& t);
#ifdef NHA_WITH_CUDA
// The CUDA backend (kernels/cuda/cuda_backend.cpp). backend_for(cuda:N) registers it on first use:
// the explicit call keeps the CUDA objects in a static-library link (a static-initialization
// registration object in an otherwise unreferenced object file would be dropped by the linker).
Backend& cuda_backend();
#endif

}  // namespace nha
