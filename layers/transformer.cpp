#include "layers/transformer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "autograd/node.h"
#include "kernels/backend.h"
#include "layers/attention.h"
#include "layers/nha.h"

namespace nha {

// ---- block --------------------------------------------------------------------------------------

namespace {
std::shared_ptr<Mixer> make_mixer(const ModelConfig& cfg, int64_t layer, double out_scale,
                                  Generator& gen) {
  const MixerConfig m = cfg.mixer(layer).resolved();
  switch (m.type) {
    case MixerType::Attention: return std::make_shared<Attention>(cfg, m, out_scale, gen);
    case MixerType::NHA:
    case MixerType::GSA: return std::make_shared<NhaMixer>(cfg, m, out_scale, gen);
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

Tensor LanguageModel::loss(const Tensor& ids, const Tensor& targets, int64_t valid_count) const {
  NHA_CHECK(targets.shape() == ids.shape())
      << "targets " << targets.str() << " must match ids " << ids.str();
  Tensor logits = forward(ids);
  return cross_entropy(logits.reshape({-1, cfg_.vocab_size}), targets.reshape({-1}),
                       kIgnoreTarget, valid_count);
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
  return cross_entropy(logits(picked), row_targets, kIgnoreTarget, rows.size(0));
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
