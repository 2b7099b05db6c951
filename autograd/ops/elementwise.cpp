// add, sub, mul, scale: forward and backward.
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::empty_like;
using ops_detail::record;

namespace {

// out = alpha a + beta b;  da = alpha dout, db = beta dout
struct AddBackward final : Node {
  double alpha, beta;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor da, db;
    if (needs_grad(0)) da = alpha == 1.0 ? g[0] : scale(g[0], alpha);
    if (needs_grad(1)) db = beta == 1.0 ? g[0] : scale(g[0], beta);
    return {da, db};
  }
  std::string name() const override { return "AddBackward"; }
};

// out = a * b;  da = dout * b, db = dout * a
struct MulBackward final : Node {
  SavedTensor a, b;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor da, db;
    if (needs_grad(0)) da = mul(g[0], b.unpack());
    if (needs_grad(1)) db = mul(g[0], a.unpack());
    return {da, db};
  }
  std::string name() const override { return "MulBackward"; }
  void release_saved() override { a.reset(); b.reset(); }
};

// out = s a;  da = s dout
struct ScaleBackward final : Node {
  double s;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override { return {scale(g[0], s)}; }
  std::string name() const override { return "ScaleBackward"; }
};

Tensor add_scaled(const Tensor& a, const Tensor& b, double alpha, double beta) {
  check_same_shape(a, b, "add");
  ops_detail::check_same_device({a, b}, "add");
  Tensor ac = a.contiguous(), bc = b.contiguous();
  Tensor out = empty_like(ac);
  backend_for(ac).add(out, ac, bc, alpha, beta);
  if (autograd::any_requires_grad({a, b})) {
    auto node = std::make_shared<AddBackward>();
    node->alpha = alpha;
    node->beta = beta;
    record(node, {a, b}, out);
  }
  return out;
}

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) { return add_scaled(a, b, 1.0, 1.0); }
Tensor sub(const Tensor& a, const Tensor& b) { return add_scaled(a, b, 1.0, -1.0); }

Tensor mul(const Tensor& a, const Tensor& b) {
  check_same_shape(a, b, "mul");
  ops_detail::check_same_device({a, b}, "mul");
  Tensor ac = a.contiguous(), bc = b.contiguous();
  Tensor out = empty_like(ac);
  backend_for(ac).mul(out, ac, bc);
  if (autograd::any_requires_grad({a, b})) {
    auto node = std::make_shared<MulBackward>();
    node->a = SavedTensor(ac, "mul.a");
    node->b = SavedTensor(bc, "mul.b");
    record(node, {a, b}, out);
  }
  return out;
}

Tensor scale(const Tensor& a, double s) {
  Tensor ac = a.contiguous();
  Tensor out = empty_like(ac);
  backend_for(ac).scale(out, ac, s);
  if (autograd::any_requires_grad({a})) {
    auto node = std::make_shared<ScaleBackward>();
    node->s = s;
    record(node, {a}, out);
  }
  return out;
}

}  // namespace nha
