// MQAR accuracy of a trained model (docs/nha.md §6; data/mqar.h has the example definition).
//
//   MqarOptions test = data::mqar_preset("test");   // (L, K) from (64, 4) up to (1024, 256)
//   std::vector<MqarSettingResult> r = evaluate_mqar(logits_fn(m), test, options);
//
// Each setting is scored at its own length L (no padding to the mixture's longest): the share of
// query positions where the model's greedy prediction (argmax of the logits) is the value paired
// with the queried key. The examples are the preset's own (same seed, same indices), so the test
// preset evaluated here and in training-time validation (data.val: test) are the same examples.
#pragma once
#include <cstdint>
#include <vector>

#include "data/mqar.h"
#include "eval/loglik.h"
#include "train/metrics.h"

namespace nha::eval {

struct MqarSettingResult {
  int64_t seq_len = 0, num_kv_pairs = 0;
  int64_t examples = 0;
  int64_t queries = 0;   // query positions scored (K per example)
  int64_t correct = 0;   // of those, predicted exactly
  double accuracy() const { return queries > 0 ? double(correct) / double(queries) : 0.0; }
};

// Scores the first `limit` examples (0: all) of every setting of `preset`, batching rows of one
// setting into forwards of at most options.batch_tokens tokens. The model needs vocab >= preset V.
std::vector<MqarSettingResult> evaluate_mqar(const LogitsFn& model, const data::MqarOptions& preset,
                                             const ScoreOptions& options, int64_t limit = 0);

}  // namespace nha::eval
