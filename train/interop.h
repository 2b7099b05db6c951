// Models in and out of the Hugging Face world (docs/interop.md), and Transformer++ -> NHA.
//
//   nha export RUN --format safetensors --out DIR   export_safetensors: DIR/model.safetensors +
//                                                   DIR/config.json (+ DIR/tokenizer.model)
//   nha import DIR --out RUN_OR_FILE.h5             import_safetensors: a Llama (or our "nha")
//                                                   directory -> a parameters-only .h5
//   nha convert RUN --to nha --out FILE.h5          convert_to_nha: Transformer++ -> NHA layers
//
// Transformer++ models (every layer full causal attention) use the names and config.json of
// Hugging Face's LlamaForCausalLM; every other model our own parameter names with model_type
// "nha". What cannot be represented here (GQA, RoPE scaling, biases, ...) is refused by name.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "layers/model_config.h"
#include "layers/module.h"
#include "train/config.h"

namespace nha {

// Every layer plain full causal attention: the architecture of LlamaForCausalLM.
bool is_llama_compatible(const ModelConfig& model);

// Our parameter name -> its LlamaForCausalLM name:
//   embed.weight                 model.embed_tokens.weight
//   layers.N.mixer_norm.weight   model.layers.N.input_layernorm.weight
//   layers.N.mixer.w{q,k,v,o}.weight  model.layers.N.self_attn.{q,k,v,o}_proj.weight
//   layers.N.mlp_norm.weight     model.layers.N.post_attention_layernorm.weight
//   layers.N.mlp.{gate,up,down}.weight  model.layers.N.mlp.{gate,up,down}_proj.weight
//   norm.weight                  model.norm.weight
//   lm_head.weight               lm_head.weight
// A name with no Llama counterpart is an error.
std::string llama_name(const std::string& our_name);

// What config.json records besides the run's model and sequence length.
struct ExportedConfigExtras {
  DType dtype = DType::BF16;       // torch_dtype
  int32_t bos_id = 1, eos_id = 2;  // the tokenizer's (data/tokenizer.h defaults without one)
};

// config.json of a Llama-compatible run's model (LlamaConfig's keys) / of any model
// (model_type "nha"); max_position_embeddings is the run's train.seq_len.
nlohmann::json llama_config_json(const RunConfig& run, const ExportedConfigExtras& extras);
nlohmann::json nha_config_json(const RunConfig& run, const ExportedConfigExtras& extras);

// The model a config.json describes: model_type "llama" (refusing rope_scaling, GQA, biases,
// head_dim != hidden/heads, activations other than silu) or "nha". `source` names it in errors.
ModelConfig model_config_from_json(const nlohmann::json& config, const std::string& source);

struct SafetensorsExport {
  std::string model_type;  // "llama" or "nha"
  int64_t tensors = 0;
};
// Writes out_dir/model.safetensors and out_dir/config.json from a checkpoint or export file, and
// copies `tokenizer_path` (when not empty) to out_dir/tokenizer.model.
SafetensorsExport export_safetensors(const std::string& checkpoint, const std::string& out_dir,
                                     const ExportedConfigExtras& extras,
                                     const std::string& tokenizer_path);

struct SafetensorsImport {
  std::string out_path;    // the .h5 written
  std::string model_type;  // "llama" or "nha"
  // bf16 when every tensor was stored BF16, else f32 (F16 values are exact in f32)
  DType dtype = DType::F32;
  int64_t tensors = 0;
};
// Reads a Hugging Face directory (config.json + model.safetensors, or the shards that
// model.safetensors.index.json lists) into a parameters-only .h5 (train/checkpoint.h):
// `out` itself when it ends in .h5, else OUT/checkpoints/step_00000000.h5 (a run directory that
// `nha eval OUT` and `nha generate OUT` take). Every tensor must be present, named as expected and
// shaped as the config says; nothing may be left over.
SafetensorsImport import_safetensors(const std::string& dir, const std::string& out);

// ---- Transformer++ -> NHA (`nha convert`, docs/interop.md "nha convert") ----------------------

struct NhaConversion {
  int64_t window = 64;               // w of every converted layer
  int64_t slots = 64;                // M of every converted layer
  int64_t full_attention_every = 0;  // K > 0: layers K-1, 2K-1, ... stay full attention
  uint64_t seed = 0;                 // draws the new slot-gate projections wf
};

// The NHA model of a Transformer++ model: the same shape, layer i an nha mixer (window, slots),
// except every K-th layer (i + 1 divisible by K) which keeps its full attention.
ModelConfig nha_conversion_config(const ModelConfig& source, const NhaConversion& conversion);

// The converted model's parameters, in its order: every source parameter reused by name
// (embedding, norms, MLPs, head, and wq/wk/wv/wo of every layer: an nha layer names them as
// attention does); the parameters attention lacks are those of a fresh model drawn from
// conversion.seed: the slot-gate projection wf ~ N(0, init_std^2) (random, not zero: identical
// slots would get identical gradients and never differ) and the output norm's gain (ones).
std::vector<NamedParameter> convert_parameters(const std::map<std::string, Tensor>& source,
                                               const ModelConfig& target, uint64_t seed);

// Reads a Transformer++ checkpoint or export file, writes the converted model as a
// parameters-only .h5 (f32; its /config the source's run config with the converted model).
// Refuses a source with any layer other than full causal attention.
void convert_to_nha(const std::string& checkpoint, const std::string& out_path,
                    const NhaConversion& conversion);

}  // namespace nha
