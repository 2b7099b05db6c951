// The CUDA backend: every Backend method for f32 and bf16 tensors on cuda:N.
//
// Kernels compute in f32 (bf16 is a storage type); statistics and losses (rstd, lse, per-row
// losses, sum_squares) are f32 tensors even when the inputs are bf16. One .cu file per op family
// holds the forward and backward kernels side by side:
//   memory.cu        copy_strided, fill, cast, fill_normal / fill_uniform (Philox, same as CPU)
//   elementwise.cu   add, mul, scale, silu, swiglu, adamw_step, adamw_step_flat (multi-tensor)
//   reduce.cu        sum_dim, broadcast_dim, sum_squares (deterministic two-pass reductions)
//   gemm.cpp         gemm through cuBLASLt (bf16 in / f32 accumulate; true f32 for f32)
//   embedding.cu     embedding forward / backward (deterministic: radix sort + segment sums)
//   rmsnorm.cu       RMSNorm forward / backward, also fused with the residual add before it
//   rope.cu          rotary embedding (inverse = backward)
//   softmax.cu       softmax forward / backward, fused cross-entropy forward / backward
//   attention.cu     flash attention forward / backward (mma.sync, bf16) + a simple f32 path
//   nha.cu           Native Hybrid Attention core forward / backward (flash window branch + a
//                    chunk-parallel gated-slot memory branch, log-sum-exp merge) and the NHA gates
// cuda_backend.cpp holds copy_bytes, synchronize and the backend object.
#pragma once
#include "kernels/backend.h"

namespace nha {

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }

  // Every kernel of kernels/kernels.inc: `void name(...) override;`.
#define NHA_KERNEL(name, params) void name params override;
#include "kernels/kernels.inc"
#undef NHA_KERNEL

  // attention_forward with `sinks` extra keys of logit 0 and value 0 that every query sees (the M
  // empty memory slots of an NHA layer with window >= T): they enlarge the softmax denominator
  // (out and lse) and contribute nothing to out. attention_backward with this out and lse is
  // the matching backward as it is.
  void attention_forward_sinks(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                               const Tensor& v, double scale, int64_t window, int64_t sinks);

  // Waits for every device this process used and reports errors recorded by kernels.
  void synchronize() override;
};

}  // namespace nha
