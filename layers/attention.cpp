#include "layers/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "autograd/node.h"
#include "kernels/backend.h"

namespace nha {

Attention::Attention(const ModelConfig& cfg, const MixerConfig& mixer, double out_scale,
                     Generator& gen)
    : n_heads(cfg.n_heads), window(mixer.window), rope_base(cfg.rope_base) {
  const int64_t d = cfg.d_model;
  wq = register_module("wq", std::make_shared<Linear>(d, d, cfg.init_std, gen));
  wk = register_module("wk", std::make_shared<Linear>(d, d, cfg.init_std, gen));
  wv = register_module("wv", std::make_shared<Linear>(d, d, cfg.init_std, gen));
  wo = register_module("wo", std::make_shared<Linear>(d, d, cfg.init_std * out_scale, gen));
}

Tensor Attention::forward_kv(const Tensor& x, Tensor& k, Tensor& v) const {
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), hd = d / n_heads;
  Tensor q = rope(wq->forward(x).reshape({B, T, n_heads, hd}), rope_base);  // [B, T, H, hd]
  k = rope(wk->forward(x).reshape({B, T, n_heads, hd}), rope_base);         // [B, T, H, hd]
  v = wv->forward(x).reshape({B, T, n_heads, hd});                          // [B, T, H, hd]
  Tensor o = attention(q, k, v, window);                                    // [B, T, H, hd]
  return wo->forward(o.reshape({B, T, d}));                                 // [B, T, d]
}

Tensor Attention::forward(const Tensor& x) const {
  Tensor k, v;
  return forward_kv(x, k, v);
}

std::unique_ptr<MixerState> Attention::new_state(int64_t batch, int64_t max_len) const {
  NHA_CHECK(batch >= 1 && max_len >= 1)
      << "attention decode state: batch and max_len must be positive, got " << batch << ", "
      << max_len;
  const Tensor& w = wq->weight;
  const int64_t hd = w.size(1) / n_heads;
  auto st = std::make_unique<AttentionState>();
  st->batch = batch;
  st->start.assign(size_t(batch), 0);
  // A window keeps only its last `window` keys; full attention keeps them all.
  st->cap = window > 0 ? std::min(window, max_len) : max_len;
  st->k = Tensor::zeros({st->cap, batch, n_heads, hd}, decode::state_dtype(w), w.device());
  st->v = Tensor::zeros({st->cap, batch, n_heads, hd}, decode::state_dtype(w), w.device());
  return st;
}

std::vector<Tensor> Attention::prefill(const std::vector<Tensor>& xs, MixerState& state) const {
  autograd::NoGradGuard no_grad;
  AttentionState& st = decode::state_as<AttentionState>(state, "attention");
  const int64_t L = decode::begin_prefill(xs, st, wq->weight.size(1), "attention");
  NHA_CHECK(st.cap == window || L <= st.cap)
      << "attention prefill: a prompt of " << L << " tokens does not fit the KV cache of "
      << st.cap << ". HINT: raise max_len in new_decode_state";
  std::vector<Tensor> ys, ks, vs;
  for (const Tensor& x : xs) {
    Tensor k, v;
    ys.push_back(forward_kv(x, k, v));
    ks.push_back(k);
    vs.push_back(v);
  }
  const int64_t n = std::min(L, st.cap);  // the steps still in the cache
  decode::ring_write(st.k, L - n, decode::right_aligned_tail(ks, n));
  decode::ring_write(st.v, L - n, decode::right_aligned_tail(vs, n));
  return ys;
}

Tensor Attention::step(const Tensor& x_t, MixerState& state) const {
  autograd::NoGradGuard no_grad;
  AttentionState& st = decode::state_as<AttentionState>(state, "attention");
  const int64_t d = wq->weight.size(1), B = st.batch, H = n_heads, hd = d / H;
  decode::check_step_input(x_t, st, d, "attention");
  NHA_CHECK(st.cap == window || st.pos < st.cap)
      << "attention step: token " << st.pos << " does not fit the KV cache of " << st.cap
      << " tokens. HINT: raise max_len in new_decode_state (longest prompt + new tokens)";
  const DType dt = st.k.dtype();
  const std::vector<int64_t> pos = st.positions();
  // q, k rotated at each row's absolute position; the new key and value join the cache first.
  const Tensor q = decode::rope_rows(wq->forward(x_t).reshape({B, 1, H, hd}), rope_base, pos)
                       .to(dt);                                                // [B, 1, H, hd]
  decode::ring_write(st.k, st.pos,
                     decode::rope_rows(wk->forward(x_t).reshape({B, 1, H, hd}), rope_base, pos));
  decode::ring_write(st.v, st.pos, wv->forward(x_t).reshape({B, 1, H, hd}));
  const Tensor p = softmax(decode::ring_logits(q, st.k, st, 1.0 / std::sqrt(double(hd))));
  Tensor o = Tensor::empty({B * H, 1, hd}, dt, x_t.device());  // [B*H, 1, hd]
  decode::ring_read(o, p, st.v, 0.0);
  ++st.pos;
  return wo->forward(o.reshape({B, 1, d}).to(x_t.dtype()));  // [B, 1, d]
}

}  // namespace nha
