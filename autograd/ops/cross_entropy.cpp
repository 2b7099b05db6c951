// cross_entropy: per-row losses (Backend::cross_entropy_forward/backward) averaged over the rows
// whose target is not ignored, with the existing sum and scale ops.
#include <algorithm>

#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::record;

namespace {

// losses[n] = logsumexp(logits[n]) - logits[n, t_n];  dlogits[n] = dlosses[n] (softmax - onehot)
struct CrossEntropyBackward final : Node {
  SavedTensor logits, targets;  // [N, V], [N]
  int64_t ignore_index;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor lv = logits.unpack(), tv = targets.unpack(), dlosses = g[0].contiguous();  // [N]
    Tensor dlogits = ops_detail::empty_like(lv);
    backend_for(lv).cross_entropy_backward(dlogits, lv, tv, dlosses, ignore_index);
    return {dlogits};
  }
  std::string name() const override { return "CrossEntropyBackward"; }
  void release_saved() override { logits.reset(); targets.reset(); }
};

// Per-row losses [N], 0 on ignored rows; differentiable w.r.t. logits.
Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  Tensor lc = logits.contiguous(), tc = targets.contiguous();
  Tensor losses = Tensor::empty({logits.size(0)}, ops_detail::stats_dtype(logits), logits.device());
  backend_for(lc).cross_entropy_forward(losses, lc, tc, ignore_index);
  if (autograd::any_requires_grad({logits})) {
    auto node = std::make_shared<CrossEntropyBackward>();
    node->logits = SavedTensor(lc, "cross_entropy.logits");
    node->targets = SavedTensor(tc, "cross_entropy.targets");
    node->ignore_index = ignore_index;
    record(node, {logits}, losses);
  }
  return losses;
}

}  // namespace

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                     int64_t valid_count) {
  ops_detail::check_same_device({logits, targets}, "cross_entropy");
  NHA_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0))
      << "cross_entropy wants logits [N, V] and targets [N], got " << logits.str() << " and "
      << targets.str() << ". HINT: flatten [B, T, V] logits with reshape({-1, V})";
  Tensor losses = cross_entropy_rows(logits, targets, ignore_index);  // [N]
  NHA_CHECK(valid_count >= -1 && valid_count <= targets.size(0))
      << "cross_entropy: valid_count " << valid_count << " for " << targets.size(0) << " targets";
  int64_t n_valid = valid_count;
  if (n_valid < 0) {
    n_valid = 0;
    for (int64_t t : targets.to_vector<int64_t>()) n_valid += t != ignore_index;  // on the host
  }
  // Every row ignored: the sum is 0 and so is its gradient; divide by 1 to keep it finite.
  return scale(sum(losses), 1.0 / double(std::max<int64_t>(n_valid, 1)));
}

}  // namespace nha
