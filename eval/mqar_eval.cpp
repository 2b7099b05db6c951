#include "eval/mqar_eval.h"

#include <algorithm>

#include "autograd/node.h"

namespace nha::eval {

std::vector<MqarSettingResult> evaluate_mqar(const LogitsFn& model, const data::MqarOptions& preset,
                                             const ScoreOptions& options, int64_t limit) {
  autograd::NoGradGuard no_grad;
  std::vector<MqarSettingResult> results;
  for (size_t s = 0; s < preset.settings.size(); ++s) {
    const data::MqarSetting& setting = preset.settings[s];
    const int64_t L = setting.seq_len;
    const int64_t n = limit > 0 ? std::min(limit, setting.num_examples) : setting.num_examples;
    const int64_t rows_per_batch = std::max<int64_t>(1, options.batch_tokens / L);
    MqarSettingResult r;
    r.seq_len = L;
    r.num_kv_pairs = setting.num_kv_pairs;
    r.examples = n;
    for (int64_t first = 0; first < n; first += rows_per_batch) {
      const int64_t B = std::min(rows_per_batch, n - first);
      Tensor inputs = Tensor::empty({B, L}, DType::I32, Device::cpu());   // [B, L]
      Tensor targets = Tensor::empty({B, L}, DType::I32, Device::cpu());  // [B, L]
      for (int64_t b = 0; b < B; ++b)
        data::mqar_example(preset, s, first + b, inputs.data<int32_t>() + b * L,
                           targets.data<int32_t>() + b * L);
      Tensor logits = model(inputs.to(options.device));  // [B, L, V]
      NHA_CHECK(logits.size(2) >= preset.vocab_size)
          << "MQAR needs a vocabulary of at least " << preset.vocab_size << " tokens but the model has "
          << logits.size(2) << ". HINT: evaluate a model trained on MQAR (data.type: mqar)";
      const PredictionCount c = count_correct_predictions(logits, targets);
      r.queries += c.queries;
      r.correct += c.correct;
    }
    results.push_back(r);
  }
  return results;
}

}  // namespace nha::eval
