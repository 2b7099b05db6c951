// Models in and out of the Hugging Face format (train/interop.h): Llama names and config.json,
// export -> import round trips bitwise (parameters and logits; tied/untied; f32/bf16; one file or
// shards), our own naming for NHA models, refusals of what we cannot represent, the logits
// of an exported Transformer++ against an independent pure-Python Llama forward
// (scripts/llama_reference.py), and `nha convert` (Transformer++ -> NHA).
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autograd/node.h"
#include "common/testing.h"
#include "eval/runner.h"
#include "layers/attention.h"
#include "layers/nha.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/interop.h"
#include "train/safetensors.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace nha {
namespace {

// d 16, 2 layers of 2 heads (head dim 8), MLP 32, vocabulary 40.
RunConfig tiny_run(bool tied, std::vector<MixerConfig> mixers = {}) {
  RunConfig r;
  r.model.vocab_size = 40;
  r.model.d_model = 16;
  r.model.n_layers = 2;
  r.model.n_heads = 2;
  r.model.mlp_hidden = 32;
  r.model.tie_embeddings = tied;
  r.model.norm_eps = 1e-5;
  r.model.rope_base = 500.0;  // not the default: config.json must carry it
  r.model.mixers = std::move(mixers);
  r.train.seq_len = 8;
  r.train.micro_batch = 1;
  r.train.global_batch_tokens = 8;
  r.train.steps = 1;
  r.data.train = "unused";
  return r;
}

// A checkpoint whose parameters are far from their init (weights N(0, 0.3^2), norm gains
// 1 + N(0, 0.2^2)), so that every parameter and every norm gain shows in the logits.
void write_checkpoint(const RunConfig& run, const std::string& path, uint64_t seed) {
  LanguageModel model(run.model, seed);
  autograd::NoGradGuard no_grad;
  uint64_t k = seed;
  for (const NamedParameter& p : model.named_parameters()) {
    Tensor t = p.tensor;
    std::vector<float> v = testing::randn(t.shape(), ++k, DType::F32, 0.3).to_vector<float>();
    if (p.kind == ParamKind::Norm)
      for (float& x : v) x = 1.0f + x * (0.2f / 0.3f);
    t.copy_(Tensor::from_vector(v, t.shape()));
  }
  TrainState st;
  st.step = 7;
  st.config_yaml = to_yaml(run);
  save_checkpoint(path, model.named_parameters(), nullptr, st);
}

// Logits [1, T, V] of the model in `path` for a fixed sequence of T = 5 tokens.
const std::vector<int32_t> kIds = {3, 17, 0, 39, 8};
Tensor logits_of(const std::string& path) {
  const eval::LoadedModel m = eval::load_model(path, Device::cpu());
  autograd::NoGradGuard no_grad;
  return m.model->forward(Tensor::from_vector<int32_t>(kIds, {1, int64_t(kIds.size())}));
}

// Same dtype, shape and values (as doubles: exact for f32 and f64).
bool identical_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         a.to_vector<double>() == b.to_vector<double>();
}

void expect_same_parameters(const std::string& a, const std::string& b) {
  const std::map<std::string, Tensor> pa = read_parameters(a), pb = read_parameters(b);
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& [name, t] : pa) {
    ASSERT_TRUE(pb.count(name)) << name;
    EXPECT_TRUE(identical_bits(t, pb.at(name))) << name;
  }
}

json json_file(const std::string& path) { return json::parse(testing::read_file(path)); }

class Interop : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::temp_dir("interop"); }
  void TearDown() override { fs::remove_all(dir_); }
  // Exports a fresh checkpoint of `run` as safetensors into dir_/NAME; returns that directory.
  std::string exported(const RunConfig& run, const std::string& name, DType dtype) {
    write_checkpoint(run, dir_ + "/" + name + ".ckpt.h5", 11);
    ExportedConfigExtras extras;
    extras.dtype = dtype;
    export_safetensors(dir_ + "/" + name + ".ckpt.h5", dir_ + "/" + name, extras, "");
    return dir_ + "/" + name;
  }
  std::string dir_;
};

TEST(InteropNames, LlamaNamesCoverEveryTransformerParameter) {
  EXPECT_EQ(llama_name("embed.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(llama_name("layers.12.mixer_norm.weight"), "model.layers.12.input_layernorm.weight");
  EXPECT_EQ(llama_name("layers.0.mixer.wk.weight"), "model.layers.0.self_attn.k_proj.weight");
  EXPECT_EQ(llama_name("layers.1.mlp.down.weight"), "model.layers.1.mlp.down_proj.weight");
  EXPECT_EQ(llama_name("layers.1.mlp_norm.weight"),
            "model.layers.1.post_attention_layernorm.weight");
  EXPECT_EQ(llama_name("norm.weight"), "model.norm.weight");
  EXPECT_EQ(llama_name("lm_head.weight"), "lm_head.weight");
  testing::expect_error([] { llama_name("layers.0.mixer.wf.weight"); },
                        {"layers.0.mixer.wf.weight", "no LlamaForCausalLM counterpart", "HINT"});
  testing::expect_error([] { llama_name("layers.x.mlp.up.weight"); }, {"HINT"});
  for (bool tied : {false, true}) {
    const RunConfig run = tiny_run(tied);
    for (const NamedParameter& p : LanguageModel(run.model, 0).named_parameters())
      EXPECT_NO_THROW(llama_name(p.name)) << p.name;
  }
  EXPECT_TRUE(is_llama_compatible(tiny_run(false).model));
  EXPECT_FALSE(is_llama_compatible(tiny_run(false, {{MixerType::Attention, 4}, {}}).model));
  EXPECT_FALSE(is_llama_compatible(tiny_run(false, {{}, {MixerType::NHA, 4, 2}}).model));
}

TEST_F(Interop, TransformerExportIsLlamaFormatAndRoundTripsBitwise) {
  for (bool tied : {false, true}) {
    for (DType dtype : {DType::F32, DType::BF16}) {
      SCOPED_TRACE(std::string(tied ? "tied " : "untied ") + dtype_name(dtype));
      const std::string name = std::string(tied ? "tied_" : "untied_") + dtype_name(dtype);
      const std::string hf = exported(tiny_run(tied), name, dtype);
      const std::string ckpt = hf + ".ckpt.h5";
      // config.json: LlamaConfig's keys with our shape.
      const json c = json_file(hf + "/config.json");
      EXPECT_EQ(c["architectures"], json::array({"LlamaForCausalLM"}));
      EXPECT_EQ(c["model_type"], "llama");
      EXPECT_EQ(c["hidden_size"], 16);
      EXPECT_EQ(c["intermediate_size"], 32);
      EXPECT_EQ(c["num_attention_heads"], 2);
      EXPECT_EQ(c["num_key_value_heads"], 2);
      EXPECT_EQ(c["num_hidden_layers"], 2);
      EXPECT_EQ(c["rms_norm_eps"], 1e-5);
      EXPECT_EQ(c["rope_theta"], 500.0);
      EXPECT_EQ(c["vocab_size"], 40);
      EXPECT_EQ(c["max_position_embeddings"], 8);
      EXPECT_EQ(c["tie_word_embeddings"], tied);
      EXPECT_EQ(c["hidden_act"], "silu");
      EXPECT_EQ(c["torch_dtype"], dtype == DType::BF16 ? "bfloat16" : "float32");
      // The weights: Llama names, the head only when untied, the metadata transformers needs.
      const SafetensorsContents st = read_safetensors(hf + "/model.safetensors");
      EXPECT_EQ(st.metadata.at("format"), "pt");
      EXPECT_EQ(st.tensors.size(), size_t(2 * 9 + 2 + (tied ? 0 : 1)));
      EXPECT_EQ(st.tensors.count("lm_head.weight"), tied ? 0u : 1u);
      EXPECT_EQ(st.tensors.at("model.layers.1.self_attn.q_proj.weight").dtype,
                dtype == DType::BF16 ? "BF16" : "F32");
      // Import gives what the HDF5 export of the same dtype holds, bit for bit.
      export_parameters(ckpt, dir_ + "/" + name + ".ref.h5", dtype);
      const SafetensorsImport r = import_safetensors(hf, dir_ + "/" + name + ".imported.h5");
      EXPECT_EQ(r.model_type, "llama");
      EXPECT_EQ(r.dtype, dtype);
      expect_same_parameters(r.out_path, dir_ + "/" + name + ".ref.h5");
      const Tensor logits = logits_of(r.out_path);
      EXPECT_TRUE(identical_bits(logits, logits_of(dir_ + "/" + name + ".ref.h5")));
      if (dtype == DType::F32) EXPECT_TRUE(identical_bits(logits, logits_of(ckpt)));
    }
  }
}

TEST_F(Interop, ImportIntoARunDirectoryServesEvalAndGenerate) {
  const std::string hf = exported(tiny_run(false), "hf", DType::F32);
  const SafetensorsImport r = import_safetensors(hf, dir_ + "/run");
  EXPECT_EQ(r.out_path, dir_ + "/run/checkpoints/step_00000000.h5");
  EXPECT_TRUE(identical_bits(logits_of(dir_ + "/run"), logits_of(hf + ".ckpt.h5")));
  // The imported config is valid and keeps the model; its train section is a placeholder.
  const RunConfig run = parse_config(read_config_yaml(r.out_path), "imported");
  EXPECT_EQ(run.model.rope_base, 500.0);
  EXPECT_EQ(run.train.seq_len, 8);
}

TEST_F(Interop, NhaModelsUseOurNamesAndRoundTrip) {
  const RunConfig run = tiny_run(true, {{MixerType::NHA, 3, 4}, {MixerType::Attention, 2}});
  const std::string hf = exported(run, "nha", DType::BF16);
  const json c = json_file(hf + "/config.json");
  EXPECT_EQ(c["model_type"], "nha");
  EXPECT_EQ(c["mixers"][0], (json{{"type", "nha"}, {"window", 3}, {"slots", 4}}));
  EXPECT_EQ(c["mixers"][1]["type"], "attention");
  EXPECT_EQ(c["mixers"][1]["window"], 2);
  const SafetensorsContents st = read_safetensors(hf + "/model.safetensors");
  EXPECT_EQ(st.tensors.count("layers.0.mixer.wf.weight"), 1u);
  EXPECT_EQ(st.tensors.count("layers.0.mixer.out_norm.weight"), 1u);
  EXPECT_EQ(st.tensors.count("embed.weight"), 1u);
  const SafetensorsImport r = import_safetensors(hf, dir_ + "/nha.h5");
  EXPECT_EQ(r.model_type, "nha");
  export_parameters(hf + ".ckpt.h5", dir_ + "/nha.ref.h5", DType::BF16);
  expect_same_parameters(r.out_path, dir_ + "/nha.ref.h5");
  EXPECT_TRUE(identical_bits(logits_of(r.out_path), logits_of(dir_ + "/nha.ref.h5")));
}

// Splits dir/model.safetensors into two shards and an index (as save_pretrained does).
void split_into_shards(const std::string& dir, const std::string& moved_tensor_wrongly = "") {
  const SafetensorsContents st = read_safetensors(dir + "/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> first, second;
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  for (const auto& [name, t] : st.tensors) {
    const bool in_first = name.find("layers.1.") == std::string::npos;
    (in_first ? first : second).emplace_back(name, t.value);
    const bool wrong = name == moved_tensor_wrongly;
    index["weight_map"][name] =
        in_first != wrong ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(dir + "/model-00001-of-00002.safetensors", first, DType::F32,
                    {{"format", "pt"}});
  write_safetensors(dir + "/model-00002-of-00002.safetensors", second, DType::F32,
                    {{"format", "pt"}});
  std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);
  fs::remove(dir + "/model.safetensors");
}

TEST_F(Interop, ShardedDirectoriesImportLikeOneFile) {
  const std::string hf = exported(tiny_run(false), "sharded", DType::F32);
  const SafetensorsImport whole = import_safetensors(hf, dir_ + "/whole.h5");
  split_into_shards(hf);
  const SafetensorsImport parts = import_safetensors(hf, dir_ + "/parts.h5");
  expect_same_parameters(whole.out_path, parts.out_path);
  // An index that disagrees with its shards is refused.
  const std::string bad = exported(tiny_run(false), "badindex", DType::F32);
  split_into_shards(bad, "model.norm.weight");
  testing::expect_error([&] { import_safetensors(bad, dir_ + "/bad.h5"); },
                        {"model-00001-of-00002.safetensors", "'model.norm.weight'",
                         "model-00002-of-00002.safetensors", "HINT"});
  json index = json_file(bad + "/model.safetensors.index.json");
  index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors";
  std::ofstream(bad + "/model.safetensors.index.json") << index.dump();
  testing::expect_error([&] { import_safetensors(bad, dir_ + "/bad.h5"); },
                        {"'model.norm.weight'", "not a file name of this directory", "HINT"});
}

// The pure-Python Llama of scripts/llama_reference.py on the exported directory.
json python_reference(const std::string& dir, const std::string& log) {
  std::string ids;
  for (int32_t id : kIds) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const std::string cmd = std::string("python3 ") + NHA_SOURCE_DIR +
                          "/scripts/llama_reference.py " + dir + " --ids " + ids + " > " + log +
                          " 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << testing::read_file(log);
  return json::parse(testing::read_file(log));
}

TEST_F(Interop, LogitsEqualAnIndependentPythonLlamaForward) {
  for (bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    const std::string hf = exported(tiny_run(tied), tied ? "py_tied" : "py_untied", DType::F32);
    const json ref = python_reference(hf, hf + ".log");
    const Tensor ours = logits_of(hf + ".ckpt.h5");  // [1, T, V]
    std::vector<double> flat;
    for (const json& row : ref["logits"])
      for (const json& v : row) flat.push_back(v.get<double>());
    const Tensor theirs = Tensor::from_vector(flat, ours.shape());
    EXPECT_LT(testing::rel_rms(ours, theirs), 1e-5);
    // Logits of this size: the test is not passing on near-zero numbers.
    EXPECT_GT(testing::max_abs_diff(theirs, Tensor::zeros(theirs.shape(), DType::F64)), 0.5);
    const std::string package = ref["safetensors_package"].get<std::string>();
    std::cout << "safetensors package: " << package << "\n";
    EXPECT_EQ(package.find("mismatch"), std::string::npos) << package;
    // Hugging Face's own LlamaForCausalLM where torch and transformers are installed (the GPU
    // machine), skipped with a message elsewhere.
    const std::string hf_model = ref["transformers"].get<std::string>();
    std::cout << "transformers: " << hf_model << "\n";
    EXPECT_EQ(hf_model.find("mismatch"), std::string::npos) << hf_model;
  }
}

class InteropRefusals : public Interop {
 protected:
  void SetUp() override {
    Interop::SetUp();
    hf_ = exported(tiny_run(false), "good", DType::F32);
    config_ = json_file(hf_ + "/config.json");
    tensors_ = read_safetensors(hf_ + "/model.safetensors");
  }
  // Import of a copy of the good export with config.json = `config` and the given tensors must
  // fail with every part (and a HINT).
  void expect_refused(const json& config, const std::map<std::string, SafetensorsTensor>& tensors,
                      std::vector<std::string> parts) {
    const std::string dir = dir_ + "/case" + std::to_string(++cases_);
    fs::create_directories(dir);
    std::ofstream(dir + "/config.json") << config.dump();
    std::vector<std::pair<std::string, Tensor>> list;
    for (const auto& [name, t] : tensors) list.emplace_back(name, t.value);
    write_safetensors(dir + "/model.safetensors", list, DType::F32, {});
    parts.push_back("HINT");
    testing::expect_error([&] { import_safetensors(dir, dir + "/out.h5"); }, parts);
    EXPECT_FALSE(fs::exists(dir + "/out.h5"));
  }
  void expect_refused(const std::string& key, const json& value, std::vector<std::string> parts) {
    json c = config_;
    c[key] = value;
    parts.push_back(key);
    expect_refused(c, tensors_.tensors, parts);
  }
  std::string hf_;
  json config_;
  SafetensorsContents tensors_;
  int cases_ = 0;
};

TEST_F(InteropRefusals, ConfigFeaturesWeCannotRepresent) {
  expect_refused("rope_scaling", {{"type", "linear"}, {"factor", 2.0}}, {"linear", "no scaling"});
  expect_refused("num_key_value_heads", 1, {"grouped-query"});
  expect_refused("attention_bias", true, {"no biases"});
  expect_refused("mlp_bias", true, {"no biases"});
  expect_refused("head_dim", 4, {"head_dim is 4", "hidden_size / num_attention_heads = 8"});
  expect_refused("hidden_act", "gelu", {"'gelu'", "silu"});
  expect_refused("model_type", "gpt2", {"'gpt2'"});
  expect_refused("hidden_size", "16", {"wrong type"});
  expect_refused("num_attention_heads", 3, {"num_key_value_heads is 2"});
  json c = config_;
  c["rope_theta"] = 0.5;  // refused by our own validation, which names our key
  expect_refused(c, tensors_.tensors, {"config.json", "model.rope_base", "> 1"});
  c = config_;
  c.erase("vocab_size");
  expect_refused(c, tensors_.tensors, {"config.json lacks 'vocab_size'"});
  // The plain rotation spelled out is accepted.
  c = config_;
  c["rope_scaling"] = {{"rope_type", "default"}};
  std::ofstream(hf_ + "/config.json") << c.dump();
  EXPECT_NO_THROW(import_safetensors(hf_, dir_ + "/default_rope.h5"));
}

TEST_F(InteropRefusals, TensorsThatDoNotMatchTheConfig) {
  auto t = tensors_.tensors;
  t.erase("model.layers.1.mlp.up_proj.weight");
  expect_refused(
      config_, t,
      {"missing tensors: model.layers.1.mlp.up_proj.weight", "unexpected tensors: none"});
  t = tensors_.tensors;
  t["model.layers.0.self_attn.rotary_emb.inv_freq"] = {Tensor::zeros({4}, DType::F32), "F32"};
  expect_refused(config_, t, {"unexpected tensors: model.layers.0.self_attn.rotary_emb.inv_freq"});
  t = tensors_.tensors;
  t["model.norm.weight"] = {Tensor::zeros({8}, DType::F32), "F32"};
  expect_refused(config_, t, {"'model.norm.weight'", "[8]", "[16]"});
  t = tensors_.tensors;
  t["model.norm.weight"] = {Tensor::from_vector(std::vector<float>(16, INFINITY), {16}), "F32"};
  expect_refused(config_, t, {"'model.norm.weight'", "non-finite"});
  // Tied and untied disagreeing with the tensors present.
  json tied = config_;
  tied["tie_word_embeddings"] = true;
  expect_refused(tied, tensors_.tensors, {"tie_word_embeddings = true", "lm_head.weight"});
  t = tensors_.tensors;
  t.erase("lm_head.weight");
  expect_refused(config_, t, {"tie_word_embeddings = false", "no 'lm_head.weight'"});
  // A directory without weights, and one without a config.
  fs::remove(hf_ + "/model.safetensors");
  testing::expect_error([&] { import_safetensors(hf_, dir_ + "/x.h5"); },
                        {"neither model.safetensors nor model.safetensors.index.json", "HINT"});
  testing::expect_error([&] { import_safetensors(dir_ + "/nowhere", dir_ + "/x.h5"); },
                        {"nowhere/config.json", "does not exist", "HINT"});
}

TEST_F(Interop, TokenizerOfTheRunGoesNextToTheWeights) {
  RunConfig run = tiny_run(false);
  run.data.train = dir_ + "/shards";
  fs::create_directories(run.data.train);
  const std::string tok = dir_ + "/tok.model";
  std::ofstream(run.data.train + "/manifest.json") << json{{"tokenizer", {{"name", tok}}}}.dump();
  EXPECT_EQ(eval::recorded_tokenizer_path(run), "");  // named but gone
  std::ofstream(tok) << "sentencepiece bytes";
  EXPECT_EQ(eval::recorded_tokenizer_path(run), tok);
  run.data.train = dir_ + "/no_manifest_here";
  EXPECT_EQ(eval::recorded_tokenizer_path(run), "");
  write_checkpoint(tiny_run(false), dir_ + "/ckpt.h5", 3);
  export_safetensors(dir_ + "/ckpt.h5", dir_ + "/hf", ExportedConfigExtras{}, tok);
  EXPECT_EQ(testing::read_file(dir_ + "/hf/tokenizer.model"), "sentencepiece bytes");
}

// ---- nha convert ------------------------------------------------------------------------------

TEST_F(Interop, ConvertReusesEveryTransformerParameter) {
  const std::string ckpt = dir_ + "/tpp.h5", out = dir_ + "/nha.h5";
  write_checkpoint(tiny_run(false), ckpt, 5);
  NhaConversion conversion;
  conversion.window = 8;
  conversion.slots = 3;
  conversion.full_attention_every = 2;  // layer 1 keeps its attention
  convert_to_nha(ckpt, out, conversion);
  const ModelConfig m = parse_config(read_config_yaml(out), out).model;
  ASSERT_EQ(m.mixers.size(), 2u);
  EXPECT_EQ(m.mixers[0].type, MixerType::NHA);
  EXPECT_EQ(m.mixers[0].window, 8);
  EXPECT_EQ(m.mixers[0].slots, 3);
  EXPECT_EQ(m.mixers[1].type, MixerType::Attention);
  EXPECT_EQ(m.mixers[1].window, 0);
  const std::map<std::string, Tensor> source = read_parameters(ckpt),
                                      converted = read_parameters(out);
  for (const auto& [name, t] : source) {
    ASSERT_TRUE(converted.count(name)) << name;
    EXPECT_TRUE(identical_bits(t, converted.at(name))) << name;
  }
  // New: the slot gates (random, so that the slots can differ) and the output norm (ones).
  EXPECT_EQ(converted.size(), source.size() + 2);
  EXPECT_EQ(converted.at("layers.0.mixer.wf.weight").shape(), (Shape{2 * 3, 16}));
  EXPECT_GT(testing::max_abs_diff(converted.at("layers.0.mixer.wf.weight"),
                                  Tensor::zeros({6, 16}, DType::F32)),
            0.0);
  EXPECT_TRUE(identical_bits(converted.at("layers.0.mixer.out_norm.weight"),
                             Tensor::ones({16}, DType::F32)));
  // Every layer kept as attention: the same model.
  conversion.full_attention_every = 1;
  convert_to_nha(ckpt, dir_ + "/same.h5", conversion);
  EXPECT_TRUE(identical_bits(logits_of(dir_ + "/same.h5"), logits_of(ckpt)));
  // Only Transformer++ converts.
  write_checkpoint(tiny_run(false, {{MixerType::Attention, 4}, {}}), dir_ + "/swa.h5", 5);
  testing::expect_error([&] { convert_to_nha(dir_ + "/swa.h5", dir_ + "/x.h5", conversion); },
                        {"not Transformer++", "HINT"});
}

// One sequence's attention output o [T, H*hd] per head: softmax over [M null slots (logit 0,
// value 0) ; the causal keys u <= t with logits q_t . k_u / sqrt(hd)] of the values f(v_u), f =
// SiLU or the identity. q, k, v [T, H, hd] flattened. M = 0 and the identity: plain causal
// attention.
std::vector<double> attend_with_null_slots(const std::vector<double>& q,
                                           const std::vector<double>& k,
                                           const std::vector<double>& v, int64_t T, int64_t H,
                                           int64_t hd, int64_t M, bool silu_values) {
  std::vector<double> o(size_t(T * H * hd), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const auto at = [&](int64_t u, int64_t i) { return size_t((u * H + h) * hd + i); };
      double z = double(M);  // the null slots: e^0 each, value 0
      std::vector<double> acc(size_t(hd), 0.0);
      for (int64_t u = 0; u <= t; ++u) {
        double dot = 0;
        for (int64_t i = 0; i < hd; ++i) dot += q[at(t, i)] * k[at(u, i)];
        const double p = std::exp(dot / std::sqrt(double(hd)));
        z += p;
        for (int64_t i = 0; i < hd; ++i) {
          const double x = v[at(u, i)];
          acc[size_t(i)] += p * (silu_values ? x / (1 + std::exp(-x)) : x);
        }
      }
      for (int64_t i = 0; i < hd; ++i) o[at(t, i)] = acc[size_t(i)] / z;
    }
  return o;
}

// With the window covering the sequence (w >= T), the memory is never written: a converted layer is
// the source's attention (same q, k, v, RoPE, scale) with three changes the NHA layer makes by
// design and no initialisation can undo: SiLU on the values, M null slots in every softmax, and
// SiLU + RMSNorm (eps 1e-6, gain ones) before Wo. Checked in f64 against a hand-written layer.
TEST_F(Interop, ConvertedLayerIsSourceAttentionWithNullSlotsWhenTheWindowCoversTheSequence) {
  const std::string ckpt = dir_ + "/tpp.h5", out = dir_ + "/nha.h5";
  write_checkpoint(tiny_run(true), ckpt, 9);
  NhaConversion conversion;
  conversion.window = 8;  // >= T = 5
  conversion.slots = 3;
  convert_to_nha(ckpt, out, conversion);
  const eval::LoadedModel source = eval::load_model(ckpt, Device::cpu());
  const eval::LoadedModel converted = eval::load_model(out, Device::cpu());
  source.model->to(DType::F64);
  converted.model->to(DType::F64);
  autograd::NoGradGuard no_grad;
  const int64_t T = 5, H = 2, hd = 8, d = 16, M = 3;
  const Tensor x = testing::randn({1, T, d}, 77, DType::F64);  // a block's normed input
  const auto& attention = dynamic_cast<const Attention&>(*source.model->layers[0]->mixer);
  const auto& nha_layer = dynamic_cast<const NhaMixer&>(*converted.model->layers[0]->mixer);
  const double base = attention.rope_base;
  const std::vector<double> q =
      rope(attention.wq->forward(x).reshape({1, T, H, hd}), base).to_vector<double>();
  const std::vector<double> k =
      rope(attention.wk->forward(x).reshape({1, T, H, hd}), base).to_vector<double>();
  const std::vector<double> v = attention.wv->forward(x).to_vector<double>();
  // The reference itself: without null slots and SiLU it is the source's attention.
  const Tensor plain =
      Tensor::from_vector(attend_with_null_slots(q, k, v, T, H, hd, 0, false), {1, T, d});
  EXPECT_LT(testing::rel_rms(attention.forward(x), attention.wo->forward(plain)), 1e-12);
  // The converted layer: SiLU(o) normed over d (gain ones), then the source's Wo.
  std::vector<double> o = attend_with_null_slots(q, k, v, T, H, hd, M, true);
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) {
      double& y = o[size_t(t * d + c)];
      y = y / (1 + std::exp(-y));
      ss += y * y;
    }
    for (int64_t c = 0; c < d; ++c) o[size_t(t * d + c)] /= std::sqrt(ss / double(d) + 1e-6);
  }
  const Tensor expected = attention.wo->forward(Tensor::from_vector(o, {1, T, d}));
  EXPECT_LT(testing::rel_rms(nha_layer.forward(x), expected), 1e-12);
  // The slot gates play no part while the window covers the sequence, and do once it does not.
  const Tensor ids = Tensor::from_vector<int32_t>(kIds, {1, T});
  const Tensor before = converted.model->forward(ids);
  Tensor wf = nha_layer.wf->weight;
  wf.copy_(testing::randn(wf.shape(), 5, DType::F64));
  EXPECT_TRUE(identical_bits(converted.model->forward(ids), before));
  conversion.window = 2;
  convert_to_nha(ckpt, dir_ + "/w2.h5", conversion);
  EXPECT_GT(testing::max_abs_diff(logits_of(dir_ + "/w2.h5"), logits_of(out)), 1e-6);
}

}  // namespace
}  // namespace nha
