// softmax over the last dim: forward and backward through Backend::softmax_forward/backward.
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::empty_like;
using ops_detail::record;

namespace {

// y = softmax(x);  dx = y (dout - sum_c dout y)
struct SoftmaxBackward final : Node {
  SavedTensor out;  // the forward output, detached (saving it with its grad_fn would be a cycle)
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor y = out.unpack(), dout = g[0].contiguous();
    Tensor dx = empty_like(y);
    backend_for(dout).softmax_backward(dx, dout, y);
    return {dx};
  }
  std::string name() const override { return "SoftmaxBackward"; }
  void release_saved() override { out.reset(); }
};

}  // namespace

Tensor softmax(const Tensor& x) {
  NHA_CHECK(x.dim() >= 1 && x.numel() > 0) << "softmax of " << x.str();
  Tensor xc = x.contiguous();
  Tensor out = empty_like(xc);  // [..., C]
  backend_for(xc).softmax_forward(out, xc);
  if (autograd::any_requires_grad({x})) {
    auto node = std::make_shared<SoftmaxBackward>();
    node->out = SavedTensor(out.detach(), "softmax.out");
    record(node, {x}, out);
  }
  return out;
}

}  // namespace nha
