// Incremental generation with caches (docs/eval.md "Generation"): the sampling rules and the
// decode loop over LanguageModel::prefill / decode_step.
//
//   SamplingOptions o;  o.temperature = 0.8;  o.top_p = 0.95;  o.max_new_tokens = 100;
//   GenerationResult r = generate(model, {prompt_a, prompt_b}, o, stop_at_newline);
//   r.tokens[1]   the new tokens of prompt_b (the token that ended it included)
#pragma once
#include <cstdint>
#include <vector>

#include "eval/loglik.h"
#include "layers/transformer.h"

namespace nha::eval {

struct SamplingOptions {
  int64_t max_new_tokens = 64;
  // 0: greedy (the argmax, the first token on ties). > 0: sample from softmax(logits / temperature)
  // restricted by top_k and top_p.
  double temperature = 0.0;
  int64_t top_k = 0;    // keep only the k most likely tokens (0: all)
  double top_p = 1.0;   // nucleus, in (0, 1]: the most likely tokens until their mass reaches top_p
  // The draw of row r at new token i is Philox4x32(seed, counter (r << 32) + i) (core/random.h):
  // the same seed gives the same samples, whatever the device and the other rows.
  uint64_t seed = 0;
  int32_t eos_id = -1;  // a row ends after generating it (-1: none)
};

// Refuses impossible options (temperature < 0, top_p outside (0, 1], top_k < 0, ...) with the
// option's name and a hint.
void validate(const SamplingOptions& o);

// One token from one row of logits [V] under o (temperature > 0). The candidates are the top_k
// most likely tokens (ties: the lower id first), cut to the shortest prefix whose probability
// reaches top_p; u in [0, 1) picks from their renormalized distribution by inverse CDF, most
// likely first. top_k = 1 is therefore the greedy choice.
int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, double u);

struct GenerationResult {
  std::vector<std::vector<int32_t>> tokens;  // per prompt: the new tokens, the ending one included
  int64_t prompt_tokens = 0;                 // summed over the prompts
  int64_t new_tokens = 0;                    // summed over the rows (= sum of tokens[b].size())
  int64_t steps = 0;                         // decode_step calls (each one token for every row)
  double prefill_seconds = 0;                // prompts -> first new tokens
  double decode_seconds = 0;                 // the rest
};

// Generates from every prompt as one batch: LanguageModel::prefill (rows right-aligned), then one
// decode_step per new token. A row ends on o.eos_id, when stop(its new tokens) holds, or after
// o.max_new_tokens; the loop ends when every row has. The model runs under autocast to
// compute_dtype (bf16 on the GPU, as in evaluation; f32 is no autocast).
GenerationResult generate(const LanguageModel& model,
                          const std::vector<std::vector<int32_t>>& prompts,
                          const SamplingOptions& o, const StopFn& stop = {},
                          DType compute_dtype = DType::F32);

// The same results with a LanguageModel's caches: one prefill per prompt, then
// one decode_step per token, for batches of rows x (prompt + max_new_tokens) <= batch_tokens. The
// model runs under autocast to compute_dtype. Requests whose prompt plus new tokens exceed
// max_len (where generate_greedy starts cutting the prefix) go through generate_greedy.
std::vector<std::vector<int32_t>> generate_greedy_cached(
    const LanguageModel& model, DType compute_dtype, const std::vector<GenerateRequest>& requests,
    int64_t max_new_tokens, const StopFn& stop, const ScoreOptions& options);

}  // namespace nha::eval
