#include "train/trainer.h"

#include <omp.h>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "autograd/autocast.h"
#include "autograd/node.h"
#include "core/clock.h"
#include "core/fileio.h"
#include "data/mqar.h"
#include "train/schedule.h"

namespace fs = std::filesystem;

namespace nha {

namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

// "attention x4" / "nha(w=64,m=64) x3, nha(w=1048576,m=64) x1": the layers' mixers, runs merged.
std::string mixer_summary(const ModelConfig& m) {
  auto name = [](const MixerConfig& x) {
    std::string s = mixer_type_name(x.type);
    if (x.type == MixerType::Attention) {
      if (x.window > 0) s += "(w=" + std::to_string(x.window) + ")";
    } else if (x.type == MixerType::NHA) {
      s += "(w=" + std::to_string(x.window) + ",m=" + std::to_string(x.slots) + ")";
    } else {
      s += "(m=" + std::to_string(x.slots) + ")";
    }
    return s;
  };
  std::vector<std::pair<std::string, int>> runs;
  for (int64_t l = 0; l < m.n_layers; ++l) {
    std::string n = name(m.mixer(l));
    if (!runs.empty() && runs.back().first == n) ++runs.back().second;
    else runs.emplace_back(n, 1);
  }
  std::string out;
  for (const auto& [n, c] : runs) out += (out.empty() ? "" : ", ") + n + " x" + std::to_string(c);
  return out;
}

// key path -> scalar text of a YAML tree (for "the config differs from the checkpoint's in ...").
void flatten(const YAML::Node& n, const std::string& prefix, std::map<std::string, std::string>& out) {
  if (n.IsMap()) {
    for (const auto& kv : n)
      flatten(kv.second, prefix.empty() ? kv.first.as<std::string>()
                                        : prefix + "." + kv.first.as<std::string>(), out);
  } else if (n.IsSequence()) {
    for (size_t i = 0; i < n.size(); ++i) flatten(n[i], prefix + "[" + std::to_string(i) + "]", out);
  } else {
    out[prefix] = n.IsNull() ? "" : n.as<std::string>();
  }
}

std::vector<std::string> config_differences(const std::string& a, const std::string& b) {
  std::map<std::string, std::string> fa, fb;
  flatten(YAML::Load(a), "", fa);
  flatten(YAML::Load(b), "", fb);
  std::vector<std::string> diff;
  for (const auto& [k, v] : fa) {
    auto it = fb.find(k);
    if (it == fb.end()) diff.push_back(k + " (only in the checkpoint)");
    else if (it->second != v) diff.push_back(k + ": " + v + " -> " + it->second);
  }
  for (const auto& [k, v] : fb)
    if (!fa.count(k)) diff.push_back(k + " (new)");
  return diff;
}

// Bytes of text per token from the `nha prepare` manifest next to the shards: the input bytes
// over all tokens of both splits (EOS included). -1 when there is no manifest.
double manifest_bytes_per_token(const std::string& shard_path, std::string& why) {
  fs::path dir = fs::is_directory(shard_path) ? fs::path(shard_path) : fs::path(shard_path).parent_path();
  fs::path manifest = dir / "manifest.json";
  if (!fs::exists(manifest)) {
    why = "no " + manifest.string();
    return -1;
  }
  try {
    std::ifstream in(manifest);
    nlohmann::json m = nlohmann::json::parse(in);
    double bytes = m.at("text_bytes").get<double>(), tokens = 0;
    for (const auto& [split, info] : m.at("splits").items()) tokens += info.at("tokens").get<double>();
    if (bytes > 0 && tokens > 0) return bytes / tokens;
    why = manifest.string() + " has no text_bytes/tokens";
  } catch (const std::exception& e) {
    why = manifest.string() + ": " + e.what();
  }
  return -1;
}

std::shared_ptr<const data::ShardSet> open_split(const std::string& path, const std::string& split,
                                                 const std::string& key, const std::string& source) {
  NHA_CHECK(fs::exists(path)) << source << ": " << key << " '" << path
                              << "' does not exist. HINT: create shards with `nha prepare --out "
                              << path << "` (README: the quick data lives in runs/data/quick)";
  if (fs::is_regular_file(path)) return data::ShardSet::open_files({path});
  return data::ShardSet::open(path, split);
}

// The targets of a micro-batch [micro, T] (on the host) that count: their number, and when at
// most half of the rows count (MQAR: the query positions) their flattened rows and targets ([n]
// i32 each, `sparse`) for LanguageModel::loss_on_rows; when most rows count (language modelling)
// the dense loss needs no gather and `sparse` is false.
struct CountedTargets {
  int64_t count = 0;
  bool sparse = false;
  Tensor rows, targets;
};

CountedTargets counted_targets(const Tensor& targets) {
  const std::vector<int32_t> all = targets.contiguous().to_vector<int32_t>();
  std::vector<int32_t> rows, kept;
  for (size_t r = 0; r < all.size(); ++r)
    if (all[r] != data::kIgnoreIndex) {
      rows.push_back(int32_t(r));
      kept.push_back(all[r]);
    }
  CountedTargets c;
  c.count = int64_t(rows.size());
  c.sparse = c.count > 0 && 2 * rows.size() <= all.size();
  if (c.sparse) {
    c.rows = Tensor::from_vector<int32_t>(rows, {c.count});
    c.targets = Tensor::from_vector<int32_t>(kept, {c.count});
  }
  return c;
}

}  // namespace

Device resolve_device(const std::string& name) {
  if (name == "auto") return cuda_device_count() > 0 ? Device::cuda(0) : Device::cpu();
  Device d = Device::parse(name);
  if (d.is_cuda()) {
    NHA_CHECK(cuda_built()) << "train.device is '" << name << "' but this binary was built without "
                            << "CUDA. HINT: rebuild with nvcc available (-DNHA_CUDA=ON) or use "
                            << "train.device=cpu";
    NHA_CHECK(d.index < cuda_device_count())
        << "train.device is '" << name << "' but " << cuda_device_count()
        << " GPU(s) are visible. HINT: use train.device=auto, cpu, or cuda:N with N < "
        << cuda_device_count();
  }
  return d;
}

Trainer::Trainer(RunConfig config, TrainerOptions options)
    : config_(std::move(config)), options_(std::move(options)), rng_(config_.train.seed) {
  const TrainConfig& t = config_.train;
  const std::string& src = config_.source;
  group_ = options_.group;
  if (group_) {
    world_ = group_->world_size();
    rank_ = group_->rank();
    device_ = group_->device();
    NHA_CHECK(device_.is_cpu() ? t.device == "cpu" || t.device == "auto"
                               : t.device == "auto" || t.device == "cuda")
        << src << ": train.device is '" << t.device << "' but each data-parallel rank trains on "
        << (device_.is_cpu() ? "the CPU (MPI ranks)" : "its own GPU (cuda:<local rank>)")
        << ". HINT: --set train.device=" << (device_.is_cpu() ? "cpu" : "auto");
    check_config_agrees_across_ranks();
  } else {
    device_ = resolve_device(t.device);
  }
  const std::string precision =
      t.precision == "auto" ? (device_.is_cuda() ? "bf16" : "fp32") : t.precision;
  NHA_CHECK(!(precision == "bf16" && device_.is_cpu()))
      << src << ": train.precision is bf16 but the device is the CPU, whose kernels compute in "
      << "fp32 only. HINT: --set train.precision=auto (bf16 on a GPU, fp32 on the CPU)";
  compute_dtype_ = precision == "bf16" ? DType::BF16 : DType::F32;

  setup_data();

  model_ = std::make_unique<LanguageModel>(config_.model, t.seed);
  if (!t.init_from.empty() && !options_.resume) load_initial_parameters();
  model_->to(device_);
  params_ = model_->named_parameters();
  for (const NamedParameter& p : params_) param_tensors_.push_back(p.tensor);
  num_parameters_ = model_->num_parameters();
  matmul_parameters_ = num_parameters_ - (config_.model.tie_embeddings ? 0 : model_->embed->weight.numel());
  flops_per_token_ = flops_per_token(config_.model, t.seq_len, matmul_parameters_);

  std::vector<ParamEntry> entries;
  for (const NamedParameter& p : params_)
    entries.push_back({p.name, p.tensor, p.kind == ParamKind::Weight || t.decay_norms_and_embeddings});
  // Gradients are views of one flat buffer laid out like the optimizer's parameters: AdamW reads
  // it as it is and clipping is one reduction over it. Data parallel: the reducer's buckets; one
  // process: a single bucket.
  const int64_t bucket_elements =
      std::max<int64_t>(1, int64_t(t.dist_bucket_mb * (1 << 20)) / int64_t(sizeof(float)));
  const bool zero = t.zero == 1;  // setup_data refused ZeRO-1 on one rank
  if (group_)
    reducer_ = group_->grad_reducer(param_tensors_, bucket_elements, zero);
  else
    flat_grads_ = std::make_unique<FlatGrads>(param_tensors_,
                                                    std::numeric_limits<int64_t>::max());
  // bf16 autocast: AdamW keeps the bf16 copy of the weights that the forward passes use. ZeRO-1:
  // it keeps the moments of this rank's slices of the reducer's buckets.
  optimizer_ = std::make_unique<AdamW>(
      entries, AdamWOptions{t.lr, t.beta1, t.beta2, t.eps, t.weight_decay}, compute_dtype_,
      zero ? OptimizerShard{rank_, world_, bucket_elements} : OptimizerShard{});

  // Resume or start fresh.
  if (rank_ == 0)
    for (const std::string& p : remove_stale_temp_files(config_.checkpoint.dir))
      log_line("removed " + p + " (a checkpoint its writer did not finish)");
  const auto checkpoints = list_checkpoints(config_.checkpoint.dir);
  if (options_.resume) {
    NHA_CHECK(!checkpoints.empty())
        << "--resume: no checkpoint (step_*.h5) in '" << config_.checkpoint.dir
        << "'. HINT: start the run without --resume, or point "
        << "checkpoint.dir / logging.run_dir at the run to continue";
    resume_from_newest_loadable(checkpoints);
  } else {
    NHA_CHECK(checkpoints.empty())
        << "the run directory already holds checkpoints (newest: " << checkpoints.back().second
        << "). HINT: pass --resume to continue that run, or start a new one elsewhere with "
        << "--set logging.run_dir=runs/NEW (or delete " << config_.checkpoint.dir << ")";
  }

  if (options_.write_run_files && rank_ == 0) {
    // Atomic and checked: a full disk must not leave a cut config.yaml for the next --resume.
    write_file_atomic((fs::path(config_.logging.run_dir) / "config.yaml").string(),
                      "# resolved config of " + src + " (every key, defaults filled in)\n" +
                          to_yaml(config_));
    metrics_.open((fs::path(config_.logging.run_dir) / "metrics.jsonl").string(),
                  options_.resume ? step_ : -1);
  }

  // Start-up summary.
  const ModelConfig& m = config_.model;
  std::ostringstream s;
  const int64_t embedding_params =
      model_->embed->weight.numel() + (model_->lm_head ? model_->lm_head->weight.numel() : 0);
  s << "model: " << num_parameters_ << " parameters (" << format_count(double(num_parameters_))
    << "; " << format_count(double(num_parameters_ - embedding_params))
    << " without embedding and head), d " << m.d_model << ", " << m.n_layers << " layers ["
    << mixer_summary(m) << "], " << m.n_heads << " heads, mlp " << m.resolved_mlp_hidden()
    << ", vocab " << m.vocab_size;
  log_line(s.str());
  s.str("");
  s << "device " << device_.str() << ", precision " << precision
    << (compute_dtype_ == DType::BF16 ? " (fp32 master weights, bf16 autocast)" : "");
  if (device_.is_cpu()) s << ", " << omp_get_max_threads() << " threads";
  log_line(s.str());
  s.str("");
  s << "batch: " << t.global_batch_tokens << " tokens/step = " << t.global_batch_tokens / t.seq_len
    << " x " << t.seq_len << " (micro-batch " << t.micro_batch << ", accumulation " << accumulation_
    << (world_ > 1 ? " per rank x " + std::to_string(world_) + " ranks" : std::string())
    << "); " << total_steps() << " steps = " << format_count(double(total_steps() * t.global_batch_tokens))
    << " tokens; lr " << t.lr << " " << schedule_name(t.schedule) << ", warmup " << t.warmup_steps;
  log_line(s.str());
  s.str("");
  s << "flops/token " << format_count(flops_per_token_) << "; run dir " << config_.logging.run_dir;
  if (step_ > 0) s << "; resumed at step " << step_ << " (" << format_count(double(tokens_seen_)) << " tokens)";
  log_line(s.str());
  if (group_) log_line("data parallel: " + group_->summary() + "; " + reducer_->summary());
  s.str("");
  s << "optimizer state: " << optimizer_->state_bytes() << " bytes ("
    << format_bytes(double(optimizer_->state_bytes())) << ")" << (world_ > 1 ? " per rank" : "")
    << ", AdamW m and v"
    << (optimizer_->sharded() ? ", ZeRO-1: 1/" + std::to_string(world_) + " of them on each rank"
                              : std::string());
  log_line(s.str());
}

Trainer::~Trainer() = default;

void Trainer::log_line(const std::string& line) {
  if (options_.log && rank_ == 0) (*options_.log) << line << std::endl;
}

void Trainer::setup_data() {
  const TrainConfig& t = config_.train;
  const DataConfig& d = config_.data;
  const std::string& src = config_.source;
  // The global batch; each rank reads its own rows of it (data/loader.h).
  const int64_t windows = t.global_batch_tokens / t.seq_len;
  t.check_world_size(world_, src);
  if (d.type == "mqar") {
    const std::string preset = d.mqar_preset.empty() ? "train" : d.mqar_preset;
    auto ds = std::make_unique<data::MqarDataset>(data::mqar_preset(preset), windows, world_, rank_,
                                                  true);
    NHA_CHECK(ds->seq_len() == t.seq_len)
        << src << ": data.mqar_preset '" << preset << "' has examples of up to " << ds->seq_len()
        << " tokens but train.seq_len is " << t.seq_len << ". HINT: --set train.seq_len="
        << ds->seq_len();
    NHA_CHECK(config_.model.vocab_size >= ds->options().vocab_size)
        << src << ": MQAR uses a vocabulary of " << ds->options().vocab_size
        << " but model.vocab_size is " << config_.model.vocab_size
        << ". HINT: --set model.vocab_size=" << ds->options().vocab_size;
    train_source_ = std::move(ds);
    if (!d.val.empty()) {
      // For MQAR, data.val names a preset (e.g. "test"): loss and accuracy on its first examples.
      val_mqar_ = std::make_unique<data::MqarDataset>(data::mqar_preset(d.val), t.micro_batch, 1, 0,
                                                      false);
      NHA_CHECK(config_.model.vocab_size >= val_mqar_->options().vocab_size)
          << src << ": data.val preset '" << d.val << "' needs model.vocab_size >= "
          << val_mqar_->options().vocab_size;
    }
  } else {
    auto shards = open_split(d.train, "train", "data.train", src);
    shards->check_model_vocab(config_.model.vocab_size);
    data::LoaderOptions lo;
    lo.seq_len = t.seq_len;
    lo.global_batch = windows;
    lo.world_size = world_;
    lo.rank = rank_;
    lo.seed = t.seed;
    lo.mode = data::sample_mode_from_name(d.sampling);
    train_source_ = std::make_unique<data::TrainLoader>(shards, lo);
    if (!d.val.empty()) {
      val_shards_ = open_split(d.val, "val", "data.val", src);
      val_shards_->check_model_vocab(config_.model.vocab_size);
      NHA_CHECK(val_shards_->tokenizer_hash() == shards->tokenizer_hash())
          << src << ": data.val and data.train were made with different tokenizers ("
          << val_shards_->tokenizer_hash() << " vs " << shards->tokenizer_hash()
          << "). HINT: validate on the val split of the same `nha prepare` run";
      std::string why;
      bytes_per_token_ = manifest_bytes_per_token(d.val, why);
      if (bytes_per_token_ < 0) log_line("bits per byte unavailable: " + why);
    }
  }
  NHA_CHECK(train_source_->local_batch() % t.micro_batch == 0) << "internal: batch rows";
  accumulation_ = train_source_->local_batch() / t.micro_batch;
}

// train.init_from: a fresh run starts from the parameters of a file (nha export, import or
// convert), checked to be the same network as the run's model section; the optimizer, the step
// and the data position start fresh, as with drawn parameters.
void Trainer::load_initial_parameters() {
  const std::string& from = config_.train.init_from;
  const std::string file = resolve_checkpoint(from);
  const RunConfig saved = parse_config(read_config_yaml(file), file + ":/config");
  const std::string diff = architecture_difference(saved.model, config_.model);
  NHA_CHECK(diff.empty())
      << config_.source << ": train.init_from '" << from << "' holds another network than the "
      << "run's model section (" << diff << ": the file's vs the run's). HINT: copy the model "
      << "section of the file's config (its /config dataset: h5dump -d /config, or h5py) into the "
      << "run config";
  load_parameters_into(file, model_->named_parameters());
  log_line("initial parameters from " + file);
}

// Ranks that disagree (another config file, another --set) would average the gradients of
// different models or schedules. Compares a 40-bit hash of the resolved config: for each 20-bit
// half x, sum(x)^2 == W sum(x^2) over the W ranks exactly when every rank has the same x
// (Cauchy-Schwarz), and every sum is exact in doubles.
void Trainer::check_config_agrees_across_ranks() {
  const std::string yaml = to_yaml(config_);
  const uint64_t h = xxh64(yaml.data(), yaml.size(), 0);
  const double lo = double(h & 0xFFFFF), hi = double((h >> 20) & 0xFFFFF);
  const std::vector<double> s =
      group_->all_reduce_sum({lo, lo * lo, hi, hi * hi}, "the config check before training");
  const double w = double(world_);
  NHA_CHECK(s[0] * s[0] == w * s[1] && s[2] * s[2] == w * s[3])
      << config_.source << ": the resolved configs differ between ranks (this is rank " << rank_
      << " of " << world_ << "). HINT: start every rank with the same config file and the same "
      << "--set overrides";
}

data::Batch Trainer::next_batch() { return train_source_->next(); }

double Trainer::forward_backward(const data::Batch& batch, int64_t step) {
  const int64_t rows = batch.inputs.size(0), micro = config_.train.micro_batch;
  NHA_CHECK(rows % micro == 0) << "batch of " << rows << " rows is not a multiple of micro_batch "
                               << micro;
  const int64_t n = rows / micro;
  Tensor loss_sum;  // on the device: no host sync per micro-batch
  for (int64_t i = 0; i < n; ++i) {
    Tensor x = batch.inputs.slice(0, i * micro, (i + 1) * micro).to(device_);  // [micro, T]
    const Tensor y = batch.targets.slice(0, i * micro, (i + 1) * micro);       // [micro, T] host
    Tensor loss;  // fp32 scalar (f64 only in float64 tests)
    {
      AutocastGuard autocast(compute_dtype_);
      const CountedTargets c = counted_targets(y);  // from the host copy: no device read-back
      if (c.sparse)
        loss = model_->loss_on_rows(x, c.rows.to(device_), c.targets.to(device_));
      else
        loss = model_->loss(x, y.to(device_), c.count);
    }
    if (options_.loss_hook) loss = options_.loss_hook(step, i, loss);
    Tensor detached = loss.detach();
    loss_sum = loss_sum.defined() ? add(loss_sum, detached) : detached.clone();
    std::optional<autograd::GradReadyHookGuard> hook;
    if (reducer_ && i == n - 1) {
      // The last micro-batch: each gradient becomes final during this backward, and its bucket's
      // all-reduce starts as soon as the whole bucket is final (train/distributed.h).
      reducer_->begin(step);
      hook.emplace([this](const Tensor& leaf) { reducer_->grad_ready(leaf); });
    }
    (loss * (1.0 / double(n))).backward();
  }
  if (reducer_) reducer_->finish();
  return loss_sum.item<double>() / double(n);
}

StepStats Trainer::train_step() {
  const TrainConfig& t = config_.train;
  if (options_.before_step) options_.before_step(step_);
  const double t0 = monotonic_seconds();
  StepStats st;
  st.step = step_;
  st.lr = lr_at(t, step_);
  data::Batch batch = next_batch();
  st.loss = forward_backward(batch, step_);
  if (group_) {
    // The guard below must decide alike on every rank: it sees the global mean loss (every rank
    // runs the same number of micro-batches) and the averaged gradients. A stop request on any
    // rank (Ctrl-C, SIGTERM) stops all of them before the next step.
    const std::vector<double> r = group_->all_reduce_sum(
        {st.loss, stop_requested_here() ? 1.0 : 0.0}, "the loss all-reduce of step " + std::to_string(step_));
    st.loss = r[0] / double(world_);
    agreed_stop_ = r[1] > 0;
  }
  st.grad_norm = clip_gradients();

  constexpr double kEmaBeta = 0.99;
  const double ema = loss_ema_count_ > 0
                         ? loss_ema_ / (1.0 - std::pow(kEmaBeta, double(loss_ema_count_)))
                         : 0.0;
  if (!std::isfinite(st.loss)) {
    st.skipped = true;
    st.skip_reason = "loss is " + fmt("%g", st.loss);
  } else if (!std::isfinite(st.grad_norm)) {
    st.skipped = true;
    st.skip_reason = "gradient norm is " + fmt("%g", st.grad_norm);
  } else if (t.spike_factor > 0 && loss_ema_count_ >= 10 && st.loss > t.spike_factor * ema) {
    st.skipped = true;
    st.skip_reason = "loss " + fmt("%.4f", st.loss) + " > spike_factor " + fmt("%g", t.spike_factor) +
                     " x running mean " + fmt("%.4f", ema);
  }
  if (st.skipped) {
    ++bad_in_row_;
  } else {
    update_parameters(st.lr);
    bad_in_row_ = 0;
    loss_ema_ = kEmaBeta * loss_ema_ + (1 - kEmaBeta) * st.loss;
    ++loss_ema_count_;
  }
  zero_grad();
  ++step_;
  tokens_seen_ += t.global_batch_tokens;  // all ranks
  st.seconds = monotonic_seconds() - t0;
  return st;
}

double Trainer::clip_gradients() {
  const double max_norm = config_.train.grad_clip;
  if (!optimizer_->sharded())
    return clip_grad_norm_flat(reducer_ ? reducer_->grads().buffer() : flat_grads_->buffer(),
                               max_norm);
  return clip_grad_norm_flat(reducer_->grad_shard(), max_norm, [&](double sum_squares) {
    return group_->all_reduce_sum({sum_squares}, "the gradient norm all-reduce of step " +
                                                     std::to_string(step_))[0];
  });
}

void Trainer::update_parameters(double lr) {
  if (!optimizer_->sharded()) {
    optimizer_->step(lr);
    return;
  }
  // The all-gather of each bucket starts as soon as this rank's slice of it is updated.
  Tensor& flat = optimizer_->flat_parameters();
  optimizer_->step(lr, reducer_->grad_shard(),
                   [&](size_t bucket) { reducer_->start_all_gather(flat, bucket); });
  reducer_->finish_all_gather();
  optimizer_->parameters_written();
}

void Trainer::gather_moments_to_rank0() {
  if (rank_ == 0) optimizer_->allocate_full_moments();
  Tensor none;  // the other ranks receive nothing
  reducer_->gather_to_root(optimizer_->m_shard(), rank_ == 0 ? optimizer_->full_m() : none);
  reducer_->gather_to_root(optimizer_->v_shard(), rank_ == 0 ? optimizer_->full_v() : none);
}

void Trainer::zero_grad() {
  // The gradients stay views of the flat buffer.
  if (reducer_) reducer_->zero_grad();
  else flat_grads_->zero_grad();
}

bool Trainer::stop_requested_here() const {
  return stop_requested_ || (options_.stop_flag && *options_.stop_flag);
}

bool Trainer::stop_now() const { return group_ ? agreed_stop_ : stop_requested_here(); }

ValStats Trainer::validate() {
  ValStats v;
  if (!val_shards_ && !val_mqar_) return v;
  const double t0 = monotonic_seconds();
  autograd::NoGradGuard no_grad;
  AutocastGuard autocast(compute_dtype_);
  const TrainConfig& t = config_.train;
  double loss_sum = 0;
  int64_t correct = 0;
  auto run = [&](const data::Batch& b, bool accuracy) {
    Tensor x = b.inputs.to(device_), y = b.targets.to(device_);
    const int64_t n = counted_targets(b.targets).count;
    if (n == 0) return;
    if (!accuracy) {
      loss_sum += model_->loss(x, y).item<double>() * double(n);
    } else {
      Tensor logits = model_->forward(x);  // [B, T, V]
      const int64_t V = logits.size(-1);
      loss_sum += cross_entropy(logits.reshape({-1, V}), y.reshape({-1})).item<double>() * double(n);
      correct += count_correct_predictions(logits, b.targets).correct;
    }
    v.tokens += n;
  };
  if (val_shards_) {
    const int64_t max_windows = std::max<int64_t>(1, config_.eval.val_tokens / t.seq_len);
    data::ValLoader loader(val_shards_, t.seq_len, t.micro_batch, world_, rank_, max_windows);
    data::Batch b;
    while (loader.next(b)) run(b, false);
  } else {
    const int64_t examples = std::min<int64_t>(
        val_mqar_->size(), std::max<int64_t>(1, config_.eval.val_tokens / val_mqar_->seq_len()));
    // Rank r takes micro-batches r, r + W, r + 2W, ... of the examples.
    for (int64_t first = rank_ * t.micro_batch; first < examples; first += world_ * t.micro_batch)
      run(val_mqar_->examples(first, std::min<int64_t>(t.micro_batch, examples - first)), true);
  }
  if (group_) {
    const std::vector<double> r = group_->all_reduce_sum(
        {loss_sum, double(v.tokens), double(correct)},
        "the validation all-reduce at step " + std::to_string(step_));
    loss_sum = r[0];
    v.tokens = int64_t(r[1]);
    correct = int64_t(r[2]);
  }
  v.loss = v.tokens > 0 ? loss_sum / double(v.tokens) : 0.0;
  if (bytes_per_token_ > 0) v.bpb = v.loss / std::log(2.0) / bytes_per_token_;
  if (val_mqar_ && v.tokens > 0) v.accuracy = double(correct) / double(v.tokens);
  v.seconds = monotonic_seconds() - t0;
  return v;
}

TrainState Trainer::state() const {
  TrainState s;
  s.step = step_;
  s.tokens_seen = tokens_seen_;
  s.optim_step = optimizer_->step_count();
  s.rng_seed = rng_.seed();
  s.rng_offset = rng_.offset();
  s.loss_ema = loss_ema_;
  s.loss_ema_count = loss_ema_count_;
  s.bad_steps_in_row = bad_in_row_;
  s.loader_state = train_source_->state().to_json().dump();
  s.config_yaml = to_yaml(config_);
  return s;
}

std::string Trainer::save_checkpoint() {
  const double t0 = monotonic_seconds();
  const std::string path = checkpoint_path(config_.checkpoint.dir, step_);
  // Every rank holds the whole, identical state (plain data parallelism; under ZeRO-1 once rank 0
  // has gathered the moments): rank 0's file is the complete checkpoint, resumable on any number
  // of ranks, with or without ZeRO-1.
  if (optimizer_->sharded()) gather_moments_to_rank0();
  if (rank_ == 0) {
    nha::save_checkpoint(path, params_, optimizer_.get(), state());
    if (optimizer_->sharded()) optimizer_->release_full_moments(false);
    std::vector<std::string> removed =
        prune_checkpoints(config_.checkpoint.dir, config_.checkpoint.keep_last);
    log_line("checkpoint " + path + " (" + fmt("%.1f s", monotonic_seconds() - t0) +
             (removed.empty() ? "" : ", removed " + std::to_string(removed.size()) + " older") + ")");
  }
  // The other ranks wait for the file, so that all leave together (after a stop request every
  // rank exits once the checkpoint exists).
  if (group_) group_->barrier("the barrier after the checkpoint of step " + std::to_string(step_));
  return path;
}

// A damaged newest checkpoint (disk error, a crash of the storage) must not end a run that has
// older good ones: each failure is reported and the next older checkpoint tried. Every load
// overwrites the whole state, so a failed attempt leaves nothing behind.
void Trainer::resume_from_newest_loadable(
    const std::vector<std::pair<int64_t, std::string>>& checkpoints) {
  std::string newest_error;
  for (auto it = checkpoints.rbegin(); it != checkpoints.rend(); ++it) {
    try {
      load_checkpoint(it->second);
      if (!newest_error.empty())
        log_line("warning: resumed from " + it->second + ", an older checkpoint: newer ones failed");
      return;
    } catch (const Error& e) {
      log_line(std::string("warning: cannot resume from ") + it->second + ": " + e.what());
      if (newest_error.empty()) newest_error = e.what();
    }
  }
  NHA_FAIL() << "--resume: none of the " << checkpoints.size() << " checkpoints in '"
             << config_.checkpoint.dir << "' loads; the newest failed with: " << newest_error;
}

void Trainer::load_checkpoint(const std::string& path) {
  // ZeRO-1: every rank reads the unsharded moments and keeps its slices.
  if (optimizer_->sharded()) optimizer_->allocate_full_moments();
  TrainState s = nha::load_checkpoint(path, params_, optimizer_.get());
  if (optimizer_->sharded()) optimizer_->release_full_moments(true);
  step_ = s.step;
  tokens_seen_ = s.tokens_seen;
  rng_.set_state(s.rng_seed, s.rng_offset);
  loss_ema_ = s.loss_ema;
  loss_ema_count_ = s.loss_ema_count;
  bad_in_row_ = s.bad_steps_in_row;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(s.loader_state);
  } catch (const std::exception& e) {
    NHA_FAIL() << "'" << path << "': /loader_state is not JSON (" << e.what()
               << "). HINT: the checkpoint is damaged; resume from an older one";
  }
  train_source_->restore(data::LoaderState::from_json(j));
  const std::string now = to_yaml(config_);
  if (s.config_yaml != now) {
    std::string list;
    for (const std::string& d : config_differences(s.config_yaml, now)) list += "\n  " + d;
    log_line("note: the config differs from the checkpoint's in:" + list);
  }
  log_line("resumed from " + path + " at step " + std::to_string(step_));
}

void Trainer::train(int64_t until_step) {
  const TrainConfig& t = config_.train;
  const int64_t total = total_steps();
  const int64_t until = until_step < 0 ? total : std::min(until_step, total);
  if (step_ >= until) {
    log_line("nothing to do: the run is at step " + std::to_string(step_) + " of " +
             std::to_string(until));
    return;
  }
  // Interval accumulators for the progress line.
  double loss_sum = 0, time_sum = 0, norm_sum = 0;
  int64_t n = 0, n_ok = 0, tokens = 0;
  while (step_ < until) {
    if (stop_now()) {
      log_line("stop requested at step " + std::to_string(step_) + ": saving a checkpoint");
      save_checkpoint();
      return;
    }
    StepStats st = train_step();
    const bool last = step_ == until;
    if (st.skipped) {
      std::ostringstream s;
      s << "step " << st.step << ": skipped the update: " << st.skip_reason << " (" << bad_in_row_
        << " in a row; stopping after " << t.max_bad_steps << ")";
      log_line(s.str());
      metrics_.write({{"type", "skip"}, {"step", step_}, {"tokens", tokens_seen_},
                      {"loss", std::isfinite(st.loss) ? nlohmann::json(st.loss) : nlohmann::json(nullptr)},
                      {"reason", st.skip_reason}});
      NHA_CHECK(bad_in_row_ < t.max_bad_steps)
          << "stopping: " << bad_in_row_ << " bad steps in a row (the last at step " << st.step
          << ": " << st.skip_reason << "); no update was applied for them. HINT: lower train.lr "
          << "or raise train.warmup_steps, check the data, or resume from the last checkpoint in "
          << config_.checkpoint.dir << " with --resume and a smaller --set train.lr=...";
    } else {
      loss_sum += st.loss;
      norm_sum += st.grad_norm;
      ++n_ok;
    }
    ++n;
    time_sum += st.seconds;
    tokens += t.global_batch_tokens;

    if (step_ % config_.logging.interval == 0 || last) {
      const double loss = n_ok > 0 ? loss_sum / double(n_ok) : NAN;
      const double norm = n_ok > 0 ? norm_sum / double(n_ok) : NAN;
      const double tps = time_sum > 0 ? double(tokens) / time_sum : 0;
      // tok/s counts every rank's tokens; MFU is per GPU.
      const double mfu = device_.is_cuda() ? flops_per_token_ * tps / (kGpuPeakFlops * world_) : -1;
      const MemoryUsage mem = memory_usage(device_);
      const double eta = time_sum / double(n) * double(until - step_);
      char line[512];
      std::snprintf(line, sizeof(line),
                    "step %6lld/%lld | loss %.4f | lr %.3e | gnorm %.3f | %s tok/s | mfu %s | "
                    "mem %s peak %s (%s) | eta %s",
                    (long long)step_, (long long)total, loss, lr_at(t, step_ - 1), norm,
                    format_count(tps).c_str(), mfu >= 0 ? fmt("%.1f%%", 100 * mfu).c_str() : "n/a",
                    format_bytes(double(mem.bytes)).c_str(), format_bytes(double(mem.peak)).c_str(),
                    mem.source, format_duration(eta).c_str());
      log_line(line);
      nlohmann::json rec = {{"type", "train"},      {"step", step_},
                            {"tokens", tokens_seen_}, {"loss", n_ok > 0 ? nlohmann::json(loss) : nlohmann::json(nullptr)},
                            {"lr", lr_at(t, step_ - 1)}, {"grad_norm", n_ok > 0 ? nlohmann::json(norm) : nlohmann::json(nullptr)},
                            {"tokens_per_s", tps},  {"mem_bytes", mem.bytes},
                            {"mem_peak_bytes", mem.peak},
                            {"steps", n},           {"skipped", n - n_ok}};
      if (mfu >= 0) rec["mfu"] = mfu;
      if (world_ > 1) {
        rec["world_size"] = world_;
        rec["optimizer_bytes_per_rank"] = optimizer_->state_bytes();
      }
      metrics_.write(rec);
      reset_memory_peak(device_);  // the next line's peak is that interval's
      loss_sum = time_sum = norm_sum = 0;
      n = n_ok = tokens = 0;
    }
    const bool at_total = step_ == total;
    if ((config_.eval.interval > 0 && step_ % config_.eval.interval == 0) || at_total) {
      ValStats v = validate();
      if (v.tokens > 0) {
        std::ostringstream s;
        s << "val  step " << step_ << " | loss " << fmt("%.4f", v.loss);
        s << " | bpb " << (v.bpb >= 0 ? fmt("%.4f", v.bpb) : std::string("n/a"));
        if (v.accuracy >= 0) s << " | acc " << fmt("%.4f", v.accuracy);
        s << " | " << format_count(double(v.tokens)) << " tokens | " << fmt("%.1f s", v.seconds);
        log_line(s.str());
        nlohmann::json rec = {{"type", "val"}, {"step", step_}, {"tokens", tokens_seen_},
                              {"loss", v.loss}, {"val_tokens", v.tokens}};
        if (v.bpb >= 0) rec["bpb"] = v.bpb;
        if (v.accuracy >= 0) rec["accuracy"] = v.accuracy;
        metrics_.write(rec);
      }
    }
    if ((config_.checkpoint.interval > 0 && step_ % config_.checkpoint.interval == 0) || at_total) {
      save_checkpoint();
    }
  }
}

}  // namespace nha
