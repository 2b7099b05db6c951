// Mixed precision: autocast, PyTorch's torch.autocast in small.
//
// The trainer keeps fp32 master parameters and, on the GPU with train.precision bf16, runs each
// forward pass under an AutocastGuard(DType::BF16). While the guard is alive (on this thread):
//   linear / matmul   cast both operands to the autocast dtype: GEMMs and everything fed by them
//                     (RoPE, attention, NHA, SwiGLU, the logits) run in bf16;
//   embedding         casts its output (the table stays fp32), so the residual stream is bf16;
//   rmsnorm           casts x and the gain (the kernel computes in fp32 internally; rstd is fp32).
// Every cast is the differentiable Tensor::to(dtype): the backward casts the gradient back, so the
// gradients that reach the fp32 master parameters are fp32 and accumulate in fp32 over
// micro-batches; AdamW and its moments stay fp32. The loss is fp32 (cross-entropy of bf16 logits
// returns an fp32 loss, see docs/cuda.md "Dtype rules").
// Outside a guard, or with the guard's dtype equal to the tensors' own, nothing is cast.
// f64 tensors (float64 gradient checks) and integer tensors are never cast.
#pragma once
#include "core/dtype.h"
#include "core/tensor.h"

namespace nha {

class AutocastGuard {
 public:
  // dtype F32 turns autocast off in the scope (e.g. inside a region that must stay fp32).
  explicit AutocastGuard(DType dtype);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool prev_enabled_;
  DType prev_dtype_;
};

// Whether autocast is on for this thread, and its compute dtype.
bool autocast_enabled();
DType autocast_dtype();

// t.to(autocast dtype) when autocast is on and t is an f32/bf16 tensor of another dtype; else t.
Tensor autocast(const Tensor& t);

}  // namespace nha
