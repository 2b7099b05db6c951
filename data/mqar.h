// MQAR: multi-query associative recall (Arora, Eyuboglu et al., "Zoology", 2023), the synthetic
// recall probe of docs/nha.md §6. Follows zoology/data/multiquery_ar.py exactly in distribution:
//
//   vocabulary V: keys from [1, V/2), values from [V/2, V); an example of length L with K pairs:
//   positions 0 .. 2K-1        k1 v1 k2 v2 ... kK vK          (K distinct keys, K distinct values)
//   positions 2K .. L-1        the query region, (L - 2K)/2 slots of two tokens; pair i is queried
//                              at slot gap_i (position 2K + 2*gap_i holds k_i); the K distinct
//                              slots are drawn without replacement with P(gap = g) ∝ (g+1)^(a-1),
//                              a = 0.01 (a power law: most queries come soon after the context)
//   every other query-region position: a uniform random token from [0, V) ("random_non_queries")
//   targets: v_i at position 2K + 2*gap_i (the model must produce the value right after seeing the
//   key again); kIgnoreIndex (-100) everywhere else, so the loss and accuracy count queries only.
//
// Example generation is a pure function of (seed, setting, example index) through Philox, so a
// dataset of N examples needs no storage and batches are deterministic, rank-split and resumable
// like the token loader's. Mixtures of settings (the standard train/test sets) pad shorter examples
// on the right to the longest L (inputs 0, targets -100).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/loader.h"

namespace nha::data {

struct MqarSetting {
  int64_t seq_len = 64;        // L (even)
  int64_t num_kv_pairs = 4;    // K (4K <= L)
  int64_t num_examples = 1000;
};

struct MqarOptions {
  std::string name = "custom";
  int64_t vocab_size = 8192;   // V (> L)
  double power_a = 0.01;
  bool random_non_queries = true;
  uint64_t seed = 0;
  std::vector<MqarSetting> settings;
};

// Named settings (V = 8192):
//   "train"          (L, K, N) = (64, 4, 100k), (128, 8, 20k), (256, 16, 20k)     [docs/nha.md §6], seed 0
//   "zoology-train"  the above + (256, 32, 20k), (256, 64, 20k)   [Zoology's standard sweep], seed 0
//   "test"           (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256),
//                    1000 examples each, seed 1000 (different examples from train)
//   "L<L>-K<K>[-N<N>][-V<V>]" one setting, e.g. "L256-K16-N20000" (N default 1000), seed 0;
//                    -V<V> changes the vocabulary (Zoology's sweeps vary it; a small one makes
//                    CPU-sized experiments, e.g. "L64-K4-N20000-V256")
MqarOptions mqar_preset(const std::string& name);
std::vector<std::string> mqar_preset_names();

// Writes example `index` of settings[setting] into inputs[0, L), targets[0, L).
void mqar_example(const MqarOptions& options, size_t setting, int64_t index, int32_t* inputs,
                  int32_t* targets);

class MqarDataset : public BatchSource {
 public:
  // shuffle: training order (a fresh seeded permutation of all examples per epoch); otherwise
  // examples in order (settings one after another).
  MqarDataset(MqarOptions options, int64_t global_batch, int world_size = 1, int rank = 0,
              bool shuffle = true);

  Batch next() override;
  LoaderState state() const override;
  void restore(const LoaderState& state) override;
  int64_t seq_len() const override { return max_len_; }
  int64_t local_batch() const override { return local_batch_; }

  int64_t size() const { return total_; }  // examples over all settings
  const MqarOptions& options() const { return options_; }
  // Which setting example g (unshuffled, in [0, size())) belongs to.
  size_t setting_of(int64_t g) const;
  // Unshuffled examples [first, first + count) as one batch [count, max L] (evaluation).
  Batch examples(int64_t first, int64_t count) const;
  Batch make_batch(int64_t step, int64_t first_example) const;

 private:
  void fill(int64_t g, int64_t row, Batch& b) const;
  std::string data_id() const;

  MqarOptions options_;
  int64_t global_batch_, local_batch_;
  int world_size_, rank_;
  bool shuffle_;
  std::vector<int64_t> cumulative_;  // (settings + 1,)
  int64_t total_ = 0, max_len_ = 0;
  int64_t step_ = 0, next_example_ = 0;
};

}  // namespace nha::data
