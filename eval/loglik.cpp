#include "eval/loglik.h"

#include <algorithm>
#include <cstdio>

#include "autograd/node.h"
#include "autograd/ops.h"
#include "data/loader.h"
#include "eval/request_batching.h"
#include "kernels/backend.h"

namespace nha::eval {

namespace {

// One request laid out as model input: ids[i] predicts targets[i]; the last `scored` targets are
// the continuation.
struct Row {
  std::vector<int32_t> ids, targets;
  int64_t scored = 0;
};

Row make_row(const LoglikRequest& r, int64_t max_len) {
  NHA_CHECK(!r.continuation.empty()) << "loglikelihood request with an empty continuation";
  std::vector<int32_t> seq = r.context;
  seq.insert(seq.end(), r.continuation.begin(), r.continuation.end());
  NHA_CHECK(seq.size() >= 2) << "loglikelihood request needs at least 2 tokens (context + "
                                "continuation); got 1. HINT: give the continuation a context";
  const int64_t n = int64_t(seq.size()) - 1, cut = std::max<int64_t>(0, n - max_len);
  Row row;
  row.ids.assign(seq.begin() + cut, seq.end() - 1);
  row.targets.assign(seq.begin() + cut + 1, seq.end());
  // Only continuation tokens inside the window are scored: all of them unless the continuation
  // alone is longer than max_len (lm-evaluation-harness does the same), or the context is empty
  // (the first token has nothing to be predicted from).
  row.scored = std::min<int64_t>(int64_t(r.continuation.size()), int64_t(row.targets.size()));
  return row;
}

// Right-padded ids [B, L] (pad 0) on `device` from rows of token ids.
Tensor pack_ids(const std::vector<const std::vector<int32_t>*>& rows, int64_t L, Device device) {
  std::vector<int32_t> flat(rows.size() * size_t(L), 0);
  for (size_t b = 0; b < rows.size(); ++b)
    std::copy(rows[b]->begin(), rows[b]->end(), flat.begin() + b * size_t(L));
  return Tensor::from_vector<int32_t>(flat, {int64_t(rows.size()), L}).to(device);
}

// The model's logits as [N, V] contiguous rows.
Tensor logits_rows(const LogitsFn& model, const Tensor& ids) {
  Tensor logits = model(ids);  // [B, L, V]
  NHA_CHECK(logits.dim() == 3 && logits.size(0) == ids.size(0) && logits.size(1) == ids.size(1))
      << "the model returned logits " << logits.str() << " for ids " << ids.str()
      << "; expected [B, T, V]";
  return logits.reshape({-1, logits.size(2)}).contiguous();
}

}  // namespace

std::vector<int64_t> row_argmax(const Tensor& rows) {
  Tensor c = argmax(rows).to(Device::cpu());
  return std::vector<int64_t>(c.data<int64_t>(), c.data<int64_t>() + c.numel());
}

std::vector<LoglikResult> score_loglik(const LogitsFn& model,
                                       const std::vector<LoglikRequest>& requests,
                                       const ScoreOptions& options) {
  autograd::NoGradGuard no_grad;
  std::vector<Row> rows;
  std::vector<size_t> lengths;
  rows.reserve(requests.size());
  for (const auto& r : requests) {
    rows.push_back(make_row(r, options.max_len));
    lengths.push_back(rows.back().ids.size());
  }
  const std::vector<size_t> order = longest_first(lengths);
  std::vector<LoglikResult> results(requests.size());
  Progress progress(options.label, int64_t(requests.size()));
  for (size_t start = 0; start < order.size();) {
    const int64_t L = int64_t(lengths[order[start]]);
    const size_t n = std::clamp<size_t>(size_t(options.batch_tokens / L), 1, order.size() - start);
    std::vector<const std::vector<int32_t>*> batch_ids;
    std::vector<int64_t> targets(n * size_t(L), data::kIgnoreIndex);  // [B * L]
    for (size_t b = 0; b < n; ++b) {
      const Row& row = rows[order[start + b]];
      batch_ids.push_back(&row.ids);
      const size_t len = row.ids.size(), first = len - size_t(row.scored);
      for (size_t i = first; i < len; ++i) targets[b * size_t(L) + i] = row.targets[i];
    }
    Tensor logits = logits_rows(model, pack_ids(batch_ids, L, options.device));  // [B*L, V]
    Tensor target_t = Tensor::from_vector<int64_t>(targets, {int64_t(targets.size())});
    // -log p(target) per row through the cross-entropy kernel (0 on ignored rows).
    Tensor losses = Tensor::empty({logits.size(0)},
                                  logits.dtype() == DType::F64 ? DType::F64 : DType::F32,
                                  logits.device());
    backend_for(logits).cross_entropy_forward(losses, logits, target_t.to(logits.device()),
                                              data::kIgnoreIndex);
    Tensor nll = losses.to(Device::cpu()).to(DType::F64);
    const std::vector<int64_t> argmax = row_argmax(logits);
    int64_t tokens = 0;
    for (size_t b = 0; b < n; ++b) {
      const size_t idx = order[start + b];
      const Row& row = rows[idx];
      LoglikResult& res = results[idx];
      res.greedy = true;
      res.tokens = row.scored;
      const size_t len = row.ids.size();
      for (size_t i = len - size_t(row.scored); i < len; ++i) {
        const size_t k = b * size_t(L) + i;
        res.logprob -= nll.data<double>()[k];
        res.greedy = res.greedy && argmax[k] == targets[k];
      }
      tokens += int64_t(len);
    }
    start += n;
    progress.update(int64_t(start), tokens);
  }
  return results;
}

std::vector<std::vector<int32_t>> generate_greedy(const LogitsFn& model,
                                                  const std::vector<GenerateRequest>& requests,
                                                  int64_t max_new_tokens, const StopFn& stop,
                                                  const ScoreOptions& options) {
  autograd::NoGradGuard no_grad;
  std::vector<std::vector<int32_t>> out(requests.size());
  std::vector<size_t> lengths;
  for (const auto& r : requests) {
    NHA_CHECK(!r.prompt.empty()) << "generation needs a non-empty prompt";
    lengths.push_back(r.prompt.size());
  }
  const std::vector<size_t> order = longest_first(lengths);
  Progress progress(options.label, int64_t(requests.size()));
  for (size_t start = 0; start < order.size();) {
    const int64_t L0 = std::min<int64_t>(int64_t(lengths[order[start]]) + max_new_tokens,
                                         options.max_len);
    const size_t n = std::clamp<size_t>(size_t(options.batch_tokens / L0), 1, order.size() - start);
    // Each row's current prefix (prompt + generated, cut to the last max_len tokens).
    std::vector<std::vector<int32_t>> prefix(n);
    std::vector<bool> done(n, false);
    for (size_t b = 0; b < n; ++b) prefix[b] = requests[order[start + b]].prompt;
    for (int64_t step = 0; step < max_new_tokens; ++step) {
      std::vector<const std::vector<int32_t>*> live;
      std::vector<size_t> live_rows;
      int64_t L = 0;
      for (size_t b = 0; b < n; ++b) {
        if (done[b]) continue;
        if (int64_t(prefix[b].size()) > options.max_len)
          prefix[b].erase(prefix[b].begin(), prefix[b].end() - options.max_len);
        live.push_back(&prefix[b]);
        live_rows.push_back(b);
        L = std::max<int64_t>(L, int64_t(prefix[b].size()));
      }
      if (live.empty()) break;
      const std::vector<int64_t> argmax =
          row_argmax(logits_rows(model, pack_ids(live, L, options.device)));
      for (size_t i = 0; i < live.size(); ++i) {
        const size_t b = live_rows[i];
        const int32_t next = int32_t(argmax[i * size_t(L) + prefix[b].size() - 1]);
        std::vector<int32_t>& generated = out[order[start + b]];
        generated.push_back(next);
        prefix[b].push_back(next);
        done[b] = stop && stop(generated);
      }
    }
    int64_t generated_tokens = 0;
    for (size_t b = 0; b < n; ++b) generated_tokens += int64_t(out[order[start + b]].size());
    start += n;
    progress.update(int64_t(start), generated_tokens);
  }
  return out;
}

}  // namespace nha::eval
