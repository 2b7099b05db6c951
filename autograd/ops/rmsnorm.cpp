// rmsnorm: forward and backward through Backend::rmsnorm_forward/backward.
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"
#include "train/autocast.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::record;

namespace {

// out = x * rstd * w (rows of the last dim);  dx, dw from the saved x, w, rstd (kernels/backend.h)
struct RmsNormBackward final : Node {
  SavedTensor x, w, rstd;  // [..., C], [C], [N]
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor xv = x.unpack(), wv = w.unpack(), rv = rstd.unpack(), dout = g[0].contiguous();
    Tensor dx = ops_detail::empty_like(xv), dw = ops_detail::empty_like(wv);
    backend_for(dout).rmsnorm_backward(dx, dw, dout, xv, wv, rv);
    return {needs_grad(0) ? dx : Tensor(), needs_grad(1) ? dw : Tensor()};
  }
  std::string name() const override { return "RmsNormBackward"; }
  void release_saved() override { x.reset(); w.reset(); rstd.reset(); }
};

}  // namespace

Tensor rmsnorm(const Tensor& x_in, const Tensor& weight_in, double eps) {
  // Mixed precision (train/autocast.h): x and the gain in the autocast dtype (the kernels compute
  // in fp32 and keep rstd in fp32); the gain's gradient returns to fp32 through the cast.
  const Tensor x = autocast(x_in), weight = autocast(weight_in);
  ops_detail::check_same_device({x, weight}, "rmsnorm");
  NHA_CHECK(x.dim() >= 1 && x.size(-1) > 0 && weight.dim() == 1 && weight.size(0) == x.size(-1))
      << "rmsnorm: weight " << weight.str() << " does not match the last dim of x " << x.str();
  check_dtype(weight, x.dtype(), "rmsnorm weight");
  Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t rows = x.numel() / x.size(-1);
  Tensor out = ops_detail::empty_like(xc);                                       // [..., C]
  Tensor rstd = Tensor::empty({rows}, ops_detail::stats_dtype(x), x.device());  // [N]
  backend_for(xc).rmsnorm_forward(out, rstd, xc, wc, eps);
  if (autograd::any_requires_grad({x, weight})) {
    auto node = std::make_shared<RmsNormBackward>();
    node->x = SavedTensor(xc, "rmsnorm.x");
    node->w = SavedTensor(wc, "rmsnorm.weight");
    node->rstd = SavedTensor(rstd, "rmsnorm.rstd");
    record(node, {x, weight}, out);
  }
  return out;
}

}  // namespace nha
