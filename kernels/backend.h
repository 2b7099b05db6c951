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

  // ---- memory -----------------------------------------------------------------------------------
  // Copies nbytes between (possibly different) devices; one of them is this backend's.
  virtual void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                          size_t nbytes);
  // out (contiguous) = in (any strides, same shape and dtype).
  virtual void copy_strided(Tensor& out, const Tensor& in);
  virtual void fill(Tensor& out, double value);
  // out = in converted to out's dtype (same shape, same device).
  virtual void cast(Tensor& out, const Tensor& in);
  // out = N(0, std^2) / U[lo,hi) with element i drawn from counter `offset + i` (core/random.h).
  virtual void fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double std);
  virtual void fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double lo, double hi);

  // ---- elementwise (same shapes) ----------------------------------------------------------------
  // out = alpha * a + beta * b
  virtual void add(Tensor& out, const Tensor& a, const Tensor& b, double alpha, double beta);
  // out = a * b
  virtual void mul(Tensor& out, const Tensor& a, const Tensor& b);
  // out = s * a
  virtual void scale(Tensor& out, const Tensor& a, double s);

  // ---- reductions -------------------------------------------------------------------------------
  // in viewed as [outer, n, inner]: out[outer, inner] = sum over n.
  virtual void sum_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n, int64_t inner);
  // The adjoint of sum_dim: out[outer, n, inner] = in[outer, inner] for every n.
  virtual void broadcast_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n,
                             int64_t inner);
  // out (scalar, f32 or f64) = sum of x^2 over all elements (gradient norms).
  virtual void sum_squares(Tensor& out, const Tensor& x);

  // ---- matrix products --------------------------------------------------------------------------
  // c = alpha * op(a) @ op(b) + beta * c, op = transpose when the flag is set.
  // 2-D: a [M,K] (or [K,M] transposed), b [K,N] (or [N,K]), c [M,N].
  // 3-D: the same for every batch index; a leading dim of 1 in a or b is broadcast.
  virtual void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                    double alpha, double beta);

  // ---- embedding --------------------------------------------------------------------------------
  // out[n, :] = table[ids[n], :]     out [N, C], table [V, C], ids [N]
  virtual void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids);
  // dtable[v, :] = sum_{n: ids[n] == v} dout[n, :]   (deterministic: no float atomics)
  virtual void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids);

  // ---- RMSNorm over the last dim ----------------------------------------------------------------
  // rstd[n] = 1 / sqrt(mean_c x[n,c]^2 + eps);  out[n,c] = x[n,c] * rstd[n] * w[c]
  // x, out [N, C]; w [C]; rstd [N] (always f32 or f64, like x)
  virtual void rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                               double eps);
  // dx = rstd * (w*dout - xhat * mean_c(xhat * w * dout)), xhat = x * rstd;  dw = sum_n dout*xhat
  virtual void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x,
                                const Tensor& w, const Tensor& rstd);
  // RMSNorm fused with the residual add before it (the pre-norm block: h = x + mixer(...), then
  // the MLP's norm of h), one pass over the rows instead of two:
  //   h = x + delta;  rstd[n] = 1 / sqrt(mean_c h[n,c]^2 + eps);  out[n,c] = h[n,c] rstd[n] w[c]
  // x, delta, h, out [N, C]; w [C]; rstd [N]. The norm reads h as stored (rounded to its dtype), so
  // h, out and rstd are those of add() followed by rmsnorm_forward().
  virtual void add_rmsnorm_forward(Tensor& h, Tensor& out, Tensor& rstd, const Tensor& x,
                                   const Tensor& delta, const Tensor& w, double eps);
  // With dh the gradient arriving at h itself (the residual path) and dout the one at out:
  //   dx = dh + rstd * (w*dout - hhat * mean_c(hhat * w * dout)), hhat = h * rstd
  // which is the gradient of x and of delta alike (h = x + delta);  dw = sum_n dout * hhat.
  // dx, dout, dh, h [N, C]; w, dw [C]; rstd [N].
  virtual void add_rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& dh,
                                    const Tensor& h, const Tensor& w, const Tensor& rstd);

  // ---- rotary position embedding (rotate-half / NeoX) -------------------------------------------
  // x, out [B, T, H, D]; for i < D/2 with angle = (start_pos + t) * base^(-2i/D):
  //   out[i]       = x[i] cos - x[i + D/2] sin
  //   out[i + D/2] = x[i + D/2] cos + x[i] sin
  // inverse = true applies the transpose rotation (angle -> -angle): the backward.
  virtual void rope(Tensor& out, const Tensor& x, double base, int64_t start_pos, bool inverse);

  // ---- activations ------------------------------------------------------------------------------
  // out = x * sigmoid(x)
  virtual void silu_forward(Tensor& out, const Tensor& x);
  // dx = dout * sigmoid(x) * (1 + x * (1 - sigmoid(x)))
  virtual void silu_backward(Tensor& dx, const Tensor& dout, const Tensor& x);
  // out = silu(gate) * up
  virtual void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up);
  // dgate = dout * up * silu'(gate);  dup = dout * silu(gate)
  virtual void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate,
                               const Tensor& up);

  // ---- softmax over the last dim ----------------------------------------------------------------
  // out[n,:] = exp(x[n,:] - max) / sum exp(x[n,:] - max)        x, out [N, C]
  virtual void softmax_forward(Tensor& out, const Tensor& x);
  // dx = out * (dout - sum_c dout * out)
  virtual void softmax_backward(Tensor& dx, const Tensor& dout, const Tensor& out);

  // ---- causal attention with an optional sliding window -----------------------------------------
  // q, k, v, out [B, T, H, D]; lse [B, H, T] (f32/f64).
  // Query t sees keys j with t - window < j <= t (window <= 0: all j <= t).
  //   s_tj = scale * q_t . k_j;  lse_t = log sum_j exp(s_tj);  out_t = sum_j exp(s_tj - lse_t) v_j
  virtual void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                 const Tensor& v, double scale, int64_t window);
  // With P_tj = exp(s_tj - lse_t) and delta_t = dout_t . out_t:
  //   dv_j = sum_t P_tj dout_t;  dS_tj = P_tj (dout_t . v_j - delta_t)
  //   dq_t = scale sum_j dS_tj k_j;  dk_j = scale sum_t dS_tj q_t
  virtual void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                  const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, double scale,
                                  int64_t window);

  // ---- Native Hybrid Attention core (docs/nha.md §2, §4) ------------------------------------------
  // q, k   [B, T, H, Dk]  raw query/key (memory side: no RoPE)
  // qr, kr [B, T, H, Dk]  RoPE'd query/key (window side)
  // v      [B, T, H, Dv]  values (read by memory and window alike; the layer has Dv = Dk, the
  //                       golden files and the CPU kernels allow Dv != Dk)
  // s, g   [B, T, H, M]   slot write strength and log forget gate (g <= 0; the layer passes
  //                       s = 1 - e^g, the op treats s as an independent input)
  // out    [B, T, H, Dv];  lse [B, H, T] (f32; f64 for f64) = log of the joint softmax denominator.
  // Per (b, h), memory Hk [Dk, M], Hv [M, Dv] start at 0. At step t, first write token
  // j = t - window when j >= 0:
  //   Hk = Hk * e^{g_j}[None,:] + k_j s_j^T;  Hv = Hv * e^{g_j}[:,None] + s_j v_j^T;
  // then lm_t = scale q_t Hk (M logits), lw_tj = scale qr_t . kr_j for t - window < j <= t,
  // p_t = softmax([lm_t ; lw_t]), out_t = p_t[:M] Hv + sum_j p_t[M + j] v_j.
  // window = 0: no window (a pure gated-slot RNN); window >= T: memory never written (causal
  // attention plus M zero-logit, zero-value slots). s, g (and ds, dg) may be f32 when q is bf16.
  virtual void nha_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                           const Tensor& qr, const Tensor& kr, const Tensor& v, const Tensor& s,
                           const Tensor& g, double scale, int64_t window);
  // Gradients of sum(out * dout) with respect to every input (docs/nha.md §4 backward); out and lse
  // are nha_forward's. dg is the path through the decay e^g only (s is independent here).
  virtual void nha_backward(Tensor& dq, Tensor& dk, Tensor& dqr, Tensor& dkr, Tensor& dv,
                            Tensor& ds, Tensor& dg, const Tensor& dout, const Tensor& q,
                            const Tensor& k, const Tensor& qr, const Tensor& kr, const Tensor& v,
                            const Tensor& s, const Tensor& g, const Tensor& out,
                            const Tensor& lse, double scale, int64_t window);
  // The layer's gates, elementwise on f (any shape; g, s same shape, dtype of f or f32):
  //   g = logsigmoid(f) / 8;  s = 1 - e^g
  virtual void nha_gate_forward(Tensor& g, Tensor& s, const Tensor& f);
  //   df = (dg - e^g * ds) * sigmoid(-f) / 8
  virtual void nha_gate_backward(Tensor& df, const Tensor& dg, const Tensor& ds, const Tensor& f);

  // ---- argmax over the last dim (greedy decoding, evaluation) ----------------------------------
  // out[n] = the smallest c with x[n,c] = max_c' x[n,c']      x [N, C] floating; out [N] i64
  virtual void argmax(Tensor& out, const Tensor& x);

  // ---- cross-entropy ----------------------------------------------------------------------------
  // losses[n] = logsumexp(logits[n,:]) - logits[n, targets[n]], or 0 where targets[n] == ignore.
  // logits [N, V], targets [N] (i32/i64), losses [N]. Targets outside [0, V) fail with a message.
  virtual void cross_entropy_forward(Tensor& losses, const Tensor& logits, const Tensor& targets,
                                     int64_t ignore_index);
  // dlogits[n,:] = dlosses[n] * (softmax(logits[n,:]) - onehot(targets[n])), 0 for ignored rows.
  virtual void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                      const Tensor& dlosses, int64_t ignore_index);

  // ---- optimizer --------------------------------------------------------------------------------
  // AdamW (Loshchilov & Hutter), decoupled weight decay, bias-corrected, step counts from 1:
  //   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
  //   p -= lr * ( (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps) + weight_decay * p )
  // param, grad, m, v same shape; updated in place.
  virtual void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr,
                          double beta1, double beta2, double eps, double weight_decay,
                          int64_t step);
  // The same update for many parameters laid out in flat buffers, in one pass (train/optim.h):
  // params, grads, m, v [total] (one dtype: f32, or f64 on the CPU); segments [S, 3] i64 on the
  // params' device, row s = (offset, numel, decay): elements [offset, offset + numel) get
  // adamw_step's update with weight decay `weight_decay` where decay != 0 and none where it is 0.
  // Segments must not overlap; elements outside every segment are not read or written.
  // copy [total] bf16 (f32 params only) or undefined: where defined, every updated element's new
  // value is also written there, rounded to bf16 (the compute copy of fp32 master weights).
  virtual void adamw_step_flat(Tensor& params, const Tensor& grads, Tensor& m, Tensor& v,
                               Tensor& copy, const Tensor& segments, double lr, double beta1,
                               double beta2, double eps, double weight_decay, int64_t step);

  // ---- device-wide ------------------------------------------------------------------------------
  virtual void synchronize() {}
};

// The backend that owns tensors on `device` (the CPU one always exists).
Backend& backend_for(Device device);
Backend& backend_for(const Tensor& t);
// Called once by the CUDA backend when its library is loaded.
void register_backend(DeviceKind kind, Backend* backend);
#ifdef NHA_WITH_CUDA
// The CUDA backend (kernels/cuda/cuda_backend.cpp). backend_for(cuda:N) registers it on first use:
// the explicit call keeps the CUDA objects in a static-library link (a static-initialization
// registration object in an otherwise unreferenced object file would be dropped by the linker).
Backend& cuda_backend();
#endif

}  // namespace nha
