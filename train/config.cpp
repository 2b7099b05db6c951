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

MixerConfig read_mixer(YAML::Node node, const std::string& path, const std::string& source,
                       MixerConfig m) {
  Section s(node, path, source);
  std::string type = mixer_type_name(m.type);
  s.get("type", type);
  try {
    m.type = mixer_type_from_name(type);
  } catch (const Error&) {
    NHA_FAIL() << source << ": '" << s.where("type") << "' is '" << type
               << "'. HINT: use attention, nha or gsa";
  }
  get_count(s, "window", m.window);
  get_count(s, "slots", m.slots);
  s.finish();
  return m.resolved();
}

void read_model(Section s, ModelConfig& m, const std::string& source) {
  get_count(s, "vocab_size", m.vocab_size);
  get_count(s, "d_model", m.d_model);
  get_count(s, "n_layers", m.n_layers);
  get_count(s, "n_heads", m.n_heads);
  get_count(s, "mlp_hidden", m.mlp_hidden);
  s.get("tie_embeddings", m.tie_embeddings);
  s.get("norm_eps", m.norm_eps);
  s.get("rope_base", m.rope_base);
  s.get("init_std", m.init_std);

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

Schedule schedule_from_name(const std::string& name, const std::string& source) {
  if (name == "cosine") return Schedule::Cosine;
  if (name == "wsd") return Schedule::WSD;
  if (name == "constant") return Schedule::Constant;
  NHA_FAIL() << source << ": 'train.schedule' is '" << name << "'. HINT: use cosine, wsd or constant";
}

void read_train(Section s, TrainConfig& t, const std::string& source) {
  s.get("device", t.device);
  s.get("precision", t.precision);
  get_count(s, "seq_len", t.seq_len);
  get_count(s, "global_batch_tokens", t.global_batch_tokens);
  get_count(s, "micro_batch", t.micro_batch);
  get_count(s, "steps", t.steps);
  get_count(s, "tokens", t.tokens);
  s.get("lr", t.lr);
  s.get("min_lr_ratio", t.min_lr_ratio);
  get_count(s, "warmup_steps", t.warmup_steps);
  std::string schedule = schedule_name(t.schedule);
  s.get("schedule", schedule);
  t.schedule = schedule_from_name(schedule, source);
  s.get("decay_fraction", t.decay_fraction);
  s.get("beta1", t.beta1);
  s.get("beta2", t.beta2);
  s.get("eps", t.eps);
  s.get("weight_decay", t.weight_decay);
  s.get("decay_norms_and_embeddings", t.decay_norms_and_embeddings);
  s.get("grad_clip", t.grad_clip);
  s.get("seed", t.seed);
  get_count(s, "max_bad_steps", t.max_bad_steps);
  s.get("spike_factor", t.spike_factor);
  s.get("dist_timeout_s", t.dist_timeout_s);
  s.get("dist_bucket_mb", t.dist_bucket_mb);
  s.finish();
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
  read_train(Section(top.child("train"), "train", source), c.train, source);
  {
    Section s(top.child("data"), "data", source);
    s.get("type", c.data.type);
    s.get("train", c.data.train);
    s.get("val", c.data.val);
    s.get("sampling", c.data.sampling);
    s.get("mqar_preset", c.data.mqar_preset);
    s.finish();
  }
  {
    Section s(top.child("eval"), "eval", source);
    get_count(s, "interval", c.eval.interval);
    get_count(s, "val_tokens", c.eval.val_tokens);
    s.get("tasks", c.eval.tasks);
    s.finish();
  }
  {
    Section s(top.child("checkpoint"), "checkpoint", source);
    s.get("dir", c.checkpoint.dir);
    get_count(s, "interval", c.checkpoint.interval);
    get_count(s, "keep_last", c.checkpoint.keep_last);
    s.finish();
  }
  {
    Section s(top.child("logging"), "logging", source);
    get_count(s, "interval", c.logging.interval);
    s.get("run_dir", c.logging.run_dir);
    s.finish();
  }
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
  e << YAML::BeginMap;
  e << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  const ModelConfig& m = c.model;
  e << YAML::Key << "vocab_size" << YAML::Value << m.vocab_size;
  e << YAML::Key << "d_model" << YAML::Value << m.d_model;
  e << YAML::Key << "n_layers" << YAML::Value << m.n_layers;
  e << YAML::Key << "n_heads" << YAML::Value << m.n_heads;
  e << YAML::Key << "mlp_hidden" << YAML::Value << m.resolved_mlp_hidden();
  e << YAML::Key << "tie_embeddings" << YAML::Value << m.tie_embeddings;
  e << YAML::Key << "norm_eps" << YAML::Value << m.norm_eps;
  e << YAML::Key << "rope_base" << YAML::Value << m.rope_base;
  e << YAML::Key << "init_std" << YAML::Value << m.init_std;
  e << YAML::Key << "layers" << YAML::Value << YAML::BeginSeq;
  for (int64_t i = 0; i < m.n_layers; ++i) {
    MixerConfig x = m.mixer(i);
    e << YAML::Flow << YAML::BeginMap << YAML::Key << "type" << YAML::Value
      << mixer_type_name(x.type) << YAML::Key << "window" << YAML::Value << x.window
      << YAML::Key << "slots" << YAML::Value << x.slots << YAML::EndMap;
  }
  e << YAML::EndSeq << YAML::EndMap;

  const TrainConfig& t = c.train;
  e << YAML::Key << "train" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "device" << YAML::Value << t.device;
  e << YAML::Key << "precision" << YAML::Value << t.precision;
  e << YAML::Key << "seq_len" << YAML::Value << t.seq_len;
  e << YAML::Key << "global_batch_tokens" << YAML::Value << t.global_batch_tokens;
  e << YAML::Key << "micro_batch" << YAML::Value << t.micro_batch;
  e << YAML::Key << "steps" << YAML::Value << t.steps;
  e << YAML::Key << "tokens" << YAML::Value << t.tokens;
  e << YAML::Key << "lr" << YAML::Value << t.lr;
  e << YAML::Key << "min_lr_ratio" << YAML::Value << t.min_lr_ratio;
  e << YAML::Key << "warmup_steps" << YAML::Value << t.warmup_steps;
  e << YAML::Key << "schedule" << YAML::Value << schedule_name(t.schedule);
  e << YAML::Key << "decay_fraction" << YAML::Value << t.decay_fraction;
  e << YAML::Key << "beta1" << YAML::Value << t.beta1;
  e << YAML::Key << "beta2" << YAML::Value << t.beta2;
  e << YAML::Key << "eps" << YAML::Value << t.eps;
  e << YAML::Key << "weight_decay" << YAML::Value << t.weight_decay;
  e << YAML::Key << "decay_norms_and_embeddings" << YAML::Value << t.decay_norms_and_embeddings;
  e << YAML::Key << "grad_clip" << YAML::Value << t.grad_clip;
  e << YAML::Key << "seed" << YAML::Value << t.seed;
  e << YAML::Key << "max_bad_steps" << YAML::Value << t.max_bad_steps;
  e << YAML::Key << "spike_factor" << YAML::Value << t.spike_factor;
  e << YAML::Key << "dist_timeout_s" << YAML::Value << t.dist_timeout_s;
  e << YAML::Key << "dist_bucket_mb" << YAML::Value << t.dist_bucket_mb;
  e << YAML::EndMap;

  e << YAML::Key << "data" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "type" << YAML::Value << c.data.type;
  e << YAML::Key << "train" << YAML::Value << c.data.train;
  e << YAML::Key << "val" << YAML::Value << c.data.val;
  e << YAML::Key << "sampling" << YAML::Value << c.data.sampling;
  e << YAML::Key << "mqar_preset" << YAML::Value << c.data.mqar_preset;
  e << YAML::EndMap;

  e << YAML::Key << "eval" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "interval" << YAML::Value << c.eval.interval;
  e << YAML::Key << "val_tokens" << YAML::Value << c.eval.val_tokens;
  e << YAML::Key << "tasks" << YAML::Value << YAML::Flow << c.eval.tasks;
  e << YAML::EndMap;

  e << YAML::Key << "checkpoint" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "dir" << YAML::Value << c.checkpoint.dir;
  e << YAML::Key << "interval" << YAML::Value << c.checkpoint.interval;
  e << YAML::Key << "keep_last" << YAML::Value << c.checkpoint.keep_last;
  e << YAML::EndMap;

  e << YAML::Key << "logging" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "interval" << YAML::Value << c.logging.interval;
  e << YAML::Key << "run_dir" << YAML::Value << c.logging.run_dir;
  e << YAML::EndMap;
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace nha
