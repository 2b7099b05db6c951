#include "train/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/device.h"
#include "core/error.h"

namespace nha {

namespace {

// One YAML mapping being read: remembers the keys it was asked for so that finish() can refuse the
// ones nobody asked for (typos such as `lerning_rate`).
class Section {
 public:
  Section(YAML::Node node, std::string path, const std::string& source)
      : node_(std::move(node)), path_(std::move(path)), source_(source) {
    NHA_CHECK(!node_ || node_.IsNull() || node_.IsMap())
        << source_ << ": '" << path_ << "' must be a mapping of keys to values";
  }

  template <typename T>
  void get(const std::string& key, T& out) {
    known_.insert(key);
    if (!node_ || !node_[key] || node_[key].IsNull()) return;
    try {
      out = node_[key].as<T>();
    } catch (const YAML::Exception&) {
      NHA_FAIL() << source_ << ": key '" << where(key) << "' has value '" << dump(node_[key])
                 << "' which is not " << type_name<T>() << ". HINT: see docs/config.md";
    }
  }

  YAML::Node child(const std::string& key) {
    known_.insert(key);
    return node_ ? node_[key] : YAML::Node();
  }
  std::string where(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  void finish() const {
    if (!node_ || !node_.IsMap()) return;
    for (const auto& kv : node_) {
      const std::string key = kv.first.as<std::string>();
      if (known_.count(key)) continue;
      std::ostringstream allowed;
      for (const std::string& k : known_) allowed << " " << k;
      NHA_FAIL() << source_ << ": unknown key '" << where(key) << "'. HINT: the keys of '"
                 << (path_.empty() ? "<top level>" : path_) << "' are:" << allowed.str();
    }
  }

 private:
  static std::string dump(const YAML::Node& n) {
    YAML::Emitter e;
    e << YAML::Flow << n;
    return e.c_str();
  }
  template <typename T>
  static const char* type_name() {
    if constexpr (std::is_same_v<T, bool>) return "a boolean (true/false)";
    else if constexpr (std::is_integral_v<T>) return "an integer";
    else if constexpr (std::is_floating_point_v<T>) return "a number";
    else if constexpr (std::is_same_v<T, std::string>) return "a string";
    else return "a list of strings";
  }

  YAML::Node node_;
  std::string path_;
  const std::string& source_;
  std::set<std::string> known_;
};

// Integer keys may be written 1e6 as well as 1000000: plain integers are read exactly, other
// numbers must have a whole value inside int64 (converting one outside is undefined behaviour).
void get_count(Section& s, const std::string& key, int64_t& out) {
  double v = double(out);
  s.get(key, v);
  NHA_CHECK(std::isfinite(v) && std::fabs(v) < 0x1p63 && v == std::trunc(v))
      << "key '" << s.where(key) << "' must be a whole number in int64's range, got " << v
      << ". HINT: see docs/config.md";
  int64_t exact = int64_t(v);
  s.get(key, exact);  // exact beyond 2^53, where the double has lost digits
  out = exact;
}

// ---- the keys of each section, listed once ---------------------------------------------------
// The reader (ConfigReader below) and to_yaml (ConfigWriter) both walk these lists, so a key is
// named in one place besides its struct. A visitor has value(key, x) for a scalar or a list of
// strings, count(key, int64_t) for an integer that may be written 1e6, and one method per named
// enum.

template <typename Visitor, typename Mixer>
void mixer_keys(Visitor& v, Mixer& m) {
  v.mixer_type("type", m.type);
  v.count("window", m.window);
  v.count("slots", m.slots);
}

// The scalar keys of `model` (its mixers are read and written around them).
template <typename Visitor, typename Model>
void model_keys(Visitor& v, Model& m) {
  v.count("vocab_size", m.vocab_size);
  v.count("d_model", m.d_model);
  v.count("n_layers", m.n_layers);
  v.count("n_heads", m.n_heads);
  v.count("mlp_hidden", m.mlp_hidden);
  v.value("tie_embeddings", m.tie_embeddings);
  v.value("norm_eps", m.norm_eps);
  v.value("rope_base", m.rope_base);
  v.value("init_std", m.init_std);
}

template <typename Visitor, typename Train>
void train_keys(Visitor& v, Train& t) {
  v.value("device", t.device);
  v.value("precision", t.precision);
  v.count("seq_len", t.seq_len);
  v.count("global_batch_tokens", t.global_batch_tokens);
  v.count("micro_batch", t.micro_batch);
  v.count("steps", t.steps);
  v.count("tokens", t.tokens);
  v.value("lr", t.lr);
  v.value("min_lr_ratio", t.min_lr_ratio);
  v.count("warmup_steps", t.warmup_steps);
  v.schedule("schedule", t.schedule);
  v.value("decay_fraction", t.decay_fraction);
  v.value("beta1", t.beta1);
  v.value("beta2", t.beta2);
  v.value("eps", t.eps);
  v.value("weight_decay", t.weight_decay);
  v.value("decay_norms_and_embeddings", t.decay_norms_and_embeddings);
  v.value("grad_clip", t.grad_clip);
  v.value("seed", t.seed);
  v.count("max_bad_steps", t.max_bad_steps);
  v.value("spike_factor", t.spike_factor);
  v.value("dist_timeout_s", t.dist_timeout_s);
  v.value("dist_bucket_mb", t.dist_bucket_mb);
  v.value("init_from", t.init_from);
  v.value("zero", t.zero);
}

template <typename Visitor, typename Data>
void data_keys(Visitor& v, Data& d) {
  v.value("type", d.type);
  v.value("train", d.train);
  v.value("val", d.val);
  v.value("sampling", d.sampling);
  v.value("mqar_preset", d.mqar_preset);
}

template <typename Visitor, typename Eval>
void eval_keys(Visitor& v, Eval& e) {
  v.count("interval", e.interval);
  v.count("val_tokens", e.val_tokens);
  v.value("tasks", e.tasks);
}

template <typename Visitor, typename Checkpoint>
void checkpoint_keys(Visitor& v, Checkpoint& c) {
  v.value("dir", c.dir);
  v.count("interval", c.interval);
  v.count("keep_last", c.keep_last);
}

template <typename Visitor, typename Logging>
void logging_keys(Visitor& v, Logging& l) {
  v.count("interval", l.interval);
  v.value("run_dir", l.run_dir);
}

Schedule schedule_from_name(const std::string& name, const std::string& source) {
  if (name == "cosine") return Schedule::Cosine;
  if (name == "wsd") return Schedule::WSD;
  if (name == "constant") return Schedule::Constant;
  NHA_FAIL() << source << ": 'train.schedule' is '" << name << "'. HINT: use cosine, wsd or constant";
}

// Reads the keys of one section into a config struct (missing keys keep their defaults).
class ConfigReader {
 public:
  ConfigReader(Section& section, const std::string& source) : s_(section), source_(source) {}
  template <typename T>
  void value(const char* key, T& out) { s_.get(key, out); }
  void count(const char* key, int64_t& out) { get_count(s_, key, out); }
  void schedule(const char* key, Schedule& out) {
    std::string name = schedule_name(out);
    s_.get(key, name);
    out = schedule_from_name(name, source_);
  }
  void mixer_type(const char* key, MixerType& out) {
    std::string name = mixer_type_name(out);
    s_.get(key, name);
    try {
      out = mixer_type_from_name(name);
    } catch (const Error&) {
      NHA_FAIL() << source_ << ": '" << s_.where(key) << "' is '" << name
                 << "'. HINT: use attention, nha or gsa";
    }
  }

 private:
  Section& s_;
  const std::string& source_;
};

// Writes the keys of one section as `key: value` pairs of the current YAML map.
class ConfigWriter {
 public:
  explicit ConfigWriter(YAML::Emitter& e) : e_(e) {}
  template <typename T>
  void value(const char* key, const T& v) {
    e_ << YAML::Key << key << YAML::Value;
    if constexpr (std::is_same_v<T, std::vector<std::string>>) e_ << YAML::Flow;
    e_ << v;
  }
  void count(const char* key, const int64_t& v) { value(key, v); }
  void schedule(const char* key, const Schedule& s) { value(key, schedule_name(s)); }
  void mixer_type(const char* key, const MixerType& t) { value(key, mixer_type_name(t)); }

 private:
  YAML::Emitter& e_;
};

// Reads `keys` of the section `name` of `top` into `out` and refuses unknown keys.
template <typename Config, typename Keys>
void read_section(Section& top, const char* name, const std::string& source, Config& out,
                  Keys keys) {
  Section s(top.child(name), name, source);
  ConfigReader r(s, source);
  keys(r, out);
  s.finish();
}

MixerConfig read_mixer(YAML::Node node, const std::string& path, const std::string& source,
                       MixerConfig m) {
  Section s(node, path, source);
  ConfigReader r(s, source);
  mixer_keys(r, m);
  s.finish();
  return m.resolved();
}

void read_model(Section s, ModelConfig& m, const std::string& source) {
  ConfigReader r(s, source);
  model_keys(r, m);

  // Per-layer mixers: `layers` (explicit list) wins; else `mixer` for every layer, with the
  // paper's placement of full-attention layers: layer % block_size == transformer_idx.
  YAML::Node layers = s.child("layers");
  YAML::Node mixer = s.child("mixer");
  YAML::Node full = s.child("full_attention");
  s.finish();
  if (layers && !layers.IsNull()) {
    NHA_CHECK(layers.IsSequence()) << source << ": 'model.layers' must be a list of mixers";
    m.mixers.clear();
    for (size_t i = 0; i < layers.size(); ++i)
      m.mixers.push_back(read_mixer(layers[i], "model.layers[" + std::to_string(i) + "]", source, {}));
    return;
  }
  MixerConfig base = read_mixer(mixer, "model.mixer", source, {});
  m.mixers.assign(size_t(std::max<int64_t>(m.n_layers, 0)), base);
  if (full && !full.IsNull()) {
    Section f(full, "model.full_attention", source);
    int64_t block_size = 0, transformer_idx = 0;
    get_count(f, "block_size", block_size);
    get_count(f, "transformer_idx", transformer_idx);
    MixerConfig fm = read_mixer(f.child("mixer"), "model.full_attention.mixer", source, {});
    f.finish();
    NHA_CHECK(block_size > 0 && transformer_idx >= 0 && transformer_idx < block_size)
        << source << ": model.full_attention needs 0 <= transformer_idx < block_size, got "
        << transformer_idx << " and " << block_size;
    for (int64_t i = 0; i < m.n_layers; ++i)
      if (i % block_size == transformer_idx) m.mixers[size_t(i)] = fm;
  }
}

void apply_override(YAML::Node& root, const std::string& assignment, const std::string& source) {
  const size_t eq = assignment.find('=');
  NHA_CHECK(eq != std::string::npos && eq > 0)
      << "override '" << assignment << "' is not KEY=VALUE. HINT: --set train.lr=1e-3";
  const std::string key = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  YAML::Node parsed;
  try {
    parsed = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    NHA_FAIL() << "override '" << assignment << "': value is not valid YAML (" << e.what() << ")";
  }
  // yaml-cpp nodes are handles: walk down with fresh handles, creating maps as needed.
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node next = chain.back()[parts[i]];
    if (!next.IsDefined() || next.IsNull()) chain.back()[parts[i]] = YAML::Node(YAML::NodeType::Map);
    next = chain.back()[parts[i]];
    // yaml-cpp would throw its own message from operator[] on a scalar or a list.
    NHA_CHECK(next.IsMap()) << source << ": override '" << assignment << "': '" << parts[i]
                            << "' holds a value, not keys. HINT: --set takes the path of one key, "
                            << "e.g. --set train.lr=1e-3 (docs/config.md)";
    chain.push_back(next);
  }
  chain.back()[parts.back()] = parsed;
}

}  // namespace

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::Cosine: return "cosine";
    case Schedule::WSD: return "wsd";
    case Schedule::Constant: return "constant";
  }
  return "?";
}

int64_t TrainConfig::accumulation_steps(int64_t world_size) const {
  return global_batch_tokens / (tokens_per_micro_step() * world_size);
}

void TrainConfig::check_world_size(int64_t world_size, const std::string& source) const {
  const int64_t unit = tokens_per_micro_step() * world_size;  // one micro-batch on every rank
  NHA_CHECK(global_batch_tokens % unit == 0)
      << source << ": train.global_batch_tokens (" << global_batch_tokens << ") must be a multiple of "
      << "micro_batch x seq_len x GPUs (" << micro_batch << " x " << seq_len << " x " << world_size
      << " = " << unit << ") so that every rank runs the same number of whole micro-batches. HINT: "
      << "--set train.global_batch_tokens=" << std::max<int64_t>(unit, global_batch_tokens / unit * unit)
      << " or a smaller train.micro_batch";
  NHA_CHECK(zero == 0 || world_size > 1)
      << source << ": train.zero is " << zero << " but the run has one rank: ZeRO-1 shards the "
      << "optimizer state across data-parallel ranks. HINT: --set train.zero=0 on one process, or "
      << "train with --ranks N (--gpus N) for N >= 2";
}

int64_t TrainConfig::total_steps() const {
  // Rounded up without forming tokens + global_batch_tokens, which may overflow.
  return steps > 0 ? steps : tokens / global_batch_tokens + (tokens % global_batch_tokens != 0);
}

RunConfig parse_config(const std::string& yaml_text, const std::string& source,
                       const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    NHA_FAIL() << source << ": not valid YAML: " << e.what();
  }
  if (!root || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  for (const std::string& o : overrides) apply_override(root, o, source);

  RunConfig c;
  c.source = source;
  Section top(root, "", source);
  read_model(Section(top.child("model"), "model", source), c.model, source);
  read_section(top, "train", source, c.train, [](auto& r, auto& t) { train_keys(r, t); });
  read_section(top, "data", source, c.data, [](auto& r, auto& d) { data_keys(r, d); });
  read_section(top, "eval", source, c.eval, [](auto& r, auto& e) { eval_keys(r, e); });
  read_section(top, "checkpoint", source, c.checkpoint,
               [](auto& r, auto& k) { checkpoint_keys(r, k); });
  read_section(top, "logging", source, c.logging, [](auto& r, auto& l) { logging_keys(r, l); });
  top.finish();
  if (c.logging.run_dir.empty())
    c.logging.run_dir = "runs/" + std::filesystem::path(source).stem().string();
  if (c.checkpoint.dir.empty()) c.checkpoint.dir = c.logging.run_dir + "/checkpoints";
  c.validate();
  return c;
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  NHA_CHECK(in.good()) << "cannot read config file '" << path
                       << "'. HINT: check the path; shipped configs are in configs/";
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path, overrides);
}

void RunConfig::validate() const {
  try {
    model.validate();
  } catch (const Error& e) {
    NHA_FAIL() << source << ": " << e.what();
  }
  const TrainConfig& t = train;
  // Sizes are bounded so that every product the trainer forms (micro_batch x seq_len x GPUs,
  // steps x global_batch_tokens) fits in int64; the bounds are far beyond any real run.
  auto check_count = [&](const char* key, int64_t v, int64_t lo, int64_t hi) {
    NHA_CHECK(v >= lo && v <= hi) << source << ": " << key << " must be in [" << lo << ", " << hi
                                  << "], got " << v << ". HINT: see docs/config.md";
  };
  constexpr int64_t kMaxTokens = int64_t(1) << 50;  // ~1e15 tokens
  check_count("train.seq_len", t.seq_len, 1, int64_t(1) << 24);
  check_count("train.micro_batch", t.micro_batch, 1, int64_t(1) << 20);
  check_count("train.global_batch_tokens", t.global_batch_tokens, 1, int64_t(1) << 40);
  check_count("train.steps", t.steps, 0, kMaxTokens / t.global_batch_tokens);
  check_count("train.tokens", t.tokens, 0, kMaxTokens);
  check_count("train.warmup_steps", t.warmup_steps, 0, kMaxTokens);
  check_count("train.max_bad_steps", t.max_bad_steps, 1, kMaxTokens);
  check_count("eval.interval", eval.interval, 0, kMaxTokens);
  check_count("eval.val_tokens", eval.val_tokens, 0, kMaxTokens);
  check_count("checkpoint.interval", checkpoint.interval, 0, kMaxTokens);
  check_count("checkpoint.keep_last", checkpoint.keep_last, 1, kMaxTokens);
  check_count("logging.interval", logging.interval, 1, kMaxTokens);
  // Floats: finite first (inf passes `> 0`; NaN fails every comparison).
  auto check_real = [&](const char* key, double v, bool ok, const char* want) {
    NHA_CHECK(std::isfinite(v) && ok) << source << ": " << key << " must be " << want << ", got "
                                      << v << ". HINT: see docs/config.md for its default";
  };
  check_real("train.grad_clip", t.grad_clip, t.grad_clip >= 0, "a finite number >= 0 (0 = off)");
  check_real("train.spike_factor", t.spike_factor, t.spike_factor >= 0,
             "a finite number >= 0 (0 = off)");
  check_real("train.lr", t.lr, t.lr > 0, "a finite number > 0");
  check_real("train.eps", t.eps, t.eps > 0, "a finite number > 0");
  check_real("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "a finite number >= 0");
  NHA_CHECK(t.global_batch_tokens > 0 && t.global_batch_tokens % t.tokens_per_micro_step() == 0)
      << source << ": train.global_batch_tokens (" << t.global_batch_tokens
      << ") must be a positive multiple of micro_batch x seq_len (" << t.tokens_per_micro_step()
      << "). HINT: e.g. " << t.tokens_per_micro_step() * 8;
  NHA_CHECK((t.steps > 0) != (t.tokens > 0))
      << source << ": give exactly one of train.steps and train.tokens (got steps=" << t.steps
      << ", tokens=" << t.tokens << ")";
  NHA_CHECK(t.min_lr_ratio >= 0 && t.min_lr_ratio <= 1)
      << source << ": train.min_lr_ratio must be in [0, 1], got " << t.min_lr_ratio;
  NHA_CHECK(t.decay_fraction > 0 && t.decay_fraction <= 1)
      << source << ": train.decay_fraction must be in (0, 1], got " << t.decay_fraction;
  NHA_CHECK(t.beta1 >= 0 && t.beta1 < 1 && t.beta2 >= 0 && t.beta2 < 1)
      << source << ": train.beta1/beta2 must be in [0, 1)";
  NHA_CHECK(std::isfinite(t.dist_timeout_s) && t.dist_timeout_s > 0)
      << source << ": train.dist_timeout_s must be positive, got " << t.dist_timeout_s
      << ". HINT: the default 600 s covers checkpoint writes on rank 0";
  NHA_CHECK(t.dist_bucket_mb > 0 && t.dist_bucket_mb <= 1 << 20)
      << source << ": train.dist_bucket_mb must be in (0, 2^20], got " << t.dist_bucket_mb
      << ". HINT: 25 (PyTorch DDP's default) overlaps well";
  NHA_CHECK(t.zero == 0 || t.zero == 1)
      << source << ": train.zero is " << t.zero << ". HINT: 0 (every rank keeps the whole "
      << "optimizer state) or 1 (ZeRO-1: AdamW moments sharded across the ranks); ZeRO-2/3 are "
      << "not implemented";
  NHA_CHECK(t.precision == "auto" || t.precision == "bf16" || t.precision == "fp32")
      << source << ": train.precision is '" << t.precision << "'. HINT: use auto, bf16 or fp32";
  if (t.device != "auto") (void)Device::parse(t.device);
  NHA_CHECK(data.type == "shards" || data.type == "mqar")
      << source << ": data.type is '" << data.type << "'. HINT: use shards or mqar";
  NHA_CHECK(data.type != "shards" || !data.train.empty())
      << source << ": data.train is empty. HINT: point it at a directory made by `nha prepare`";
  NHA_CHECK(data.sampling == "random" || data.sampling == "document")
      << source << ": data.sampling is '" << data.sampling << "'. HINT: use random or document";
}

std::string to_yaml(const RunConfig& c) {
  YAML::Emitter e;
  ConfigWriter w(e);
  e << YAML::BeginMap;
  e << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  ModelConfig m = c.model;
  m.mlp_hidden = m.resolved_mlp_hidden();  // the width the model has, not 0 for "default"
  model_keys(w, m);
  e << YAML::Key << "layers" << YAML::Value << YAML::BeginSeq;
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const MixerConfig x = m.mixer(i);
    e << YAML::Flow << YAML::BeginMap;
    mixer_keys(w, x);
    e << YAML::EndMap;
  }
  e << YAML::EndSeq << YAML::EndMap;
  const auto section = [&](const char* name, const auto& config, auto keys) {
    e << YAML::Key << name << YAML::Value << YAML::BeginMap;
    keys(w, config);
    e << YAML::EndMap;
  };
  section("train", c.train, [](auto& v, auto& t) { train_keys(v, t); });
  section("data", c.data, [](auto& v, auto& d) { data_keys(v, d); });
  section("eval", c.eval, [](auto& v, auto& x) { eval_keys(v, x); });
  section("checkpoint", c.checkpoint, [](auto& v, auto& k) { checkpoint_keys(v, k); });
  section("logging", c.logging, [](auto& v, auto& l) { logging_keys(v, l); });
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace nha
