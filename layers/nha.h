// The Native Hybrid Attention mixer (SPEC-NHA §2) and its constant-memory decode form (§5).
//
//   q = x Wq^T, k = x Wk^T, v = SiLU(x Wv^T)            [B, T, H, hd]  (heads: slices of d)
//   f = x Wf^T -> g = logsigmoid(f)/8, s = 1 - e^g       [B, T, H, M]   (head h: features h*M..)
//   qr = RoPE(q), kr = RoPE(k)                           window side only; memory uses q, k raw
//   o = nha_attend(q, k, qr, kr, v, s, g; window)        one softmax over [M slots ; w window]
//   y = RMSNorm(SiLU(concat_heads(o))) Wo^T              RMSNorm over d, own gain, eps 1e-6
// window 0 = pure gated-slot memory (the gsa mixer), window >= T = full attention + M null slots.
#pragma once
#include <memory>

#include "layers/transformer.h"

namespace nha {

// Generation state of one NHA layer for a batch of B sequences (SPEC-NHA §5); its size does not
// grow with the number of tokens:
//   Hk [B, H, hd, M], Hv [B, H, M, hd]   the memory, f32 (f64 for an f64 model)
//   ring of the last `cap` = min(window, max_len) tokens, token u in slot u % cap (same dtype):
//     k, kr [B, cap, H, hd]  raw key (memory write) and RoPE'd key (window logits)
//     v     [B, cap, H, hd]  value after SiLU
//     g, s  [B, cap, H, M]   log forget gate and write strength
//   pos: tokens consumed so far = absolute position of the next token.
// window 0 keeps no ring. Memory per sequence: H*M*2*hd + cap*(3*d + 2*H*M) numbers.
struct NhaDecodeState {
  Tensor Hk, Hv;
  Tensor k, kr, v, g, s;
  int64_t cap = 0;
  int64_t pos = 0;
};

class NhaMixer : public Mixer {
 public:
  // Parameters in this order: wq, wk, wv [d, d], wf [H*M, d], wo [d, d] (init std scaled by
  // out_scale), out_norm [d]. mixer.window is w, mixer.slots is M.
  NhaMixer(const ModelConfig& cfg, const MixerConfig& mixer, double out_scale, Generator& gen);
  // x [B, T, d] -> [B, T, d]
  Tensor forward(const Tensor& x) const override;

  // Empty state for `batch` sequences of at most `max_len` tokens (max_len only bounds the ring
  // when window > max_len; with window <= max_len, step() runs for any number of tokens).
  NhaDecodeState decode_state(int64_t batch, int64_t max_len) const;
  // One token for every sequence: x_t [B, 1, d] -> [B, 1, d], equal to forward()'s row at
  // position st.pos. Advances st. CPU only, no autograd.
  Tensor step(const Tensor& x_t, NhaDecodeState& st) const;

  std::shared_ptr<Linear> wq, wk, wv, wf, wo;
  std::shared_ptr<RMSNorm> out_norm;
  int64_t n_heads, window, slots;
  double rope_base;

 private:
  // The projections of forward() for x [B, T, d] at absolute positions start_pos..:
  // {q, k, qr, kr, v [B, T, H, hd], s, g [B, T, H, M]}.
  struct Projections {
    Tensor q, k, qr, kr, v, s, g;
  };
  Projections project(const Tensor& x, int64_t start_pos) const;
  // y = RMSNorm(SiLU(o)) Wo^T for o [B, T, H, hd].
  Tensor output(const Tensor& o) const;
};

}  // namespace nha
