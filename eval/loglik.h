// Log-likelihood scoring and greedy generation: the two primitives every evaluation task is built
// from (the lm-evaluation-harness `loglikelihood` and `generate_until` requests).
//
// The model is any causal LM given as a function ids [B, T] -> logits [B, T, V] (LanguageModel,
// a checkpoint on the GPU under bf16 autocast, or a hand-made table in tests). Requests are sorted
// by length and packed into batches of at most `batch_tokens` tokens, so one forward scores many
// requests; padding goes at the end of a row, where a causal model cannot see it.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace nha::eval {

// ids [B, T] (i32, on the scoring device) -> logits [B, T, V] (any floating dtype, same device).
using LogitsFn = std::function<Tensor(const Tensor& ids)>;

struct LoglikRequest {
  std::vector<int32_t> context;       // may be empty only if continuation has >= 2 tokens
  std::vector<int32_t> continuation;  // scored tokens, at least one
};

struct LoglikResult {
  double logprob = 0;   // sum over continuation tokens of log p(token | everything before)
  bool greedy = false;  // every continuation token is the argmax of its prediction
  int64_t tokens = 0;   // continuation tokens scored
};

struct ScoreOptions {
  Device device = Device::cpu();
  int64_t batch_tokens = 8192;  // rows x padded length per forward
  int64_t max_len = 2048;       // model context: longer inputs keep their last max_len tokens
  std::string label;            // progress lines "label: 1200/4000 requests ..." when not empty
};

// Scores every request; results are in request order. Inputs longer than max_len keep their last
// max_len tokens: the context is cut from the left; a continuation longer than max_len has only
// its last max_len tokens scored (LoglikResult::tokens says how many).
std::vector<LoglikResult> score_loglik(const LogitsFn& model,
                                       const std::vector<LoglikRequest>& requests,
                                       const ScoreOptions& options);

struct GenerateRequest {
  std::vector<int32_t> prompt;
};

// A row of a generation stops once stop(its new tokens so far) is true (e.g. "the decoded text
// contains a newline").
using StopFn = std::function<bool(const std::vector<int32_t>& generated)>;

// Greedy decoding of up to max_new_tokens per prompt, batched; a row stops early once stop is
// true. Returns only the new tokens (the stopping one included). Recomputes the forward over the
// whole prefix each step (cut to its last max_len tokens): simple, exact for every mixer, and the
// reference for generate_greedy_cached.
std::vector<std::vector<int32_t>> generate_greedy(const LogitsFn& model,
                                                  const std::vector<GenerateRequest>& requests,
                                                  int64_t max_new_tokens, const StopFn& stop,
                                                  const ScoreOptions& options);

// How a task generates: generate_greedy over a LogitsFn, or generate_greedy_cached
// (eval/generate.h) bound to a model (eval/runner.cpp).
using GenerateFn = std::function<std::vector<std::vector<int32_t>>(
    const std::vector<GenerateRequest>& requests, int64_t max_new_tokens, const StopFn& stop,
    const ScoreOptions& options)>;

// argmax over the last dim of rows [N, V] (the backend's kernel: the first maximum on ties),
// copied to the host.
std::vector<int64_t> row_argmax(const Tensor& rows);

}  // namespace nha::eval
