// The per-token recurrence of Native Hybrid Attention (docs/nha.md §2), written for clarity only:
// the tests' independent oracle for the chunkwise CPU kernel (kernels/cpu/nha.cpp) and, through
// it, for the CUDA kernels. O(T * (M*D + w*D)) per head, no chunking, no autograd.
#pragma once
#include <cstdint>
#include <utility>

#include "core/tensor.h"

namespace nha {

// q, k, qr, kr [B, T, H, Dk]; v [B, T, H, Dv]; s, g [B, T, H, M] (CPU, f32 or f64).
// Returns {out [B, T, H, Dv], lse [B, H, T]} in f64, computed in double:
//   per (b, h), Hk [Dk, M] = 0, Hv [M, Dv] = 0; for t = 0..T-1:
//     if j = t - window >= 0:  Hk = Hk * e^{g_j}[None,:] + k_j s_j^T
//                              Hv = Hv * e^{g_j}[:,None] + s_j v_j^T
//     logits = [scale q_t Hk ; scale qr_t . kr_u for t - window < u <= t]  (window 0: slots only)
//     lse_t = logsumexp(logits);  p = e^{logits - lse_t};  out_t = p[:M] Hv + sum_u p[M + u] v_u
std::pair<Tensor, Tensor> nha_recurrent_forward(const Tensor& q, const Tensor& k, const Tensor& qr,
                                                const Tensor& kr, const Tensor& v, const Tensor& s,
                                                const Tensor& g, double scale, int64_t window);

}  // namespace nha
