// Loaders: token shards -> batches of (inputs, targets) for training and validation.
//
// Training: every global step draws `global_batch` windows of T+1 tokens; window j of step s is a
// pure function of (seed, s * global_batch + j), so the batch is deterministic, resumable from one
// integer, and independent of the number of ranks: rank r of W takes windows
// [r * B/W, (r+1) * B/W) of every global batch. Three ways to place windows (SampleMode):
//   random       uniform start anywhere a whole window fits in a shard (with replacement)
//   doc_aligned  uniform over document starts (position 0 of a shard or right after an EOS)
//   epoch        the non-overlapping windows [k*T, k*T+T+1) of every shard in a seeded random
//                order, a fresh order each epoch: every token is a target once per epoch
// A background thread prepares the next `prefetch` batches so the training step never waits.
// Validation: ValLoader walks the val split's non-overlapping windows in order (rank r takes every
// W-th), for a loss that is exactly comparable between runs.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <thread>
#include <vector>

#include "core/tensor.h"
#include "data/shards.h"

namespace nha::data {

class Tokenizer;

// Targets equal to this are ignored by the loss (PyTorch's convention; MQAR uses it).
inline constexpr int32_t kIgnoreIndex = -100;

struct Batch {
  Tensor inputs;       // i32 [B, T] on the CPU; .to(device) before the model
  Tensor targets;      // i32 [B, T]: targets[b, t] = the token after inputs[b, t], or kIgnoreIndex
  int64_t step = -1;   // training step this batch belongs to (-1: validation)
};

// The shards of one split, opened (memory-mapped) together. They must agree on tokenizer and
// vocabulary: mixing shards of two tokenizers is refused.
class ShardSet {
 public:
  static std::shared_ptr<const ShardSet> open(const std::string& dir, const std::string& split);
  static std::shared_ptr<const ShardSet> open_files(const std::vector<std::string>& paths);

  const std::vector<std::unique_ptr<TokenShard>>& shards() const { return shards_; }
  int64_t vocab_size() const { return vocab_size_; }
  int32_t eos_id() const { return eos_id_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_documents() const { return num_documents_; }
  const std::string& tokenizer_hash() const { return tokenizer_hash_; }
  const std::string& description() const { return description_; }  // for messages

  // The shards were written with exactly this tokenizer (hash and vocabulary size).
  void check_tokenizer(const Tokenizer& tokenizer) const;
  // Every token id fits a model with this many embedding rows.
  void check_model_vocab(int64_t model_vocab_size) const;

 private:
  std::vector<std::unique_ptr<TokenShard>> shards_;
  int64_t vocab_size_ = 0;
  int32_t eos_id_ = -1;
  int64_t num_tokens_ = 0;
  int64_t num_documents_ = 0;
  std::string tokenizer_hash_;
  std::string description_;
};

enum class SampleMode { Random, DocAligned, Epoch };
SampleMode sample_mode_from_name(const std::string& name);
const char* sample_mode_name(SampleMode mode);

// Where a window of T+1 tokens starts.
struct WindowRef {
  int32_t shard = 0;
  int64_t start = 0;
};

// Maps a global window index to a window, statelessly (see the top of this file).
class WindowSampler {
 public:
  WindowSampler(std::shared_ptr<const ShardSet> shards, int64_t seq_len, SampleMode mode,
                uint64_t seed);
  WindowRef window(int64_t index) const;
  int64_t candidates() const { return total_; }  // possible starts (epoch: windows per epoch)

 private:
  std::shared_ptr<const ShardSet> shards_;
  int64_t seq_len_ = 0;
  SampleMode mode_;
  uint64_t seed_ = 0;
  std::vector<int64_t> cumulative_;  // (num_shards + 1,) candidates before each shard
  std::vector<int64_t> doc_count_;   // doc_aligned: usable document starts per shard
  int64_t total_ = 0;
};

// A bijection of [0, n) keyed by `key` (4-round Feistel network with cycle walking): a shuffled
// order without storing a permutation. Used by the epoch mode and MQAR.
uint64_t permute_index(uint64_t index, uint64_t n, uint64_t key);

// Everything needed to continue a stream exactly where it stopped (saved in checkpoints).
struct LoaderState {
  std::string kind;        // "tokens" or "mqar"
  std::string mode;        // sample mode / preset name
  uint64_t seed = 0;
  int64_t step = 0;        // next step to be returned
  int64_t next_window = 0; // next global window (example) index; = step * global_batch while the
                           // batch size has not changed
  int64_t seq_len = 0;
  int64_t global_batch = 0;
  std::string data_id;     // identifies the data (tokenizer hash + token count / MQAR settings)

  nlohmann::json to_json() const;
  static LoaderState from_json(const nlohmann::json& j);
};

// What the trainer consumes: the token loader and the MQAR dataset both are one.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual Batch next() = 0;                  // this rank's part of the next global batch
  virtual LoaderState state() const = 0;     // the state *after* the batches returned so far
  virtual void restore(const LoaderState& state) = 0;
  virtual int64_t seq_len() const = 0;
  virtual int64_t local_batch() const = 0;   // rows of this rank's batches
};

struct LoaderOptions {
  int64_t seq_len = 1024;      // T
  int64_t global_batch = 8;    // windows per step over all ranks
  int world_size = 1;
  int rank = 0;
  uint64_t seed = 0;
  SampleMode mode = SampleMode::Random;
  int prefetch = 4;            // batches prepared ahead on a background thread; 0 = none
};

class TrainLoader : public BatchSource {
 public:
  TrainLoader(std::shared_ptr<const ShardSet> shards, LoaderOptions options);
  ~TrainLoader() override;

  Batch next() override;
  LoaderState state() const override;
  void restore(const LoaderState& state) override;
  int64_t seq_len() const override { return options_.seq_len; }
  int64_t local_batch() const override { return local_batch_; }

  // The batch this rank gets for the global batch whose first window is `first_window` (no
  // prefetch, no state change): tests and debugging.
  Batch make_batch(int64_t step, int64_t first_window) const;
  const WindowSampler& sampler() const { return sampler_; }

 private:
  void start_worker();
  void stop_worker();
  void worker_loop();
  std::string data_id() const;

  std::shared_ptr<const ShardSet> shards_;
  LoaderOptions options_;
  int64_t local_batch_ = 0;
  WindowSampler sampler_;

  // Consumer position (what next() returns next).
  int64_t step_ = 0;
  int64_t next_window_ = 0;

  // Prefetch: the worker produces batches for steps [step_, ...) into queue_.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Batch> queue_;
  int64_t produce_step_ = 0;
  int64_t produce_window_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  std::thread worker_;
};

// Sequential, non-overlapping validation windows (stride T, so every token but the first of each
// shard is a target exactly once), split round-robin over ranks. The last batch may be short.
class ValLoader {
 public:
  // max_windows > 0 evaluates only the first max_windows windows (the same ones on any world size).
  ValLoader(std::shared_ptr<const ShardSet> shards, int64_t seq_len, int64_t batch,
            int world_size = 1, int rank = 0, int64_t max_windows = 0);
  bool next(Batch& batch);  // false when this rank's windows are done
  void reset() { cursor_ = 0; }
  int64_t num_windows() const { return total_; }       // over all ranks
  int64_t rank_windows() const { return int64_t(mine_.size()); }

 private:
  std::shared_ptr<const ShardSet> shards_;
  int64_t seq_len_, batch_;
  int64_t total_ = 0;
  std::vector<WindowRef> mine_;  // this rank's windows, in order
  size_t cursor_ = 0;
};

// Fills row b of (inputs, targets) [B, T] from the T+1 tokens at `w`.
void fill_row(const ShardSet& shards, const WindowRef& w, int64_t seq_len, int64_t row,
              Tensor& inputs, Tensor& targets);

}  // namespace nha::data
