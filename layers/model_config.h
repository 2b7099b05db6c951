// The shape of a language model: width, depth, heads, vocabulary and one mixer per layer.
// The YAML config (train/) fills this struct; validate() refuses impossible shapes with the field
// name and a hint.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace nha {

enum class MixerType : uint8_t { Attention, NHA, GSA };
const char* mixer_type_name(MixerType t);
MixerType mixer_type_from_name(const std::string& name);

struct MixerConfig {
  MixerType type = MixerType::Attention;
  // attention: sliding window in tokens including the current one, 0 = full causal.
  // nha: the short-term window w (0 = pure memory; >= T = full attention + m null slots).
  int64_t window = 0;
  int64_t slots = 64;  // nha/gsa: memory slots m

  // This mixer as it runs: gsa is nha without a window (docs/nha.md §3), whatever `window` says.
  MixerConfig resolved() const;
};

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t d_model = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t mlp_hidden = 0;  // 0: 256 * ceil((8d/3) / 256) (docs/nha.md §3)
  bool tie_embeddings = false;
  double norm_eps = 1e-6;
  double rope_base = 10000.0;
  double init_std = 0.02;
  std::vector<MixerConfig> mixers;  // one per layer; empty: every layer is full attention

  int64_t head_dim() const { return d_model / n_heads; }
  int64_t resolved_mlp_hidden() const;
  MixerConfig mixer(int64_t layer) const;
  void validate() const;  // throws nha::Error naming the bad field
};

// "" when a and b describe the same network (the same parameters, and per layer the same mixer,
// window and slots, which the parameter shapes do not all show), else the first difference, e.g.
// "layer 3: nha window 64 vs attention". init_std is not compared (it only draws parameters).
std::string architecture_difference(const ModelConfig& a, const ModelConfig& b);

}  // namespace nha
