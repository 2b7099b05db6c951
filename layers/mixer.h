// What every sequence mixer is: the Mixer interface (a causal map x [B, T, d] -> [B, T, d] with a
// decode form), the generation state every mixer's state extends, and the decode helpers the
// mixers share (rings of per-token tensors). The mixers: layers/attention.h, layers/nha.h; the
// model that stacks them: layers/transformer.h.
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

}  // namespace nha
