// The decoder-only language model of SPEC-NHA §3:
//   h = x + Mixer(RMSNorm(x));  y = h + SwiGLU(RMSNorm(h));  logits = lm_head(RMSNorm(y_L))
// Mixers are chosen per layer: attention (below), nha and gsa (= nha with window 0, layers/nha.h).
#pragma once
#include <memory>
#include <vector>

#include "layers/model_config.h"
#include "layers/module.h"

namespace nha {

// A sequence mixer maps x [B, T, d] -> [B, T, d] causally.
class Mixer : public Module {
 public:
  virtual Tensor forward(const Tensor& x) const = 0;
};

// Causal multi-head attention with RoPE (rotate-half) and an optional sliding window:
//   q = RoPE(x Wq^T), k = RoPE(x Wk^T), v = x Wv^T  (heads: contiguous slices of d)
//   o = softmax(q k^T / sqrt(dh) + causal/window mask) v;  y = o Wo^T
class Attention : public Mixer {
 public:
  Attention(const ModelConfig& cfg, const MixerConfig& mixer, double out_scale, Generator& gen);
  Tensor forward(const Tensor& x) const override;

  std::shared_ptr<Linear> wq, wk, wv, wo;
  int64_t n_heads, window;
  double rope_base;
};

class Block : public Module {
 public:
  Block(const ModelConfig& cfg, int64_t layer, Generator& gen);
  Tensor forward(const Tensor& x) const;

  std::shared_ptr<RMSNorm> mixer_norm, mlp_norm;
  std::shared_ptr<Mixer> mixer;
  std::shared_ptr<SwiGLU> mlp;
};

class LanguageModel : public Module {
 public:
  // Parameters are drawn from Generator(seed) in a fixed order: same seed, same model.
  LanguageModel(const ModelConfig& cfg, uint64_t seed);

  // ids [B, T] (i32/i64) -> logits [B, T, V]
  Tensor forward(const Tensor& ids) const;
  // Mean cross-entropy of the next-token targets [B, T] (ignore_index -100).
  Tensor loss(const Tensor& ids, const Tensor& targets) const;

  const ModelConfig& config() const { return cfg_; }

  std::shared_ptr<Embedding> embed;
  std::vector<std::shared_ptr<Block>> layers;
  std::shared_ptr<RMSNorm> norm;
  std::shared_ptr<Linear> lm_head;  // null when tied: logits use embed->weight

 private:
  ModelConfig cfg_;
};

}  // namespace nha
