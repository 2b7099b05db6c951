// silu and swiglu: forward and backward through the Backend activation kernels.
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::empty_like;
using ops_detail::record;

namespace {

// out = x sigmoid(x);  dx = dout silu'(x)
struct SiluBackward final : Node {
  SavedTensor x;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor xv = x.unpack(), dout = g[0].contiguous();
    Tensor dx = empty_like(xv);
    backend_for(dout).silu_backward(dx, dout, xv);
    return {dx};
  }
  std::string name() const override { return "SiluBackward"; }
  void release_saved() override { x.reset(); }
};

// out = silu(gate) up;  dgate = dout up silu'(gate), dup = dout silu(gate)
struct SwigluBackward final : Node {
  SavedTensor gate, up;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor gv = gate.unpack(), uv = up.unpack(), dout = g[0].contiguous();
    Tensor dgate = empty_like(gv), dup = empty_like(uv);
    backend_for(dout).swiglu_backward(dgate, dup, dout, gv, uv);
    return {needs_grad(0) ? dgate : Tensor(), needs_grad(1) ? dup : Tensor()};
  }
  std::string name() const override { return "SwigluBackward"; }
  void release_saved() override { gate.reset(); up.reset(); }
};

}  // namespace

Tensor silu(const Tensor& x) {
  Tensor xc = x.contiguous();
  Tensor out = empty_like(xc);
  backend_for(xc).silu_forward(out, xc);
  if (autograd::any_requires_grad({x})) {
    auto node = std::make_shared<SiluBackward>();
    node->x = SavedTensor(xc, "silu.x");
    record(node, {x}, out);
  }
  return out;
}

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  check_same_shape(gate, up, "swiglu");
  check_dtype(up, gate.dtype(), "swiglu up");
  ops_detail::check_same_device({gate, up}, "swiglu");
  Tensor gc = gate.contiguous(), uc = up.contiguous();
  Tensor out = empty_like(gc);
  backend_for(gc).swiglu_forward(out, gc, uc);
  if (autograd::any_requires_grad({gate, up})) {
    auto node = std::make_shared<SwigluBackward>();
    node->gate = SavedTensor(gc, "swiglu.gate");
    node->up = SavedTensor(uc, "swiglu.up");
    record(node, {gate, up}, out);
  }
  return out;
}

}  // namespace nha
