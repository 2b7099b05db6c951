// The Native Hybrid Attention mixer (docs/nha.md §2) and its constant-memory decode form (§5).
//
//   q = x Wq^T, k = x Wk^T, v = SiLU(x Wv^T)            [B, T, H, hd]  (heads: slices of d)
//   f = x Wf^T -> g = logsigmoid(f)/8, s = 1 - e^g       [B, T, H, M]   (head h: features h*M..)
//   qr = RoPE(q), kr = RoPE(k)                           window side only; memory uses q, k raw
//   o = nha_attend(q, k, qr, kr, v, s, g; window)        one softmax over [M slots ; w window]
//   y = RMSNorm(SiLU(concat_heads(o))) Wo^T              RMSNorm over d, own gain, eps 1e-6
// window 0 = pure gated-slot memory (the gsa mixer), window >= T = full attention + M null slots.
#pragma once
#include <memory>

#include "layers/mixer.h"

namespace nha {

// Generation state of one NHA layer for a batch of B rows (docs/nha.md §5); its size does not grow
// with the number of tokens. f32 (f64 for an f64 model):
//   Hk [B, H, hd, M], Hv [B, H, M, hd]   the memory
//   rings of the last `cap` = min(window, max_len) steps (layers/transformer.h, step t in slot
//   t % cap; padding and steps not taken yet are zeros, which the memory write treats as no-ops):
//     k, kr [cap, B, H, hd]  raw key (memory write) and RoPE'd key (window logits)
//     v     [cap, B, H, hd]  value after SiLU
//     s     [cap, B, H, M]   write strength; the decay e^g is 1 - s (the layer's s is 1 - e^g)
//   pos, start: the steps taken and each row's first step (MixerState).
// window 0 keeps no ring. Memory per row: H*M*2*hd + cap*(3*d + H*M) numbers.
struct NhaDecodeState : MixerState {
  Tensor Hk, Hv;
  Tensor k, kr, v, s;
  int64_t cap = 0;
};

class NhaMixer : public Mixer {
 public:
  // Parameters in this order: wq, wk, wv [d, d], wf [H*M, d], wo [d, d] (init std scaled by
  // out_scale), out_norm [d]. mixer.window is w, mixer.slots is M.
  NhaMixer(const ModelConfig& cfg, const MixerConfig& mixer, double out_scale, Generator& gen);
  // x [B, T, d] -> [B, T, d]
  Tensor forward(const Tensor& x) const override;

  // Empty state for `batch` rows of at most `max_len` steps (max_len only bounds the ring when
  // window > max_len; with window <= max_len, step() runs for any number of tokens).
  NhaDecodeState decode_state(int64_t batch, int64_t max_len) const;
  std::unique_ptr<MixerState> new_state(int64_t batch, int64_t max_len) const override;
  // forward() of every prompt; the memory of each row is the prompt's tokens that have left the
  // window, summed in closed form, and the ring holds the rest.
  std::vector<Tensor> prefill(const std::vector<Tensor>& xs, MixerState& st) const override;
  // One token for every row: x_t [B, 1, d] -> [B, 1, d], equal to forward()'s row at each row's
  // position. Advances st. Backend ops only (CPU and CUDA), no autograd.
  Tensor step(const Tensor& x_t, MixerState& st) const override;

  std::shared_ptr<Linear> wq, wk, wv, wf, wo;
  std::shared_ptr<RMSNorm> out_norm;
  int64_t n_heads, window, slots;
  double rope_base;

 private:
  // The projections of forward() for x [B, T, d], row b at absolute positions positions[b]..:
  // {q, k, qr, kr, v [B, T, H, hd], s, g [B, T, H, M]}.
  struct Projections {
    Tensor q, k, qr, kr, v, s, g;
  };
  Projections project(const Tensor& x, const std::vector<int64_t>& positions) const;
  // y = RMSNorm(SiLU(o)) Wo^T for o [B, T, H, hd].
  Tensor output(const Tensor& o) const;
};

}  // namespace nha
