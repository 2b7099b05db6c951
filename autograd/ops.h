// Differentiable operations. Each one runs its kernel through the input's Backend and, when an
// input requires grad, records a Node whose backward calls the matching backward kernel.
// Forward and backward of an op live side by side in autograd/ops/<family>.cpp.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace nha {

// ---- elementwise (same shapes; no broadcasting) -------------------------------------------------
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor scale(const Tensor& a, double s);
inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator*(const Tensor& a, double s) { return scale(a, s); }
inline Tensor operator*(double s, const Tensor& a) { return scale(a, s); }

// ---- casts (Tensor::to is the ordinary one) -----------------------------------------------------
// x.to(copy.dtype()) where `copy` (same shape and device) already holds exactly those values: a
// weight copy kept current by its owner (AdamW's bf16 copy, autograd/autocast.h). Returns an alias of
// `copy`, recorded with x.to()'s backward: the gradient is cast back to x's dtype and reaches x.
Tensor cast_alias(const Tensor& x, const Tensor& copy);

// ---- reductions ---------------------------------------------------------------------------------
Tensor sum(const Tensor& a);                               // scalar (shape [])
Tensor mean(const Tensor& a);                              // scalar
Tensor sum(const Tensor& a, int64_t dim, bool keepdim = false);
// rows [N, C] floating -> [N] i64: the first index of each row's maximum (greedy decoding,
// accuracies). Not differentiable: the result records no gradient.
Tensor argmax(const Tensor& rows);

// ---- matrix products ----------------------------------------------------------------------------
// a [..., M, K] @ b [K, N] -> [..., M, N]; or batched a [B, M, K] @ b [B, K, N] -> [B, M, N].
Tensor matmul(const Tensor& a, const Tensor& b);
// y = x W^T: x [..., in], weight [out, in] -> [..., out] (PyTorch's nn.Linear layout, no bias).
Tensor linear(const Tensor& x, const Tensor& weight);

// ---- model ops ----------------------------------------------------------------------------------
// table [V, C], ids [...] (i32/i64) -> [..., C]
Tensor embedding(const Tensor& table, const Tensor& ids);
// x [..., C], weight [C] -> [..., C]
Tensor rmsnorm(const Tensor& x, const Tensor& weight, double eps);
// The residual add and the RMSNorm after it in one kernel (pre-norm blocks):
// x, delta [..., C], weight [C] -> {h = x + delta, rmsnorm(h, weight, eps)}, both [..., C].
std::pair<Tensor, Tensor> add_rmsnorm(const Tensor& x, const Tensor& delta, const Tensor& weight,
                                      double eps);
// x [B, T, H, D] -> rotated by position start_pos + t (rotate-half, see kernels/backend.h)
Tensor rope(const Tensor& x, double base = 10000.0, int64_t start_pos = 0);
Tensor silu(const Tensor& x);
Tensor swiglu(const Tensor& gate, const Tensor& up);      // silu(gate) * up
Tensor softmax(const Tensor& x);                          // over the last dim
// q, k, v [B, T, H, D] -> [B, T, H, D]; causal, keys t-window < j <= t (window <= 0: unlimited).
// scale <= 0 means 1/sqrt(D).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window = 0,
                 double scale = 0.0);
// Same, also returning the log-sum-exp of the scores, lse [B, H, T] (not differentiable).
std::pair<Tensor, Tensor> attention_with_lse(const Tensor& q, const Tensor& k, const Tensor& v,
                                             int64_t window = 0, double scale = 0.0);
// Native Hybrid Attention core (docs/nha.md §2; math in kernels/backend.h nha_forward):
// q, k (memory side, raw), qr, kr (window side, RoPE'd), v [B, T, H, D]; s, g [B, T, H, M]
// -> [B, T, H, D]. window 0 = pure memory, >= T = full attention + M null slots.
// scale <= 0 means 1/sqrt(D).
Tensor nha_attend(const Tensor& q, const Tensor& k, const Tensor& qr, const Tensor& kr,
                  const Tensor& v, const Tensor& s, const Tensor& g, int64_t window,
                  double scale = 0.0);
// NHA gates from the gate projection f: {g = logsigmoid(f) / 8, s = 1 - exp(g)}.
std::pair<Tensor, Tensor> nha_gates(const Tensor& f);
// Mean over non-ignored rows of -log softmax(logits)[target]. logits [N, V], targets [N].
// A batch where every target is ignored has loss 0 (and zero gradient). `valid_count`: the number
// of non-ignored targets when the caller knows it (the trainer counts them in its host copy);
// -1 counts them here, which reads device targets back: a host sync per call on a GPU.
inline constexpr int64_t kIgnoreTarget = -100;  // the data loaders' data::kIgnoreIndex
Tensor cross_entropy(const Tensor& logits, const Tensor& targets,
                     int64_t ignore_index = kIgnoreTarget, int64_t valid_count = -1);

}  // namespace nha
