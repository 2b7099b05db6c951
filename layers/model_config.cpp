#include "layers/model_config.h"

#include "core/error.h"

namespace nha {

const char* mixer_type_name(MixerType t) {
  switch (t) {
    case MixerType::Attention: return "attention";
    case MixerType::NHA: return "nha";
    case MixerType::GSA: return "gsa";
  }
  return "?";
}

MixerType mixer_type_from_name(const std::string& name) {
  if (name == "attention") return MixerType::Attention;
  if (name == "nha") return MixerType::NHA;
  if (name == "gsa") return MixerType::GSA;
  NHA_FAIL() << "unknown mixer type '" << name << "'. HINT: use attention, nha or gsa";
}

int64_t ModelConfig::resolved_mlp_hidden() const {
  if (mlp_hidden > 0) return mlp_hidden;
  const int64_t target = (8 * d_model + 2) / 3;  // ceil(8d/3)
  return 256 * ((target + 255) / 256);
}

MixerConfig ModelConfig::mixer(int64_t layer) const {
  return mixers.empty() ? MixerConfig{} : mixers.at(size_t(layer));
}

void ModelConfig::validate() const {
  NHA_CHECK(vocab_size > 0) << "model.vocab_size must be positive, got " << vocab_size;
  NHA_CHECK(d_model > 0) << "model.d_model must be positive, got " << d_model;
  NHA_CHECK(n_layers > 0) << "model.n_layers must be positive, got " << n_layers;
  NHA_CHECK(n_heads > 0 && d_model % n_heads == 0)
      << "model.n_heads (" << n_heads << ") must divide model.d_model (" << d_model
      << "). HINT: pick n_heads from the divisors of d_model";
  NHA_CHECK(head_dim() % 2 == 0) << "head dim d_model/n_heads = " << head_dim()
                                 << " must be even for RoPE. HINT: change n_heads";
  NHA_CHECK(norm_eps > 0) << "model.norm_eps must be positive, got " << norm_eps;
  NHA_CHECK(mixers.empty() || int64_t(mixers.size()) == n_layers)
      << "model has " << n_layers << " layers but " << mixers.size()
      << " mixer entries. HINT: give one mixer per layer, or none for all-attention";
  for (size_t i = 0; i < mixers.size(); ++i) {
    NHA_CHECK(mixers[i].window >= 0) << "layer " << i << ": window must be >= 0, got "
                                     << mixers[i].window;
    NHA_CHECK(mixers[i].type == MixerType::Attention || mixers[i].slots > 0)
        << "layer " << i << ": slots must be positive for " << mixer_type_name(mixers[i].type);
  }
}

}  // namespace nha
