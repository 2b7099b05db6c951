// The decoder-only language model of docs/nha.md §3:
//   h = x + Mixer(RMSNorm(x));  y = h + SwiGLU(RMSNorm(h));  logits = lm_head(RMSNorm(y_L))
// Mixers are chosen per layer: attention (layers/attention.h), nha and gsa (= nha with window 0,
// layers/nha.h), all behind the Mixer interface of layers/mixer.h (which also describes decoding).
#pragma once
#include <memory>
#include <vector>

#include "layers/mixer.h"
#include "layers/model_config.h"
#include "layers/module.h"

namespace nha {

class Block : public Module {
 public:
  Block(const ModelConfig& cfg, int64_t layer, Generator& gen);
  // x [B, T, d] and xn = mixer_norm(x) -> {y, next_norm(y)} with h = x + mixer(xn) and
  // y = h + mlp(mlp_norm(h)). Each residual add runs fused with the RMSNorm after it
  // (add_rmsnorm): mlp_norm inside the block, and the next block's mixer_norm (or the final norm)
  // across blocks, which is why the caller hands in xn and the norm that follows.
  std::pair<Tensor, Tensor> forward(const Tensor& x, const Tensor& xn,
                                    const RMSNorm& next_norm) const;
  // y for each prompt xs[b] [1, T_b, d] (filling the mixer's state), and for one step [B, 1, d].
  std::vector<Tensor> prefill(const std::vector<Tensor>& xs, MixerState& st) const;
  Tensor step(const Tensor& x_t, MixerState& st) const;

  std::shared_ptr<RMSNorm> mixer_norm, mlp_norm;
  std::shared_ptr<Mixer> mixer;
  std::shared_ptr<SwiGLU> mlp;
};

// Generation state of a whole model: one MixerState per layer, all at the same step.
struct DecodeState {
  std::vector<std::unique_ptr<MixerState>> layers;
  int64_t batch() const { return layers.front()->batch; }
  int64_t pos() const { return layers.front()->pos; }
};

class LanguageModel : public Module {
 public:
  // Parameters are drawn from Generator(seed) in a fixed order: same seed, same model.
  LanguageModel(const ModelConfig& cfg, uint64_t seed);

  // ids [B, T] (i32/i64) -> logits [B, T, V]
  Tensor forward(const Tensor& ids) const;
  // Mean cross-entropy of the next-token targets [B, T] (ignore_index -100).
  // valid_count: the number of non-ignored targets if the caller knows it (cross_entropy: no host
  // sync on a GPU), -1 to count them.
  Tensor loss(const Tensor& ids, const Tensor& targets, int64_t valid_count = -1) const;
  // The same loss when few targets count (MQAR: the query positions only): only the rows `rows`
  // [n] (i32 indices into the flattened [B*T]) go through the LM head and the cross-entropy, with
  // `row_targets` [n] (none ignored). loss(ids, targets) with every other target ignored, up to the rounding of
  // the head's GEMM at another shape, at a fraction of the head's work ([n, V] logits, not [B*T, V]).
  Tensor loss_on_rows(const Tensor& ids, const Tensor& rows, const Tensor& row_targets) const;

  // ---- generation (no autograd; on the model's device; call under an AutocastGuard for bf16) ---
  // Empty state for `batch` rows of at most max_len steps each: the longest prompt plus the new
  // tokens. max_len sizes the KV caches of full-attention layers only; windowed attention and
  // nha/gsa layers run for any number of steps in constant memory.
  DecodeState new_decode_state(int64_t batch, int64_t max_len) const;
  // prompts[b] (>= 1 token each, one per row of a fresh state) -> logits [B, V] of each prompt's
  // last token. Each prompt runs through the parallel forward on its own (its logits are
  // forward()'s), and the states are filled from it with the rows right-aligned.
  Tensor prefill(const std::vector<std::vector<int32_t>>& prompts, DecodeState& st) const;
  // ids [B, 1] (i32/i64): the next token of every row -> logits [B, V].
  Tensor decode_step(const Tensor& ids, DecodeState& st) const;

  const ModelConfig& config() const { return cfg_; }

  std::shared_ptr<Embedding> embed;
  std::vector<std::shared_ptr<Block>> layers;
  std::shared_ptr<RMSNorm> norm;
  std::shared_ptr<Linear> lm_head;  // null when tied: logits use embed->weight

 private:
  // ids [B, T] -> the last block's output through the final norm [B, T, d] (the head's input)
  Tensor final_hidden(const Tensor& ids) const;
  // logits [B, T, V] of the last block's output x [B, T, d]: lm_head(RMSNorm(x))
  Tensor head(const Tensor& x) const;
  // lm_head(xn) for xn = RMSNorm(x) [..., d] already normed -> [..., V]
  Tensor logits(const Tensor& xn) const;
  ModelConfig cfg_;
};

}  // namespace nha
