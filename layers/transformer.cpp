#include "layers/transformer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "autograd/node.h"
#include "kernels/backend.h"
#include "layers/nha.h"

namespace nha {

std::vector<int64_t> MixerState::positions() const {
  std::vector<int64_t> p(start.size());
  for (size_t b = 0; b < start.size(); ++b) p[b] = pos - start[b];
  return p;
}

// ---- decode helpers -----------------------------------------------------------------------------

namespace decode {

DType state_dtype(const Tensor& weight) {
  return weight.dtype() == DType::F64 ? DType::F64 : DType::F32;
}

void check_step_input(const Tensor& x_t, const MixerState& st, int64_t d, const char* who) {
  NHA_CHECK(x_t.dim() == 3 && x_t.size(0) == st.batch && x_t.size(1) == 1 && x_t.size(2) == d)
      << who << " step: x_t must be [B, 1, d] = [" << st.batch << ", 1, " << d << "], got "
      << x_t.str() << ". HINT: feed one token per row and call; make the state for this batch";
}

int64_t begin_prefill(const std::vector<Tensor>& xs, MixerState& st, int64_t d, const char* who) {
  NHA_CHECK(st.pos == 0) << who << " prefill: the state has already taken " << st.pos
                         << " steps. HINT: prefill a fresh state (new_decode_state)";
  NHA_CHECK(int64_t(xs.size()) == st.batch)
      << who << " prefill: " << xs.size() << " prompts for a state of " << st.batch << " rows";
  int64_t L = 0;
  for (const Tensor& x : xs) {
    NHA_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) >= 1 && x.size(2) == d)
        << who << " prefill: every prompt must be [1, T, " << d << "] with T >= 1, got "
        << x.str();
    L = std::max(L, x.size(1));
  }
  for (size_t b = 0; b < xs.size(); ++b) st.start[b] = L - xs[b].size(1);
  st.pos = L;
  return L;
}

Tensor rope_rows(const Tensor& x, double base, const std::vector<int64_t>& positions) {
  const int64_t B = x.size(0);
  if (std::all_of(positions.begin(), positions.end(), [&](int64_t p) { return p == positions[0]; }))
    return rope(x, base, positions[0]);  // the common case (and the training forward's)
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());  // [B, T, H, D]
  for (int64_t b0 = 0, b1 = 0; b0 < B; b0 = b1) {
    b1 = b0 + 1;
    while (b1 < B && positions[size_t(b1)] == positions[size_t(b0)]) ++b1;
    out.slice(0, b0, b1).copy_(rope(x.slice(0, b0, b1), base, positions[size_t(b0)]));
  }
  return out;
}

void ring_write(Tensor& ring, int64_t first_step, const Tensor& values) {
  const int64_t cap = ring.size(0), n = values.size(1);
  NHA_CHECK(n <= cap) << "ring_write: " << n << " steps into a ring of " << cap;
  const Tensor steps = values.transpose(0, 1);  // [n, B, H, X]
  const int64_t slot = first_step % cap, first = std::min(n, cap - slot);
  ring.slice(0, slot, slot + first).copy_(steps.slice(0, 0, first));
  if (first < n) ring.slice(0, 0, n - first).copy_(steps.slice(0, first, n));  // wraps around
}

Tensor right_aligned_tail(const std::vector<Tensor>& rows, int64_t n) {
  int64_t L = 0;
  for (const Tensor& r : rows) L = std::max(L, r.size(1));
  Shape shape = rows.front().shape();
  shape[0] = int64_t(rows.size());
  shape[1] = n;
  Tensor out = Tensor::zeros(shape, rows.front().dtype(), rows.front().device());  // [B, n, H, X]
  for (size_t b = 0; b < rows.size(); ++b) {
    // Row b fills steps L - T .. L - 1; the tail (steps L - n .. L - 1) holds its last m tokens.
    const int64_t T = rows[b].size(1), m = std::min(T, n);
    out.slice(0, int64_t(b), int64_t(b) + 1).slice(1, n - m, n).copy_(rows[b].slice(1, T - m, T));
  }
  return out;
}

Tensor ring_heads(const Tensor& ring) {
  const int64_t cap = ring.size(0), B = ring.size(1), H = ring.size(2), X = ring.size(3);
  return ring.transpose(0, 1).transpose(1, 2).contiguous().reshape({B * H, cap, X});
}

Tensor ring_logits(const Tensor& q, const Tensor& k_ring, const MixerState& st, double scale) {
  const int64_t cap = k_ring.size(0), B = q.size(0), H = q.size(2), D = q.size(3);
  Backend& be = backend_for(q);
  Tensor z = Tensor::empty({B * H, 1, cap}, q.dtype(), q.device());
  be.gemm(z, q.contiguous().reshape({B * H, 1, D}), ring_heads(k_ring), false, true, scale, 0.0);
  // Slot j holds step s = the latest step <= t with s = j mod cap (s < 0: never written); it
  // belongs to row b when s >= start[b] (earlier steps are the row's left padding).
  const int64_t t = st.pos;
  std::vector<double> mask(size_t(B * cap));  // [B, cap]: 0 or -inf
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < cap; ++j) {
      const int64_t s = t - ((t - j) % cap + cap) % cap;
      mask[size_t(b * cap + j)] = s >= st.start[b] ? 0.0 : -std::numeric_limits<double>::infinity();
    }
  const Tensor row_mask = Tensor::from_vector<double>(mask, {B, cap}).to(q.dtype()).to(q.device());
  Tensor head_mask = Tensor::empty({B * H, 1, cap}, q.dtype(), q.device());
  be.broadcast_dim(head_mask, row_mask, B, H, cap);  // the row's mask for each of its heads
  be.add(z, z, head_mask, 1.0, 1.0);
  return z;
}

void ring_read(Tensor& out, const Tensor& p, const Tensor& v_ring, double beta) {
  backend_for(p).gemm(out, p, ring_heads(v_ring), false, false, 1.0, beta);
}

}  // namespace decode

// ---- attention ----------------------------------------------------------------------------------

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

// ---- block --------------------------------------------------------------------------------------

namespace {
std::shared_ptr<Mixer> make_mixer(const ModelConfig& cfg, int64_t layer, double out_scale,
                                  Generator& gen) {
  MixerConfig m = cfg.mixer(layer);
  switch (m.type) {
    case MixerType::Attention: return std::make_shared<Attention>(cfg, m, out_scale, gen);
    case MixerType::NHA: return std::make_shared<NhaMixer>(cfg, m, out_scale, gen);
    case MixerType::GSA:  // pure memory: nha without a window
      m.window = 0;
      return std::make_shared<NhaMixer>(cfg, m, out_scale, gen);
  }
  NHA_FAIL() << "layer " << layer << ": unknown mixer type " << int(m.type);
}
}  // namespace

Block::Block(const ModelConfig& cfg, int64_t layer, Generator& gen) {
  // Output projections start smaller so the residual stream's variance stays O(1) in depth.
  const double out_scale = 1.0 / std::sqrt(2.0 * double(cfg.n_layers));
  mixer_norm = register_module("mixer_norm", std::make_shared<RMSNorm>(cfg.d_model, cfg.norm_eps));
  mixer = register_module("mixer", make_mixer(cfg, layer, out_scale, gen));
  mlp_norm = register_module("mlp_norm", std::make_shared<RMSNorm>(cfg.d_model, cfg.norm_eps));
  mlp = register_module("mlp", std::make_shared<SwiGLU>(cfg.d_model, cfg.resolved_mlp_hidden(),
                                                        cfg.init_std, out_scale, gen));
}

std::pair<Tensor, Tensor> Block::forward(const Tensor& x, const Tensor& xn,
                                         const RMSNorm& next_norm) const {
  const auto [h, hn] = mlp_norm->forward_residual(x, mixer->forward(xn));  // [B, T, d] each
  return next_norm.forward_residual(h, mlp->forward(hn));
}

// The decode paths fuse the add with mlp_norm only: their outputs go to the next layer's prefill
// or step, which norms them itself.
std::vector<Tensor> Block::prefill(const std::vector<Tensor>& xs, MixerState& st) const {
  std::vector<Tensor> normed;
  for (const Tensor& x : xs) normed.push_back(mixer_norm->forward(x));
  const std::vector<Tensor> mixed = mixer->prefill(normed, st);
  std::vector<Tensor> out;
  for (size_t b = 0; b < xs.size(); ++b) {
    const auto [h, hn] = mlp_norm->forward_residual(xs[b], mixed[b]);
    out.push_back(h + mlp->forward(hn));
  }
  return out;
}

Tensor Block::step(const Tensor& x_t, MixerState& st) const {
  const auto [h, hn] = mlp_norm->forward_residual(x_t, mixer->step(mixer_norm->forward(x_t), st));
  return h + mlp->forward(hn);
}

// ---- language model -----------------------------------------------------------------------------

LanguageModel::LanguageModel(const ModelConfig& cfg, uint64_t seed) : cfg_(cfg) {
  cfg.validate();
  Generator gen(seed);
  embed = register_module("embed", std::make_shared<Embedding>(cfg.vocab_size, cfg.d_model,
                                                               cfg.init_std, gen));
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    layers.push_back(register_module("layers." + std::to_string(i),
                                     std::make_shared<Block>(cfg, i, gen)));
  norm = register_module("norm", std::make_shared<RMSNorm>(cfg.d_model, cfg.norm_eps));
  if (!cfg.tie_embeddings)
    lm_head = register_module("lm_head", std::make_shared<Linear>(cfg.d_model, cfg.vocab_size,
                                                                  cfg.init_std, gen));
}

Tensor LanguageModel::head(const Tensor& x) const { return logits(norm->forward(x)); }

Tensor LanguageModel::logits(const Tensor& xn) const {
  return linear(xn, lm_head ? lm_head->weight : embed->weight);  // [B, T, V]
}

Tensor LanguageModel::forward(const Tensor& ids) const { return logits(final_hidden(ids)); }

Tensor LanguageModel::final_hidden(const Tensor& ids) const {
  NHA_CHECK(ids.dim() == 2) << "model input must be token ids [B, T], got " << ids.str();
  Tensor x = embed->forward(ids);                 // [B, T, d] the residual stream
  Tensor xn = layers[0]->mixer_norm->forward(x);  // [B, T, d] its norm for the next mixer
  // Each block returns the stream and its norm by the following block's mixer_norm (the final
  // norm after the last block), computed with the block's last residual add (Block::forward).
  for (size_t i = 0; i < layers.size(); ++i) {
    const RMSNorm& next = i + 1 < layers.size() ? *layers[i + 1]->mixer_norm : *norm;
    std::tie(x, xn) = layers[i]->forward(x, xn, next);
  }
  return xn;
}

Tensor LanguageModel::loss(const Tensor& ids, const Tensor& targets) const {
  NHA_CHECK(targets.shape() == ids.shape())
      << "targets " << targets.str() << " must match ids " << ids.str();
  Tensor logits = forward(ids);
  return cross_entropy(logits.reshape({-1, cfg_.vocab_size}), targets.reshape({-1}));
}

Tensor LanguageModel::loss_on_rows(const Tensor& ids, const Tensor& rows,
                                   const Tensor& row_targets) const {
  NHA_CHECK(rows.dim() == 1 && row_targets.shape() == rows.shape())
      << "loss_on_rows: rows " << rows.str() << " and row_targets " << row_targets.str()
      << " must be [n] each";
  const Tensor xn = final_hidden(ids).reshape({-1, cfg_.d_model});  // [B*T, d]
  // A row gather is the embedding op with the hidden states as the table; its backward puts each
  // row's gradient back in place (the rows are distinct) and zeros elsewhere.
  const Tensor picked = embedding(xn, rows);  // [n, d]
  return cross_entropy(logits(picked), row_targets);
}

DecodeState LanguageModel::new_decode_state(int64_t batch, int64_t max_len) const {
  NHA_CHECK(batch >= 1 && max_len >= 1)
      << "new_decode_state: batch and max_len must be positive, got " << batch << ", " << max_len
      << ". HINT: max_len = the longest prompt + the new tokens";
  DecodeState st;
  for (const auto& block : layers) st.layers.push_back(block->mixer->new_state(batch, max_len));
  return st;
}

Tensor LanguageModel::prefill(const std::vector<std::vector<int32_t>>& prompts,
                              DecodeState& st) const {
  autograd::NoGradGuard no_grad;
  NHA_CHECK(int64_t(prompts.size()) == st.batch())
      << "prefill: " << prompts.size() << " prompts for a decode state of " << st.batch()
      << " rows. HINT: make the state with new_decode_state(number of prompts, ...)";
  const Device dev = embed->weight.device();
  std::vector<Tensor> xs;  // xs[b] [1, T_b, d]
  for (const std::vector<int32_t>& p : prompts) {
    NHA_CHECK(!p.empty()) << "prefill: an empty prompt. HINT: every prompt needs at least one "
                             "token (e.g. the tokenizer's EOS, the document boundary)";
    xs.push_back(embed->forward(Tensor::from_vector<int32_t>(p, {1, int64_t(p.size())}, dev)));
  }
  for (size_t i = 0; i < layers.size(); ++i) xs = layers[i]->prefill(xs, *st.layers[i]);
  const int64_t B = int64_t(xs.size());
  Tensor last = Tensor::empty({B, 1, cfg_.d_model}, xs.front().dtype(), dev);  // [B, 1, d]
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = xs[size_t(b)].size(1);
    last.slice(0, b, b + 1).copy_(xs[size_t(b)].slice(1, T - 1, T));
  }
  return head(last).reshape({B, cfg_.vocab_size});  // [B, V]
}

Tensor LanguageModel::decode_step(const Tensor& ids, DecodeState& st) const {
  autograd::NoGradGuard no_grad;
  NHA_CHECK(ids.dim() == 2 && ids.size(0) == st.batch() && ids.size(1) == 1)
      << "decode_step: ids must be [B, 1] = [" << st.batch() << ", 1], got " << ids.str()
      << ". HINT: one new token per row of the decode state";
  Tensor x = embed->forward(ids.to(embed->weight.device()));  // [B, 1, d]
  for (size_t i = 0; i < layers.size(); ++i) x = layers[i]->step(x, *st.layers[i]);
  return head(x).reshape({st.batch(), cfg_.vocab_size});  // [B, V]
}

}  // namespace nha
