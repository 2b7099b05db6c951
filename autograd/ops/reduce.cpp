// sum (all elements or one dim) and mean: forward and backward.
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using ops_detail::record;

namespace {

// in viewed as [outer, n, inner] -> out [outer, inner];  din = broadcast of dout along n, times s.
struct SumBackward final : Node {
  Shape input_shape;
  int64_t outer, n, inner;
  double s = 1.0;  // 1/count for mean
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    const autograd::OutputMeta& m = outputs[0];
    Tensor din = Tensor::empty(input_shape, m.dtype, m.device);
    Tensor gc = g[0].contiguous();
    backend_for(din).broadcast_dim(din, gc, outer, n, inner);
    if (s != 1.0) backend_for(din).scale(din, din, s);
    return {din};
  }
  std::string name() const override { return "SumBackward"; }
};

Tensor reduce(const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Shape& out_shape,
              double s) {
  Tensor ac = a.contiguous();
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  Backend& be = backend_for(ac);
  be.sum_dim(out, ac, outer, n, inner);
  if (s != 1.0) be.scale(out, out, s);
  if (autograd::any_requires_grad({a})) {
    auto node = std::make_shared<SumBackward>();
    node->input_shape = a.shape();
    node->outer = outer;
    node->n = n;
    node->inner = inner;
    node->s = s;
    record(node, {a}, out);
  }
  return out;
}

}  // namespace

Tensor sum(const Tensor& a) { return reduce(a, 1, a.numel(), 1, Shape{}, 1.0); }

Tensor mean(const Tensor& a) {
  NHA_CHECK(a.numel() > 0) << "mean of an empty tensor " << a.str();
  return reduce(a, 1, a.numel(), 1, Shape{}, 1.0 / double(a.numel()));
}

Tensor sum(const Tensor& a, int64_t dim, bool keepdim) {
  const int64_t nd = a.dim();
  NHA_CHECK(dim >= -nd && dim < nd) << "sum: dim " << dim << " out of range for " << a.str();
  if (dim < 0) dim += nd;
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < dim; ++i) outer *= a.size(i);
  for (int64_t i = dim + 1; i < nd; ++i) inner *= a.size(i);
  Shape out_shape = a.shape();
  if (keepdim)
    out_shape[dim] = 1;
  else
    out_shape.erase(out_shape.begin() + dim);
  return reduce(a, outer, a.size(dim), inner, out_shape, 1.0);
}

Tensor argmax(const Tensor& rows) {
  NHA_CHECK(rows.dim() == 2) << "argmax needs rows [N, C], got " << rows.str();
  Tensor out = Tensor::empty({rows.size(0)}, DType::I64, rows.device());
  backend_for(rows).argmax(out, rows);
  return out;
}

}  // namespace nha
