// rmsnorm and add_rmsnorm (the residual add fused with it): forward and backward through
// Backend::rmsnorm_forward/backward and add_rmsnorm_forward/backward.
#include "autograd/autocast.h"
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

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

// {h, out} = {x + delta, h * rstd * w};  dx = ddelta = dh + the norm's backward, dw from the
// saved h, w, rstd (kernels/backend.h). The engine hands zeros for an output without gradient.
struct AddRmsNormBackward final : Node {
  SavedTensor h, w, rstd;  // [..., C], [C], [N]
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor hv = h.unpack(), wv = w.unpack(), rv = rstd.unpack();
    Tensor dh = g[0].contiguous(), dout = g[1].contiguous();
    Tensor dx = ops_detail::empty_like(hv), dw = ops_detail::empty_like(wv);
    backend_for(dout).add_rmsnorm_backward(dx, dw, dout, dh, hv, wv, rv);
    // x and delta get the same gradient: one tensor, handed out twice (the engine never writes
    // into a gradient it was given).
    return {needs_grad(0) ? dx : Tensor(), needs_grad(1) ? dx : Tensor(),
            needs_grad(2) ? dw : Tensor()};
  }
  std::string name() const override { return "AddRmsNormBackward"; }
  void release_saved() override { h.reset(); w.reset(); rstd.reset(); }
};

// Shared input checks of rmsnorm and add_rmsnorm (x and weight already autocast).
void check_rmsnorm_inputs(const Tensor& x, const Tensor& weight, const char* op) {
  NHA_CHECK(x.dim() >= 1 && x.size(-1) > 0 && weight.dim() == 1 && weight.size(0) == x.size(-1))
      << op << ": weight " << weight.str() << " does not match the last dim of x " << x.str();
  check_dtype(weight, x.dtype(), "rmsnorm weight");
}

}  // namespace

Tensor rmsnorm(const Tensor& x_in, const Tensor& weight_in, double eps) {
  // Mixed precision (autograd/autocast.h): x and the gain in the autocast dtype (the kernels compute
  // in fp32 and keep rstd in fp32); the gain's gradient returns to fp32 through the cast.
  const Tensor x = autocast(x_in), weight = autocast(weight_in);
  ops_detail::check_same_device({x, weight}, "rmsnorm");
  check_rmsnorm_inputs(x, weight, "rmsnorm");
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

std::pair<Tensor, Tensor> add_rmsnorm(const Tensor& x_in, const Tensor& delta_in,
                                      const Tensor& weight_in, double eps) {
  // Mixed precision as in rmsnorm(): the residual stream and the gain in the autocast dtype.
  const Tensor x = autocast(x_in), delta = autocast(delta_in), weight = autocast(weight_in);
  ops_detail::check_same_device({x, delta, weight}, "add_rmsnorm");
  check_rmsnorm_inputs(x, weight, "add_rmsnorm");
  NHA_CHECK(delta.shape() == x.shape() && delta.dtype() == x.dtype())
      << "add_rmsnorm: delta " << delta.str() << " must be like x " << x.str();
  Tensor xc = x.contiguous(), dc = delta.contiguous(), wc = weight.contiguous();
  const int64_t rows = x.numel() / x.size(-1);
  Tensor h = ops_detail::empty_like(xc);                                        // [..., C]
  Tensor out = ops_detail::empty_like(xc);                                      // [..., C]
  Tensor rstd = Tensor::empty({rows}, ops_detail::stats_dtype(x), x.device());  // [N]
  backend_for(xc).add_rmsnorm_forward(h, out, rstd, xc, dc, wc, eps);
  if (autograd::any_requires_grad({x, delta, weight})) {
    auto node = std::make_shared<AddRmsNormBackward>();
    // A detached alias of the output h: saving h itself would make node -> h -> node a cycle.
    node->h = SavedTensor(h.detach(), "add_rmsnorm.h");
    node->w = SavedTensor(wc, "add_rmsnorm.weight");
    node->rstd = SavedTensor(rstd, "add_rmsnorm.rstd");
    std::vector<Tensor> outs{h, out};
    autograd::attach(node, {x, delta, weight}, outs);
  }
  return {h, out};
}

}  // namespace nha
