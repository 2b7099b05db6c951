// A training run described by one YAML file (docs/config.md lists every key).
//
//   nha train configs/tiny-cpu.yaml --set train.lr=1e-3 --set model.n_layers=4
//
// Parsing refuses unknown keys, wrong types and impossible values with the key path and a hint;
// the resolved config (defaults filled in, overrides applied) is written back to the run directory.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "layers/model_config.h"

namespace nha {

enum class Schedule : uint8_t { Cosine, WSD, Constant };

struct TrainConfig {
  std::string device = "auto";     // auto | cpu | cuda | cuda:N
  std::string precision = "auto";  // auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
  int64_t seq_len = 256;
  int64_t global_batch_tokens = 0;  // tokens per optimizer step (all ranks, all micro-batches)
  int64_t micro_batch = 8;          // sequences per forward/backward on one rank
  int64_t steps = 0;                // either steps or tokens (tokens / global_batch_tokens)
  int64_t tokens = 0;
  double lr = 3e-4;
  double min_lr_ratio = 0.1;
  int64_t warmup_steps = 0;
  Schedule schedule = Schedule::Cosine;
  double decay_fraction = 0.2;  // wsd: share of steps spent decaying at the end
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.01;
  bool decay_norms_and_embeddings = false;
  double grad_clip = 1.0;
  uint64_t seed = 0;
  int64_t max_bad_steps = 5;  // NaN/inf or spiking loss: skip; stop after this many in a row
  double spike_factor = 0.0;  // skip a step whose loss exceeds factor x running mean (0: off)
  // Data parallel (docs/distributed.md): a collective that has not completed after this many
  // seconds aborts the job (a rank died or hangs); gradients are all-reduced in buckets of about
  // this many MiB.
  double dist_timeout_s = 600;
  double dist_bucket_mb = 25;
  // A fresh run's starting parameters: an export file or checkpoint of the same architecture
  // (nha export / import / convert); "" draws them from `seed`. --resume ignores it.
  std::string init_from;
  // 1: ZeRO-1, the AdamW moments sharded over the ranks (needs 2 or more ranks); 0: replicated.
  int64_t zero = 0;

  int64_t tokens_per_micro_step() const { return micro_batch * seq_len; }
  int64_t accumulation_steps(int64_t world_size) const;
  // Refuses a global batch that `world_size` data-parallel ranks cannot split into whole
  // micro-batches (names `source` and gives the nearest batch sizes that work), and ZeRO-1 on one
  // rank (nothing to shard).
  void check_world_size(int64_t world_size, const std::string& source) const;
  int64_t total_steps() const;
};

struct DataConfig {
  std::string type = "shards";  // shards | mqar
  std::string train;            // shard directory (or file)
  std::string val;              // shard directory (or file); empty: no validation
  std::string sampling = "random";  // random | document
  std::string mqar_preset;      // for type mqar
};

struct EvalConfig {
  int64_t interval = 0;          // steps between validations (0: only at the end)
  int64_t val_tokens = 1 << 20;  // fixed token budget of each validation
  std::vector<std::string> tasks;
};

struct CheckpointConfig {
  std::string dir;         // default: <run_dir>/checkpoints
  int64_t interval = 0;    // steps between checkpoints (0: only at the end)
  int64_t keep_last = 3;
};

struct LoggingConfig {
  int64_t interval = 10;  // steps between progress lines
  std::string run_dir;    // default: runs/<config file stem>
};

struct RunConfig {
  ModelConfig model;
  TrainConfig train;
  DataConfig data;
  EvalConfig eval;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  std::string source;  // file it came from (for messages)

  void validate() const;
};

// Loads `path`, applies "a.b=value" overrides (YAML scalars or flow lists), validates.
RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Parses YAML text (tests, resolved configs inside checkpoints). `source` names it in errors.
RunConfig parse_config(const std::string& yaml_text, const std::string& source,
                       const std::vector<std::string>& overrides = {});
// The resolved config as YAML (every key, defaults filled in): parse_config(to_yaml(c)) == c.
std::string to_yaml(const RunConfig& config);

const char* schedule_name(Schedule s);

}  // namespace nha
