// The training loop: `nha train CONFIG` (apps/cmd_train.cpp) is Trainer(config).train().
//
//   RunConfig cfg = load_config("configs/tiny-cpu.yaml");
//   Trainer trainer(cfg, {.resume = true});
//   trainer.train();
//
// One optimizer step (docs/training.md):
//   batch = loader.next()                          all global_batch_tokens / seq_len windows
//   for each of the accumulation micro-batches:    micro_batch rows of the batch
//       (model.loss(x, y) / accumulation).backward()      (under autocast in bf16 mode)
//   norm = clip_grad_norm_flat(gradients, grad_clip)   (the gradients are one flat buffer)
//   if loss or norm is not finite, or loss > spike_factor x running mean: skip the update
//   else AdamW.step(lr_at(step))                       (one kernel; bf16: also the weights' copy)
// then progress lines, JSONL metrics, validation and checkpoints at their intervals.
//
// Data parallel (options.group, train/distributed.h): every rank runs this same loop on its rows of
// each global batch; the last micro-batch's backward averages the gradients over the ranks, the
// loss used by the guard is the global mean, and only rank 0 writes files (docs/distributed.md).
#pragma once
#include <csignal>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "data/loader.h"
#include "layers/transformer.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/distributed.h"
#include "train/metrics.h"
#include "train/optim.h"

namespace nha {

namespace data {
class MqarDataset;
}

struct TrainerOptions {
  // Continue from the newest checkpoint in checkpoint.dir (refused when there is none). Without
  // it, a run directory that already holds checkpoints is refused (no silent overwrite).
  bool resume = false;
  // Progress lines go here; nullptr = quiet.
  std::ostream* log = nullptr;
  // Write run_dir/config.yaml and run_dir/metrics.jsonl (tests may turn this off). Under data
  // parallelism only rank 0 writes files and progress lines.
  bool write_run_files = true;
  // Data parallel over the ranks of this group (not owned; nullptr: one process). The device is
  // the group's, cuda:local_rank.
  dist::ProcessGroup* group = nullptr;
  // Checked before every step (e.g. set by a SIGINT handler): save a checkpoint and return.
  const volatile std::sig_atomic_t* stop_flag = nullptr;
  // Test hook: sees each micro-batch loss before backward and may replace it (e.g. multiply by NaN
  // to check the guard). Arguments: step, micro-batch index, loss.
  std::function<Tensor(int64_t, int64_t, const Tensor&)> loss_hook;
  // Test hook: called with the step's index before every step (`nha train` plugs in the
  // multi-GPU tests' fault injection, apps/test_fault.h).
  std::function<void(int64_t)> before_step;
};

struct StepStats {
  int64_t step = 0;         // the step just run (0-based)
  double loss = 0;          // mean of the micro-batch losses (over all ranks)
  double grad_norm = 0;     // before clipping
  double lr = 0;
  bool skipped = false;     // update skipped by the NaN/spike guard
  std::string skip_reason;
  double seconds = 0;
};

struct ValStats {
  double loss = 0;          // mean over target tokens (nats)
  double bpb = -1;          // bits per byte; < 0 when unavailable
  double accuracy = -1;     // MQAR: share of query positions predicted exactly; < 0 otherwise
  int64_t tokens = 0;       // target tokens evaluated
  double seconds = 0;
};

class Trainer {
 public:
  explicit Trainer(RunConfig config, TrainerOptions options = {});
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Trains until `until_step` optimizer steps are done (default: train.total_steps()), with
  // progress lines, metrics, validation and checkpoints at their intervals. Reaching the total
  // step count also validates and checkpoints at the end. Throws nha::Error when the guard gives up.
  void train(int64_t until_step = -1);

  // ---- pieces (tests, tools) --------------------------------------------------------------------
  StepStats train_step();                            // one optimizer step (no logging)
  data::Batch next_batch();                          // the next step's batch (advances the loader)
  // Forward + backward of one step's batch in micro-batches: gradients accumulate into the
  // parameters' grad() (averaged over the ranks under data parallelism; under ZeRO-1 only this
  // rank's slices are averaged, into the reducer's grad_shard()); returns this rank's mean
  // micro-batch loss. Does not step or zero the gradients.
  double forward_backward(const data::Batch& batch, int64_t step_for_hooks = 0);
  ValStats validate();                               // all ranks share the work
  std::string save_checkpoint();                     // checkpoint of the current state (written by rank 0); its path
  void load_checkpoint(const std::string& path);     // restore everything from a checkpoint
  void request_stop() { stop_requested_ = true; }    // finish the current step, checkpoint, return

  // ---- state ------------------------------------------------------------------------------------
  const RunConfig& config() const { return config_; }
  LanguageModel& model() { return *model_; }
  AdamW& optimizer() { return *optimizer_; }
  Device device() const { return device_; }
  DType compute_dtype() const { return compute_dtype_; }
  int64_t step() const { return step_; }
  int64_t tokens_seen() const { return tokens_seen_; }
  int64_t total_steps() const { return config_.train.total_steps(); }
  int64_t accumulation() const { return accumulation_; }
  int64_t num_parameters() const { return num_parameters_; }
  int world_size() const { return world_; }
  int rank() const { return rank_; }
  double bytes_per_token() const { return bytes_per_token_; }  // < 0: unknown (no bpb)
  const std::string& run_dir() const { return config_.logging.run_dir; }

 private:
  // Loads the newest of `checkpoints` (step, path; oldest first) that loads; says which failed.
  void resume_from_newest_loadable(const std::vector<std::pair<int64_t, std::string>>& checkpoints);
  void log_line(const std::string& line);
  void setup_data();
  void check_config_agrees_across_ranks();
  void load_initial_parameters();
  TrainState state() const;
  bool stop_requested_here() const;  // request_stop() or the stop flag, on this process
  bool stop_now() const;  // a stop was requested (under data parallelism: on any rank)
  void zero_grad();
  // Clips the averaged gradients with the whole model's norm (ZeRO-1: this rank's shard, the norm
  // from every rank's sum of squares); returns the norm.
  double clip_gradients();
  // The AdamW update of this step; under ZeRO-1 this rank's slices, then the all-gather.
  void update_parameters(double lr);
  // ZeRO-1: every rank's AdamW moments into the optimizer's full moments on rank 0, for a
  // checkpoint in the unsharded format.
  void gather_moments_to_rank0();

  RunConfig config_;
  TrainerOptions options_;
  Device device_;
  DType compute_dtype_ = DType::F32;  // bf16 under mixed precision
  std::unique_ptr<LanguageModel> model_;
  std::unique_ptr<AdamW> optimizer_;
  dist::ProcessGroup* group_ = nullptr;       // data parallel, or nullptr
  std::unique_ptr<dist::GradReducer> reducer_;  // with group_: owns the gradients' memory
  std::unique_ptr<FlatGrads> flat_grads_;  // without group_: owns the gradients' memory
  int world_ = 1, rank_ = 0;
  std::vector<NamedParameter> params_;
  std::vector<Tensor> param_tensors_;
  int64_t num_parameters_ = 0, matmul_parameters_ = 0;
  double flops_per_token_ = 0;

  std::unique_ptr<data::BatchSource> train_source_;
  std::shared_ptr<const data::ShardSet> val_shards_;
  std::unique_ptr<data::MqarDataset> val_mqar_;
  double bytes_per_token_ = -1;
  int64_t accumulation_ = 1;

  Generator rng_;
  int64_t step_ = 0, tokens_seen_ = 0;
  double loss_ema_ = 0;
  int64_t loss_ema_count_ = 0, bad_in_row_ = 0;
  bool stop_requested_ = false;
  bool agreed_stop_ = false;  // data parallel: some rank had a stop request at the last step
  MetricsLog metrics_;
};

// `nha train`'s device choice: "auto" = cuda:0 when a GPU is visible, else cpu.
Device resolve_device(const std::string& name);

}  // namespace nha
