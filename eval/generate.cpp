#include "eval/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "autograd/autocast.h"
#include "autograd/node.h"
#include "core/random.h"
#include "eval/request_batching.h"

namespace nha::eval {

void validate(const SamplingOptions& o) {
  NHA_CHECK(o.max_new_tokens >= 0)
      << "max_new_tokens must be >= 0, got " << o.max_new_tokens;
  NHA_CHECK(std::isfinite(o.temperature) && o.temperature >= 0)
      << "temperature must be >= 0, got " << o.temperature
      << ". HINT: 0 = greedy; 0.7..1.0 samples, higher is more random";
  NHA_CHECK(o.top_p > 0 && o.top_p <= 1)
      << "top_p must be in (0, 1], got " << o.top_p
      << ". HINT: 1 = no nucleus cut; 0.9 keeps the most likely tokens holding 90% of the mass";
  NHA_CHECK(o.top_k >= 0) << "top_k must be >= 0, got " << o.top_k
                          << ". HINT: 0 = all tokens; 1 = greedy; 40 is a common choice";
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, double u) {
  // Candidates, most likely first (ties: the lower id first, as argmax).
  const int64_t k = o.top_k > 0 ? std::min(o.top_k, V) : V;
  std::vector<int32_t> ids(static_cast<size_t>(V));
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  // softmax(logits / temperature) over the k candidates, in double.
  std::vector<double> p(static_cast<size_t>(k));
  double total = 0;
  const double top = logits[ids[0]];
  for (int64_t i = 0; i < k; ++i) {
    p[size_t(i)] = std::exp((double(logits[ids[size_t(i)]]) - top) / o.temperature);
    total += p[size_t(i)];
  }
  // Nucleus: the shortest prefix whose probability reaches top_p (at least one token).
  int64_t n = k;
  if (o.top_p < 1) {
    double mass = 0;
    for (n = 0; n < k && mass < o.top_p * total;) mass += p[size_t(n++)];
    total = mass;
  }
  // Inverse CDF of the kept tokens.
  const double target = u * total;
  double cdf = 0;
  for (int64_t i = 0; i < n; ++i) {
    cdf += p[size_t(i)];
    if (target < cdf) return ids[size_t(i)];
  }
  return ids[size_t(n - 1)];  // u * total rounded up to the last boundary
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The next token of every row from logits [B, V]; `step` is the index of the new token.
std::vector<int32_t> choose_tokens(const Tensor& logits, const SamplingOptions& o, int64_t step) {
  const int64_t B = logits.size(0), V = logits.size(1);
  std::vector<int32_t> next(static_cast<size_t>(B));
  if (o.temperature == 0) {  // greedy: the argmax kernel, logits stay on the device
    const std::vector<int64_t> am = row_argmax(logits);
    for (int64_t b = 0; b < B; ++b) next[size_t(b)] = int32_t(am[size_t(b)]);
    return next;
  }
  const std::vector<float> host = logits.to(Device::cpu()).to(DType::F32).to_vector<float>();
  for (int64_t b = 0; b < B; ++b) {
    const double u = philox_uniform(o.seed, (uint64_t(b) << 32) + uint64_t(step), 0.0, 1.0);
    next[size_t(b)] = sample_token(host.data() + b * V, V, o, u);
  }
  return next;
}

}  // namespace

GenerationResult generate(const LanguageModel& model,
                          const std::vector<std::vector<int32_t>>& prompts,
                          const SamplingOptions& o, const StopFn& stop, DType compute_dtype) {
  validate(o);
  NHA_CHECK(!prompts.empty()) << "generate: no prompts";
  autograd::NoGradGuard no_grad;
  AutocastGuard autocast(compute_dtype);
  const int64_t B = int64_t(prompts.size());
  GenerationResult r;
  r.tokens.resize(prompts.size());
  size_t longest = 0;
  for (const auto& p : prompts) {
    r.prompt_tokens += int64_t(p.size());
    longest = std::max(longest, p.size());
  }
  if (o.max_new_tokens == 0) return r;

  const Clock::time_point t0 = Clock::now();
  DecodeState st = model.new_decode_state(B, int64_t(longest) + o.max_new_tokens);
  Tensor logits = model.prefill(prompts, st);  // [B, V]
  std::vector<bool> done(prompts.size(), false);
  Clock::time_point t_decode = t0;
  for (int64_t i = 0;; ++i) {
    const std::vector<int32_t> next = choose_tokens(logits, o, i);  // (waits for the device)
    if (i == 0) {
      r.prefill_seconds = seconds_since(t0);
      t_decode = Clock::now();
    }
    bool all_done = true;
    for (size_t b = 0; b < prompts.size(); ++b) {
      if (done[b]) continue;
      std::vector<int32_t>& g = r.tokens[b];
      g.push_back(next[b]);
      ++r.new_tokens;
      done[b] = next[b] == o.eos_id || int64_t(g.size()) == o.max_new_tokens || (stop && stop(g));
      all_done = all_done && done[b];
    }
    if (all_done) break;
    // Finished rows keep stepping with their last token (the batch moves together); their
    // outputs are ignored.
    logits = model.decode_step(Tensor::from_vector<int32_t>(next, {B, 1}), st);
    ++r.steps;
  }
  r.decode_seconds = seconds_since(t_decode);
  return r;
}

std::vector<std::vector<int32_t>> generate_greedy_cached(
    const LanguageModel& model, DType compute_dtype, const std::vector<GenerateRequest>& requests,
    int64_t max_new_tokens, const StopFn& stop, const ScoreOptions& options) {
  std::vector<std::vector<int32_t>> out(requests.size());
  // Rows that generate_greedy would cut (prompt + new tokens beyond max_len) keep its results.
  std::vector<size_t> cached, cut;
  std::vector<size_t> lengths;
  for (size_t i = 0; i < requests.size(); ++i) {
    NHA_CHECK(!requests[i].prompt.empty()) << "generation needs a non-empty prompt";
    const bool fits = int64_t(requests[i].prompt.size()) + max_new_tokens - 1 <= options.max_len;
    (fits ? cached : cut).push_back(i);
    if (fits) lengths.push_back(requests[i].prompt.size());
  }
  if (!cut.empty()) {
    const LogitsFn forward = [&](const Tensor& ids) {
      AutocastGuard autocast(compute_dtype);
      return model.forward(ids);
    };
    std::vector<GenerateRequest> long_requests;
    for (size_t i : cut) long_requests.push_back(requests[i]);
    const auto generated = generate_greedy(forward, long_requests, max_new_tokens, stop, options);
    for (size_t j = 0; j < cut.size(); ++j) out[cut[j]] = generated[j];
  }
  const std::vector<size_t> order = longest_first(lengths);  // indices into `cached`
  SamplingOptions greedy;
  greedy.max_new_tokens = max_new_tokens;
  Progress progress(options.label, int64_t(order.size()));
  for (size_t start = 0; start < order.size();) {
    const int64_t L0 = int64_t(lengths[order[start]]) + max_new_tokens;
    const size_t n = std::clamp<size_t>(size_t(options.batch_tokens / L0), 1, order.size() - start);
    std::vector<std::vector<int32_t>> prompts;
    for (size_t b = 0; b < n; ++b) prompts.push_back(requests[cached[order[start + b]]].prompt);
    const GenerationResult r = generate(model, prompts, greedy, stop, compute_dtype);
    for (size_t b = 0; b < n; ++b) out[cached[order[start + b]]] = r.tokens[b];
    start += n;
    progress.update(int64_t(start), r.new_tokens);
  }
  return out;
}

}  // namespace nha::eval
