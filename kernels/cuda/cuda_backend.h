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

  void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                  size_t nbytes) override;
  void copy_strided(Tensor& out, const Tensor& in) override;
  void fill(Tensor& out, double value) override;
  void cast(Tensor& out, const Tensor& in) override;
  void fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double std) override;
  void fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double lo, double hi) override;

  void add(Tensor& out, const Tensor& a, const Tensor& b, double alpha, double beta) override;
  void mul(Tensor& out, const Tensor& a, const Tensor& b) override;
  void scale(Tensor& out, const Tensor& a, double s) override;
  void sum_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n, int64_t inner) override;
  void broadcast_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n,
                     int64_t inner) override;
  void sum_squares(Tensor& out, const Tensor& x) override;

  void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
            double beta) override;

  void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) override;
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override;
  void rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                       double eps) override;
  void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x,
                        const Tensor& w, const Tensor& rstd) override;
  void add_rmsnorm_forward(Tensor& h, Tensor& out, Tensor& rstd, const Tensor& x,
                           const Tensor& delta, const Tensor& w, double eps) override;
  void add_rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& dh,
                            const Tensor& h, const Tensor& w, const Tensor& rstd) override;
  void rope(Tensor& out, const Tensor& x, double base, int64_t start_pos, bool inverse) override;
  void silu_forward(Tensor& out, const Tensor& x) override;
  void silu_backward(Tensor& dx, const Tensor& dout, const Tensor& x) override;
  void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up) override;
  void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate,
                       const Tensor& up) override;
  void softmax_forward(Tensor& out, const Tensor& x) override;
  void softmax_backward(Tensor& dx, const Tensor& dout, const Tensor& out) override;
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, double scale, int64_t window) override;
  // attention_forward with `sinks` extra keys of logit 0 and value 0 that every query sees (the M
  // empty memory slots of an NHA layer with window >= T): they enlarge the softmax denominator
  // (out and lse) and contribute nothing to out. attention_backward with this out and lse is
  // the matching backward as it is.
  void attention_forward_sinks(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                               const Tensor& v, double scale, int64_t window, int64_t sinks);
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          double scale, int64_t window) override;
  void nha_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& qr,
                   const Tensor& kr, const Tensor& v, const Tensor& s, const Tensor& g,
                   double scale, int64_t window) override;
  void nha_backward(Tensor& dq, Tensor& dk, Tensor& dqr, Tensor& dkr, Tensor& dv, Tensor& ds,
                    Tensor& dg, const Tensor& dout, const Tensor& q, const Tensor& k,
                    const Tensor& qr, const Tensor& kr, const Tensor& v, const Tensor& s,
                    const Tensor& g, const Tensor& out, const Tensor& lse, double scale,
                    int64_t window) override;
  void nha_gate_forward(Tensor& g, Tensor& s, const Tensor& f) override;
  void nha_gate_backward(Tensor& df, const Tensor& dg, const Tensor& ds, const Tensor& f) override;
  void argmax(Tensor& out, const Tensor& x) override;
  void cross_entropy_forward(Tensor& losses, const Tensor& logits, const Tensor& targets,
                             int64_t ignore_index) override;
  void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                              const Tensor& dlosses, int64_t ignore_index) override;
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr,
                  double beta1, double beta2, double eps, double weight_decay,
                  int64_t step) override;
  void adamw_step_flat(Tensor& params, const Tensor& grads, Tensor& m, Tensor& v, Tensor& copy,
                       const Tensor& segments, double lr, double beta1, double beta2, double eps,
                       double weight_decay, int64_t step) override;

  // Waits for every device this process used and reports errors recorded by kernels.
  void synchronize() override;
};

}  // namespace nha
