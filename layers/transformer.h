// The decoder-only language model of docs/nha.md §3:
//   h = x + Mixer(RMSNorm(x));  y = h + SwiGLU(RMSNorm(h));  logits = lm_head(RMSNorm(y_L))
// Mixers are chosen per layer: attention (below), nha and gsa (= nha with window 0, layers/nha.h).
//
// Incremental generation (docs/eval.md "Generation"): every mixer also has a decode form with a
// per-layer state (attention: a KV cache; nha/gsa: the constant-size memory plus a window ring).
// LanguageModel::prefill runs each prompt through the ordinary parallel forward and fills the
// states from it; decode_step then feeds one token per row. Rows of a batch are right-aligned:
// a shorter prompt is left-padded so that every prompt ends at the same step, and the padding
// steps are never attended to and never written into a memory (see MixerState).
#pragma once
#include <memory>
#include <vector>

#include "layers/model_config.h"
#include "layers/module.h"

namespace nha {

// What every layer's generation state shares. `pos` counts the steps taken, padding included
// (all rows advance together); row b's first real token was consumed at step start[b], so the
// token of step t has absolute position t - start[b]. RoPE always uses that absolute position:
// a cached key keeps the rotation of the position it was computed at.
struct MixerState {
  virtual ~MixerState() = default;
  int64_t batch = 0;
  int64_t pos = 0;
  std::vector<int64_t> start;  // [batch]; all 0 when no row is padded

  // Absolute position of every row's next token: pos - start[b].
  std::vector<int64_t> positions() const;
};

// A sequence mixer maps x [B, T, d] -> [B, T, d] causally.
class Mixer : public Module {
 public:
  virtual Tensor forward(const Tensor& x) const = 0;

  // ---- generation (no autograd) ----
  // Empty state for `batch` rows of at most `max_len` steps each (padding included). max_len only
  // sizes caches that grow with the sequence (full attention); windows and memories do not.
  virtual std::unique_ptr<MixerState> new_state(int64_t batch, int64_t max_len) const = 0;
  // xs[b] [1, T_b, d], one prompt per row of a fresh state -> forward(xs[b]) for every b. Fills
  // the state as if the rows had been decoded right-aligned (row b starts at step max_b T_b - T_b).
  virtual std::vector<Tensor> prefill(const std::vector<Tensor>& xs, MixerState& st) const = 0;
  // x_t [B, 1, d]: the next token of every row -> [B, 1, d], forward()'s output at that token.
  // Advances st by one step.
  virtual Tensor step(const Tensor& x_t, MixerState& st) const = 0;
};

// ---- decode helpers shared by the mixers --------------------------------------------------------
// A ring holds per-token tensors of the last `cap` steps of every row, slot-major so that one step
// of all rows is one contiguous block: ring [cap, B, H, X], step t in slot t % cap. Slots of steps
// not taken yet, or of padding, hold zeros and are masked out of every softmax.
namespace decode {

// f32 state for f32/bf16 models (the decode core runs in f32 like the kernels' statistics), f64
// for f64 models (the CPU reference).
DType state_dtype(const Tensor& weight);
// Checks x_t [B, 1, d] against a state of st.batch rows; `who` names the layer in errors.
void check_step_input(const Tensor& x_t, const MixerState& st, int64_t d, const char* who);
// Checks the prompts of a prefill against a fresh state and sets st.start and st.pos (= the
// longest prompt's length); returns that length.
int64_t begin_prefill(const std::vector<Tensor>& xs, MixerState& st, int64_t d, const char* who);
// x [B, T, H, D] with row b rotated from position positions[b] (rows sharing a start position
// share one rope call; differentiable only when all rows share it, as in the forward).
Tensor rope_rows(const Tensor& x, double base, const std::vector<int64_t>& positions);
// Writes values [B, n, H, X] (steps first_step .. first_step + n - 1, n <= cap) into the ring.
void ring_write(Tensor& ring, int64_t first_step, const Tensor& values);
// The last n steps (L - n .. L - 1, L = the longest row) of right-aligned rows
// rows[b] [1, T_b, H, X] as one left-padded batch [B, n, H, X] (zeros before a row's first token).
Tensor right_aligned_tail(const std::vector<Tensor>& rows, int64_t n);
// The state `st` as the layer's own state type (a state made by another layer type is refused).
template <typename S>
S& state_as(MixerState& st, const char* who) {
  S* s = dynamic_cast<S*>(&st);
  NHA_CHECK(s != nullptr) << who << ": the decode state belongs to another kind of layer. HINT: "
                                    "make the state with this model's new_decode_state";
  return *s;
}
// Per (row, head) matrices of a ring: [cap, B, H, X] -> [B*H, cap, X] contiguous.
Tensor ring_heads(const Tensor& ring);
// Window logits of the current step (already written into the ring) against every slot:
//   z[bh, 0, j] = scale * q[bh] . k_ring[j, bh]   or -inf where slot j holds no token of row b
// q [B, 1, H, D] (state dtype), k_ring [cap, B, H, D] -> z [B*H, 1, cap].
Tensor ring_logits(const Tensor& q, const Tensor& k_ring, const MixerState& st, double scale);
// out [B*H, 1, X] = p [B*H, 1, cap] @ v_ring as per-(b, h) matrices, + beta * out.
void ring_read(Tensor& out, const Tensor& p, const Tensor& v_ring, double beta);

}  // namespace decode

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
  Tensor loss(const Tensor& ids, const Tensor& targets) const;

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
  // logits [B, T, V] of the last block's output x [B, T, d]: lm_head(RMSNorm(x))
  Tensor head(const Tensor& x) const;
  // lm_head(xn) for xn = RMSNorm(x) [B, T, d] already normed -> [B, T, V]
  Tensor logits(const Tensor& xn) const;
  ModelConfig cfg_;
};

}  // namespace nha
