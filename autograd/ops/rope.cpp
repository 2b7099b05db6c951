// rope: forward and backward through Backend::rope (the backward is the inverse rotation).
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using ops_detail::record;

namespace {

// out = R x, R a rotation of each pair (i, i + D/2);  dx = R^T dout = rope(dout) with -angle
struct RopeBackward final : Node {
  double base;
  int64_t start_pos;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor dout = g[0].contiguous();  // [B, T, H, D]
    Tensor dx = ops_detail::empty_like(dout);
    backend_for(dout).rope(dx, dout, base, start_pos, /*inverse=*/true);
    return {dx};
  }
  std::string name() const override { return "RopeBackward"; }
};

}  // namespace

// The kernel checks the layout (4-D, even D).
Tensor rope(const Tensor& x, double base, int64_t start_pos) {
  Tensor xc = x.contiguous();
  Tensor out = ops_detail::empty_like(xc);  // [B, T, H, D]
  backend_for(xc).rope(out, xc, base, start_pos, /*inverse=*/false);
  if (autograd::any_requires_grad({x})) {
    auto node = std::make_shared<RopeBackward>();
    node->base = base;
    node->start_pos = start_pos;
    record(node, {x}, out);
  }
  return out;
}

}  // namespace nha
