#include "train/interop.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <set>
#include <sstream>

#include "autograd/node.h"
#include "core/error.h"
#include "core/fileio.h"
#include "core/random.h"
#include "layers/transformer.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/safetensors.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace nha {

// Named ("Hugging Face I/O"), not anonymous: unity builds (scripts/test.sh) put this file in one
// unit with others, where anonymous names would collide.
namespace hfio {

constexpr const char* kWeightsFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kConfigFile = "config.json";
constexpr const char* kTokenizerFile = "tokenizer.model";
constexpr const char* kHeadName = "lm_head.weight";  // the same in both namings

// The parameters (names, shapes, kinds; values uninitialised) of the model `model` describes,
// in the model's order.
std::vector<NamedParameter> parameter_layout(const ModelConfig& model) {
  SkipInitGuard names_and_shapes_only;
  return LanguageModel(model, 0).named_parameters();
}

const char* torch_dtype_name(DType dtype) { return dtype == DType::BF16 ? "bfloat16" : "float32"; }

json read_json_file(const fs::path& path) {
  NHA_CHECK(fs::is_regular_file(path))
      << "'" << path.string() << "' does not exist. HINT: a Hugging Face model directory holds "
      << "config.json next to model.safetensors";
  std::ifstream in(path);
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    NHA_FAIL() << "'" << path.string() << "' is not valid JSON (" << e.what()
               << "). HINT: download or export it again";
  }
}

// ---- config.json fields ---------------------------------------------------------------------

template <typename T>
bool holds(const json& v) {
  if constexpr (std::is_same_v<T, int64_t>) return v.is_number_integer();
  if constexpr (std::is_same_v<T, double>) return v.is_number();
  if constexpr (std::is_same_v<T, bool>) return v.is_boolean();
  if constexpr (std::is_same_v<T, std::string>) return v.is_string();
}

// config[key] as T; absent or null gives `fallback`, or an error when there is none.
template <typename T>
T field(const json& config, const std::string& key, const std::string& source,
        std::optional<T> fallback = std::nullopt) {
  if (!config.contains(key) || config[key].is_null()) {
    NHA_CHECK(fallback.has_value()) << source << " lacks '" << key << "'. HINT: every model "
                                    << "config.json gives it (see docs/interop.md)";
    return *fallback;
  }
  NHA_CHECK(holds<T>(config[key])) << source << ": '" << key << "' is " << config[key].dump()
                                   << ", a value of the wrong type. HINT: see docs/interop.md";
  return config[key].get<T>();
}

// What LlamaForCausalLM can be configured to do that our layers do not.
void refuse_unrepresentable_llama(const json& c, const ModelConfig& m, const std::string& source) {
  const std::string act = field<std::string>(c, "hidden_act", source, "silu");
  NHA_CHECK(act == "silu") << source << ": hidden_act is '" << act << "'; our MLP is SwiGLU "
                           << "(silu). HINT: only silu models can be imported";
  const int64_t kv_heads = field<int64_t>(c, "num_key_value_heads", source, m.n_heads);
  NHA_CHECK(kv_heads == m.n_heads)
      << source << ": num_key_value_heads is " << kv_heads << " but num_attention_heads is "
      << m.n_heads << " (grouped-query attention), which our attention does not implement. HINT: "
      << "only models with as many key/value heads as query heads can be imported";
  if (m.n_heads > 0 && m.d_model % m.n_heads == 0) {
    const int64_t head_dim = field<int64_t>(c, "head_dim", source, m.d_model / m.n_heads);
    NHA_CHECK(head_dim == m.d_model / m.n_heads)
        << source << ": head_dim is " << head_dim
        << ", not hidden_size / num_attention_heads = " << m.d_model / m.n_heads
        << ". HINT: our heads are slices of the hidden state";
  }
  for (const char* bias : {"attention_bias", "mlp_bias"})
    NHA_CHECK(!field<bool>(c, bias, source, false))
        << source << ": " << bias << " is true; our projections have no biases. HINT: only "
        << "bias-free Llama models can be imported";
  // rope_scaling: absent, null, or the plain rotation written out ({"rope_type": "default"}).
  const json scaling = c.value("rope_scaling", json());
  const bool plain = scaling.is_null() || (scaling.is_object() && scaling.size() == 1 &&
                                           scaling.value("rope_type", "") == "default");
  NHA_CHECK(plain) << source << ": rope_scaling is " << scaling.dump()
                   << "; our RoPE has no scaling (linear, dynamic, yarn, llama3, ...). HINT: "
                   << "only models without rope_scaling can be imported";
}

ModelConfig llama_model_config(const json& c, const std::string& source) {
  ModelConfig m;
  m.vocab_size = field<int64_t>(c, "vocab_size", source);
  m.d_model = field<int64_t>(c, "hidden_size", source);
  m.n_layers = field<int64_t>(c, "num_hidden_layers", source);
  m.n_heads = field<int64_t>(c, "num_attention_heads", source);
  m.mlp_hidden = field<int64_t>(c, "intermediate_size", source);
  // LlamaConfig's defaults where a key is absent.
  m.tie_embeddings = field<bool>(c, "tie_word_embeddings", source, false);
  m.norm_eps = field<double>(c, "rms_norm_eps", source, 1e-6);
  m.rope_base = field<double>(c, "rope_theta", source, 10000.0);
  m.init_std = field<double>(c, "initializer_range", source, 0.02);
  refuse_unrepresentable_llama(c, m, source);
  return m;
}

ModelConfig nha_model_config(const json& c, const std::string& source) {
  ModelConfig m;
  m.vocab_size = field<int64_t>(c, "vocab_size", source);
  m.d_model = field<int64_t>(c, "d_model", source);
  m.n_layers = field<int64_t>(c, "n_layers", source);
  m.n_heads = field<int64_t>(c, "n_heads", source);
  m.mlp_hidden = field<int64_t>(c, "mlp_hidden", source);
  m.tie_embeddings = field<bool>(c, "tie_embeddings", source);
  m.norm_eps = field<double>(c, "norm_eps", source);
  m.rope_base = field<double>(c, "rope_base", source);
  m.init_std = field<double>(c, "init_std", source, 0.02);
  NHA_CHECK(c.contains("mixers") && c["mixers"].is_array())
      << source << " lacks the 'mixers' list. HINT: `nha export --format safetensors` writes one "
      << "{type, window, slots} per layer";
  for (const json& layer : c["mixers"]) {
    NHA_CHECK(layer.is_object()) << source << ": a mixers entry is " << layer.dump()
                                 << ", not {type, window, slots}. HINT: see docs/interop.md";
    MixerConfig mixer;
    mixer.type = mixer_type_from_name(field<std::string>(layer, "type", source));
    mixer.window = field<int64_t>(layer, "window", source);
    mixer.slots = field<int64_t>(layer, "slots", source);
    m.mixers.push_back(mixer);
  }
  return m;
}

// ---- tensors --------------------------------------------------------------------------------

// Every tensor of a model directory: model.safetensors, or the shards its index lists (each
// tensor in the shard the index names, every listed tensor present).
std::map<std::string, SafetensorsTensor> read_model_tensors(const fs::path& dir) {
  const fs::path index_path = dir / kIndexFile;
  if (!fs::exists(index_path)) {
    NHA_CHECK(fs::exists(dir / kWeightsFile))
        << "'" << dir.string() << "' has neither " << kWeightsFile << " nor " << kIndexFile
        << ". HINT: pass a Hugging Face model directory (safetensors weights; convert .bin "
        << "weights with transformers' save_pretrained(safe_serialization=True))";
    return read_safetensors((dir / kWeightsFile).string()).tensors;
  }
  const json index = read_json_file(index_path);
  NHA_CHECK(index.contains("weight_map") && index["weight_map"].is_object())
      << "'" << index_path.string() << "' has no weight_map object. HINT: download it again";
  std::map<std::string, std::string> shard_of;  // tensor name -> shard file name
  for (const auto& [name, shard] : index["weight_map"].items()) {
    // A shard is a file of this directory: a path elsewhere is refused.
    NHA_CHECK(shard.is_string() && shard.get<std::string>().find('/') == std::string::npos &&
              shard.get<std::string>() != "..")
        << "'" << index_path.string() << "': tensor '" << name << "' maps to " << shard.dump()
        << ", not a file name of this directory. HINT: download it again";
    shard_of[name] = shard.get<std::string>();
  }
  std::set<std::string> shards;
  for (const auto& [name, shard] : shard_of) shards.insert(shard);
  std::map<std::string, SafetensorsTensor> tensors;
  for (const std::string& shard : shards) {
    for (auto& [name, t] : read_safetensors((dir / shard).string()).tensors) {
      const auto it = shard_of.find(name);
      NHA_CHECK(it != shard_of.end() && it->second == shard)
          << "'" << (dir / shard).string() << "' holds tensor '" << name << "', which "
          << index_path.string() << " puts "
          << (it == shard_of.end() ? "nowhere" : "in " + it->second)
          << ". HINT: the shards and their index disagree; download them again";
      tensors[name] = std::move(t);
    }
  }
  for (const auto& [name, shard] : shard_of)
    NHA_CHECK(tensors.count(name)) << "'" << index_path.string() << "' puts tensor '" << name
                                   << "' in " << shard << ", which lacks it. HINT: download the "
                                   << "shards again";
  return tensors;
}

// The tie flag and the presence of lm_head.weight must agree.
void check_tied_head(const std::map<std::string, SafetensorsTensor>& tensors, bool tied,
                     const std::string& tie_key, const std::string& source) {
  const bool has_head = tensors.count(kHeadName) > 0;
  NHA_CHECK(!(tied && has_head)) << source << " says " << tie_key
                                 << " = true, but the weights hold a separate '" << kHeadName
                                 << "'. HINT: set " << tie_key
                                 << " to false if the head is its own matrix";
  NHA_CHECK(tied || has_head) << source << " says " << tie_key
                              << " = false, but the weights hold no '" << kHeadName
                              << "'. HINT: set " << tie_key
                              << " to true if the head shares the embedding matrix";
}

// Our parameters from the stored tensors (file names by `file_name`): every one present, of the
// model's shape and finite; no stored tensor left over.
std::vector<NamedParameter> match_parameters(
    const ModelConfig& model, const std::map<std::string, SafetensorsTensor>& tensors,
    const std::function<std::string(const std::string&)>& file_name, const std::string& dir) {
  std::vector<NamedParameter> params;
  std::set<std::string> used;
  std::string missing;
  for (const NamedParameter& p : parameter_layout(model)) {
    const std::string name = file_name(p.name);
    const auto it = tensors.find(name);
    if (it == tensors.end()) {
      missing += " " + name;
      continue;
    }
    const Tensor& value = it->second.value;
    NHA_CHECK(value.shape() == p.tensor.shape())
        << "'" << dir << "': tensor '" << name << "' has shape " << shape_str(value.shape())
        << " but config.json makes it " << shape_str(p.tensor.shape())
        << ". HINT: the weights and config.json belong to different models";
    const std::vector<float> values = value.to_vector<float>();
    NHA_CHECK(std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); }))
        << "'" << dir << "': tensor '" << name << "' holds a non-finite value. HINT: the "
        << "weights are damaged; download them again";
    params.push_back({p.name, value, p.kind});
    used.insert(name);
  }
  std::string extra;
  for (const auto& [name, t] : tensors)
    if (!used.count(name)) extra += " " + name;
  NHA_CHECK(missing.empty() && extra.empty())
      << "'" << dir << "' does not match its config.json: missing tensors:"
      << (missing.empty() ? " none" : missing)
      << "; unexpected tensors:" << (extra.empty() ? " none" : extra)
      << ". HINT: only plain Llama models (and our own exports) can be imported";
  return params;
}

// A run config around an imported model. Only `model` describes the file; train.* and data.* just
// make the config valid (data.train names the source directory): a fine-tune brings its own.
RunConfig imported_run_config(const ModelConfig& model, const json& config, const std::string& dir,
                              const std::string& source) {
  RunConfig run;
  run.model = model;
  run.source = source;
  const int64_t max_positions = field<int64_t>(config, "max_position_embeddings", source, 2048);
  run.train.seq_len = std::clamp<int64_t>(max_positions, 1, int64_t(1) << 24);
  run.train.micro_batch = 1;
  run.train.global_batch_tokens = run.train.seq_len;
  run.train.steps = 1;
  run.data.train = dir;
  run.validate();
  return run;
}

// The whole file as bytes, for copying it atomically.
std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  NHA_CHECK(in) << "cannot read '" << path << "'. HINT: check that it exists and is readable";
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

// The parameters an nha layer has and an attention layer lacks (layers/nha.h).
bool new_in_nha_layer(const std::string& name) {
  for (const std::string suffix : {".mixer.wf.weight", ".mixer.out_norm.weight"})
    if (name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
      return true;
  return false;
}

}  // namespace hfio

bool is_llama_compatible(const ModelConfig& model) {
  for (int64_t i = 0; i < model.n_layers; ++i) {
    const MixerConfig m = model.mixer(i);
    if (m.type != MixerType::Attention || m.window != 0) return false;
  }
  return true;
}

std::string llama_name(const std::string& our_name) {
  static const std::map<std::string, std::string> model_level = {
      {"embed.weight", "model.embed_tokens.weight"},
      {"norm.weight", "model.norm.weight"},
      {"lm_head.weight", "lm_head.weight"}};
  static const std::map<std::string, std::string> layer_level = {
      {"mixer_norm.weight", "input_layernorm.weight"},
      {"mixer.wq.weight", "self_attn.q_proj.weight"},
      {"mixer.wk.weight", "self_attn.k_proj.weight"},
      {"mixer.wv.weight", "self_attn.v_proj.weight"},
      {"mixer.wo.weight", "self_attn.o_proj.weight"},
      {"mlp_norm.weight", "post_attention_layernorm.weight"},
      {"mlp.gate.weight", "mlp.gate_proj.weight"},
      {"mlp.up.weight", "mlp.up_proj.weight"},
      {"mlp.down.weight", "mlp.down_proj.weight"}};
  if (const auto it = model_level.find(our_name); it != model_level.end()) return it->second;
  // layers.<N>.<rest>
  const std::string prefix = "layers.";
  const size_t dot = our_name.find('.', prefix.size());
  if (our_name.rfind(prefix, 0) == 0 && dot != std::string::npos) {
    const std::string layer = our_name.substr(prefix.size(), dot - prefix.size());
    const auto it = layer_level.find(our_name.substr(dot + 1));
    if (it != layer_level.end() && !layer.empty() &&
        layer.find_first_not_of("0123456789") == std::string::npos)
      return "model.layers." + layer + "." + it->second;
  }
  NHA_FAIL() << "parameter '" << our_name << "' has no LlamaForCausalLM counterpart. HINT: only "
             << "Transformer++ models (every layer full causal attention) use Llama names";
}

nlohmann::json llama_config_json(const RunConfig& run, const ExportedConfigExtras& x) {
  const ModelConfig& m = run.model;
  return {{"architectures", json::array({"LlamaForCausalLM"})},
          {"model_type", "llama"},
          {"vocab_size", m.vocab_size},
          {"hidden_size", m.d_model},
          {"intermediate_size", m.resolved_mlp_hidden()},
          {"num_hidden_layers", m.n_layers},
          {"num_attention_heads", m.n_heads},
          {"num_key_value_heads", m.n_heads},
          {"head_dim", m.head_dim()},
          {"hidden_act", "silu"},
          {"rms_norm_eps", m.norm_eps},
          {"rope_theta", m.rope_base},
          {"rope_scaling", nullptr},
          {"attention_bias", false},
          {"mlp_bias", false},
          {"tie_word_embeddings", m.tie_embeddings},
          {"max_position_embeddings", run.train.seq_len},
          {"initializer_range", m.init_std},
          {"torch_dtype", hfio::torch_dtype_name(x.dtype)},
          {"bos_token_id", x.bos_id},
          {"eos_token_id", x.eos_id}};
}

nlohmann::json nha_config_json(const RunConfig& run, const ExportedConfigExtras& x) {
  const ModelConfig& m = run.model;
  json mixers = json::array();
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const MixerConfig mixer = m.mixer(i);
    mixers.push_back(
        {{"type", mixer_type_name(mixer.type)}, {"window", mixer.window}, {"slots", mixer.slots}});
  }
  return {{"architectures", json::array({"NhaForCausalLM"})},
          {"model_type", "nha"},
          {"vocab_size", m.vocab_size},
          {"d_model", m.d_model},
          {"n_layers", m.n_layers},
          {"n_heads", m.n_heads},
          {"mlp_hidden", m.resolved_mlp_hidden()},
          {"tie_embeddings", m.tie_embeddings},
          {"norm_eps", m.norm_eps},
          {"rope_base", m.rope_base},
          {"init_std", m.init_std},
          {"mixers", mixers},
          {"max_position_embeddings", run.train.seq_len},
          {"torch_dtype", hfio::torch_dtype_name(x.dtype)},
          {"bos_token_id", x.bos_id},
          {"eos_token_id", x.eos_id}};
}

ModelConfig model_config_from_json(const nlohmann::json& config, const std::string& source) {
  NHA_CHECK(config.is_object()) << source << " is not a JSON object. HINT: see docs/interop.md";
  const std::string type = hfio::field<std::string>(config, "model_type", source);
  NHA_CHECK(type == "llama" || type == "nha")
      << source << ": model_type is '" << type << "'. HINT: `nha import` reads Llama models "
      << "(model_type llama) and our own exports (model_type nha)";
  ModelConfig m = type == "llama" ? hfio::llama_model_config(config, source)
                                  : hfio::nha_model_config(config, source);
  try {
    m.validate();
  } catch (const Error& e) {
    NHA_FAIL() << source << ": " << e.what();
  }
  return m;
}

SafetensorsExport export_safetensors(const std::string& checkpoint, const std::string& out_dir,
                                     const ExportedConfigExtras& extras,
                                     const std::string& tokenizer_path) {
  const RunConfig run = parse_config(read_config_yaml(checkpoint), checkpoint + ":/config");
  const bool llama = is_llama_compatible(run.model);
  const std::map<std::string, Tensor> saved = read_parameters(checkpoint);
  std::vector<std::pair<std::string, Tensor>> tensors;  // (file name, values) in the model's order
  for (const NamedParameter& p : hfio::parameter_layout(run.model)) {
    const auto it = saved.find(p.name);
    NHA_CHECK(it != saved.end() && it->second.shape() == p.tensor.shape())
        << "'" << checkpoint << "': parameter '" << p.name << "' is "
        << (it == saved.end() ? "missing" : shape_str(it->second.shape())) << " but its config "
        << "makes it " << shape_str(p.tensor.shape()) << ". HINT: the file and its /config "
        << "disagree; export it again";
    tensors.emplace_back(llama ? llama_name(p.name) : p.name, it->second);
  }
  const json config = llama ? llama_config_json(run, extras) : nha_config_json(run, extras);
  // transformers refuses safetensors files whose metadata lacks format = pt.
  write_safetensors((fs::path(out_dir) / hfio::kWeightsFile).string(), tensors, extras.dtype,
                    {{"format", "pt"}});
  write_file_atomic((fs::path(out_dir) / hfio::kConfigFile).string(), config.dump(2) + "\n");
  if (!tokenizer_path.empty())
    write_file_atomic((fs::path(out_dir) / hfio::kTokenizerFile).string(),
                      hfio::file_bytes(tokenizer_path));
  return {llama ? "llama" : "nha", int64_t(tensors.size())};
}

SafetensorsImport import_safetensors(const std::string& dir, const std::string& out) {
  const fs::path config_path = fs::path(dir) / hfio::kConfigFile;
  const json config = hfio::read_json_file(config_path);
  const ModelConfig model = model_config_from_json(config, config_path.string());
  const bool llama = config["model_type"] == "llama";
  const std::map<std::string, SafetensorsTensor> tensors = hfio::read_model_tensors(dir);
  hfio::check_tied_head(tensors, model.tie_embeddings,
                        llama ? "tie_word_embeddings" : "tie_embeddings", config_path.string());
  const auto file_name = [llama](const std::string& name) {
    return llama ? llama_name(name) : name;
  };
  const std::vector<NamedParameter> params = hfio::match_parameters(model, tensors, file_name, dir);
  const bool all_bf16 = std::all_of(tensors.begin(), tensors.end(),
                                    [](const auto& t) { return t.second.dtype == "BF16"; });
  SafetensorsImport result;
  result.model_type = llama ? "llama" : "nha";
  result.dtype = all_bf16 ? DType::BF16 : DType::F32;
  result.tensors = int64_t(params.size());
  const bool is_file = fs::path(out).extension() == ".h5";
  result.out_path = is_file ? out : checkpoint_path((fs::path(out) / "checkpoints").string(), 0);
  const RunConfig run = hfio::imported_run_config(model, config, dir, "imported from " + dir);
  write_parameters(result.out_path, params, to_yaml(run), result.dtype, 0, 0);
  return result;
}

ModelConfig nha_conversion_config(const ModelConfig& source, const NhaConversion& conversion) {
  NHA_CHECK(is_llama_compatible(source))
      << "nha convert: the source model is not Transformer++ (every layer full causal "
      << "attention). HINT: convert a model trained with mixer {type: attention}";
  NHA_CHECK(conversion.window >= 0 && conversion.slots >= 1 && conversion.full_attention_every >= 0)
      << "nha convert: window " << conversion.window << ", slots " << conversion.slots
      << ", full_attention_every " << conversion.full_attention_every
      << ". HINT: window >= 0 (0 = pure memory), slots >= 1, full_attention_every >= 0 (0 = none)";
  ModelConfig target = source;
  target.mixers.clear();
  const int64_t K = conversion.full_attention_every;
  for (int64_t i = 0; i < source.n_layers; ++i) {
    const bool keep_attention = K > 0 && (i + 1) % K == 0;
    target.mixers.push_back(keep_attention
                                ? MixerConfig{}
                                : MixerConfig{MixerType::NHA, conversion.window, conversion.slots});
  }
  target.validate();
  return target;
}

std::vector<NamedParameter> convert_parameters(const std::map<std::string, Tensor>& source,
                                               const ModelConfig& target, uint64_t seed) {
  std::vector<NamedParameter> params = LanguageModel(target, seed).named_parameters();
  autograd::NoGradGuard no_grad;
  size_t reused = 0;
  for (NamedParameter& p : params) {
    const auto it = source.find(p.name);
    if (it == source.end()) {
      NHA_CHECK(hfio::new_in_nha_layer(p.name))
          << "nha convert: the source lacks parameter '" << p.name << "'. HINT: the source file "
          << "and its /config disagree; export it again";
      continue;  // keeps the fresh model's draw
    }
    ++reused;
    NHA_CHECK(it->second.shape() == p.tensor.shape())
        << "nha convert: source parameter '" << p.name << "' is " << shape_str(it->second.shape())
        << " but the converted model needs " << shape_str(p.tensor.shape())
        << ". HINT: the source file and its /config disagree; export it again";
    p.tensor.copy_(it->second);
  }
  NHA_CHECK(reused == source.size())
      << "nha convert: the source has " << source.size() - reused << " parameters the converted "
      << "model does not use. HINT: the source file and its /config disagree; export it again";
  return params;
}

void convert_to_nha(const std::string& checkpoint, const std::string& out_path,
                    const NhaConversion& conversion) {
  RunConfig run = parse_config(read_config_yaml(checkpoint), checkpoint + ":/config");
  run.model = nha_conversion_config(run.model, conversion);
  const std::vector<NamedParameter> params =
      convert_parameters(read_parameters(checkpoint), run.model, conversion.seed);
  const TrainState state = read_train_state(checkpoint);
  write_parameters(out_path, params, to_yaml(run), DType::F32, state.step, state.tokens_seen);
}

}  // namespace nha
