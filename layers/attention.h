// Causal multi-head attention with RoPE and an optional sliding window: the `attention` mixer
// (Transformer++ and SWA layers, docs/nha.md §3), and its KV-cache decode form.
#pragma once
#include <memory>

#include "layers/mixer.h"

namespace nha {

// The state of an attention layer: the KV cache as rings of cap = window (sliding window; keys
// older than the window are overwritten) or cap = max_len (full causal attention):
//   k [cap, B, H, hd]  RoPE'd keys (rotated at their absolute positions)
//   v [cap, B, H, hd]  values
struct AttentionState : MixerState {
  Tensor k, v;
  int64_t cap = 0;
};

// Causal multi-head attention with RoPE (rotate-half) and an optional sliding window:
//   q = RoPE(x Wq^T), k = RoPE(x Wk^T), v = x Wv^T  (heads: contiguous slices of d)
//   o = softmax(q k^T / sqrt(dh) + causal/window mask) v;  y = o Wo^T
class Attention : public Mixer {
 public:
  Attention(const ModelConfig& cfg, const MixerConfig& mixer, double out_scale, Generator& gen);
  Tensor forward(const Tensor& x) const override;

  std::unique_ptr<MixerState> new_state(int64_t batch, int64_t max_len) const override;
  std::vector<Tensor> prefill(const std::vector<Tensor>& xs, MixerState& st) const override;
  Tensor step(const Tensor& x_t, MixerState& st) const override;

  std::shared_ptr<Linear> wq, wk, wv, wo;
  int64_t n_heads, window;
  double rope_base;

 private:
  // forward(x) that also hands out its RoPE'd keys k and values v [B, T, H, hd] (the KV cache).
  Tensor forward_kv(const Tensor& x, Tensor& k, Tensor& v) const;
};

}  // namespace nha
