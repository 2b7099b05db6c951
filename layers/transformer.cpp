#include "layers/transformer.h"

#include <cmath>

#include "layers/nha.h"

namespace nha {

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

Tensor Attention::forward(const Tensor& x) const {
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), hd = d / n_heads;
  Tensor q = rope(wq->forward(x).reshape({B, T, n_heads, hd}), rope_base);  // [B, T, H, hd]
  Tensor k = rope(wk->forward(x).reshape({B, T, n_heads, hd}), rope_base);  // [B, T, H, hd]
  Tensor v = wv->forward(x).reshape({B, T, n_heads, hd});                   // [B, T, H, hd]
  Tensor o = attention(q, k, v, window);                                    // [B, T, H, hd]
  return wo->forward(o.reshape({B, T, d}));                                 // [B, T, d]
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

Tensor Block::forward(const Tensor& x) const {
  Tensor h = x + mixer->forward(mixer_norm->forward(x));
  return h + mlp->forward(mlp_norm->forward(h));
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

Tensor LanguageModel::forward(const Tensor& ids) const {
  NHA_CHECK(ids.dim() == 2) << "model input must be token ids [B, T], got " << ids.str();
  Tensor x = embed->forward(ids);  // [B, T, d]
  for (const auto& block : layers) x = block->forward(x);
  x = norm->forward(x);
  return linear(x, lm_head ? lm_head->weight : embed->weight);  // [B, T, V]
}

Tensor LanguageModel::loss(const Tensor& ids, const Tensor& targets) const {
  NHA_CHECK(targets.shape() == ids.shape())
      << "targets " << targets.str() << " must match ids " << ids.str();
  Tensor logits = forward(ids);
  return cross_entropy(logits.reshape({-1, cfg_.vocab_size}), targets.reshape({-1}));
}

}  // namespace nha
