#include "layers/model_config.h"

#include <cmath>
#include <sstream>

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

MixerConfig MixerConfig::resolved() const {
  MixerConfig m = *this;
  if (m.type == MixerType::GSA) m.window = 0;
  return m;
}

MixerConfig ModelConfig::mixer(int64_t layer) const {
  return mixers.empty() ? MixerConfig{} : mixers.at(size_t(layer));
}

namespace {

std::string mixer_text(const MixerConfig& m) {
  const MixerConfig r = m.resolved();
  std::string s = mixer_type_name(r.type);
  if (r.type == MixerType::Attention) return s + " window " + std::to_string(r.window);
  return s + " window " + std::to_string(r.window) + " slots " + std::to_string(r.slots);
}

}  // namespace

std::string architecture_difference(const ModelConfig& a, const ModelConfig& b) {
  auto differ = [](const char* key, auto x, auto y) {
    std::ostringstream s;
    if (x != y) s << key << " " << x << " vs " << y;
    return s.str();
  };
  for (const std::string& d :
       {differ("vocab_size", a.vocab_size, b.vocab_size), differ("d_model", a.d_model, b.d_model),
        differ("n_layers", a.n_layers, b.n_layers), differ("n_heads", a.n_heads, b.n_heads),
        differ("mlp_hidden", a.resolved_mlp_hidden(), b.resolved_mlp_hidden()),
        differ("tie_embeddings", a.tie_embeddings, b.tie_embeddings),
        differ("norm_eps", a.norm_eps, b.norm_eps), differ("rope_base", a.rope_base, b.rope_base)})
    if (!d.empty()) return d;
  for (int64_t i = 0; i < a.n_layers; ++i) {
    const std::string x = mixer_text(a.mixer(i)), y = mixer_text(b.mixer(i));
    if (x != y) return "layer " + std::to_string(i) + ": " + x + " vs " + y;
  }
  return "";
}

namespace {

// Sizes far beyond any model this code can run, small enough that products of them (parameter
// counts, activation sizes) cannot overflow int64.
constexpr int64_t kMaxVocab = int64_t(1) << 31;  // token ids are int32
constexpr int64_t kMaxWidth = int64_t(1) << 20;
constexpr int64_t kMaxLayers = int64_t(1) << 16;

void check_size(const char* key, int64_t v, int64_t lo, int64_t hi) {
  NHA_CHECK(v >= lo && v <= hi) << key << " must be in [" << lo << ", " << hi << "], got " << v
                                << ". HINT: see docs/config.md";
}

}  // namespace

void ModelConfig::validate() const {
  check_size("model.vocab_size", vocab_size, 1, kMaxVocab - 1);
  check_size("model.d_model", d_model, 1, kMaxWidth);
  check_size("model.n_layers", n_layers, 1, kMaxLayers);
  check_size("model.mlp_hidden", mlp_hidden, 0, 4 * kMaxWidth);
  NHA_CHECK(n_heads > 0 && d_model % n_heads == 0)
      << "model.n_heads (" << n_heads << ") must divide model.d_model (" << d_model
      << "). HINT: pick n_heads from the divisors of d_model";
  NHA_CHECK(head_dim() % 2 == 0) << "head dim d_model/n_heads = " << head_dim()
                                 << " must be even for RoPE. HINT: change n_heads";
  // std::isfinite first: inf passes `> 0`, and NaN fails every comparison silently elsewhere.
  NHA_CHECK(std::isfinite(norm_eps) && norm_eps > 0)
      << "model.norm_eps must be a finite number > 0, got " << norm_eps << ". HINT: 1e-6";
  NHA_CHECK(std::isfinite(rope_base) && rope_base > 1)
      << "model.rope_base must be a finite number > 1, got " << rope_base << ". HINT: 10000";
  NHA_CHECK(std::isfinite(init_std) && init_std > 0)
      << "model.init_std must be a finite number > 0, got " << init_std << ". HINT: 0.02";
  NHA_CHECK(mixers.empty() || int64_t(mixers.size()) == n_layers)
      << "model has " << n_layers << " layers but " << mixers.size()
      << " mixer entries. HINT: give one mixer per layer, or none for all-attention";
  for (size_t i = 0; i < mixers.size(); ++i) {
    NHA_CHECK(mixers[i].window >= 0 && mixers[i].window < kMaxVocab)
        << "layer " << i << ": window must be in [0, 2^31), got " << mixers[i].window
        << ". HINT: 0 = no window (docs/config.md)";
    NHA_CHECK(mixers[i].type == MixerType::Attention ||
              (mixers[i].slots > 0 && mixers[i].slots <= kMaxWidth))
        << "layer " << i << ": slots must be in [1, 2^20] for " << mixer_type_name(mixers[i].type)
        << ", got " << mixers[i].slots << ". HINT: the default is 64";
  }
}

}  // namespace nha
