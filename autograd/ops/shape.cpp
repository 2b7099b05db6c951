// Views and copies as differentiable Tensor methods: reshape, transpose, slice, contiguous,
// clone, to(device), to(dtype), and cast_alias (to(dtype) answered by an existing copy). Each
// backward maps the gradient back to the input's layout.
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using ops_detail::record;

namespace {

int64_t normalize_dim(int64_t d, int64_t ndim, const Tensor& t) {
  NHA_CHECK(d >= -ndim && d < ndim) << "dimension " << d << " out of range for " << t.str();
  return d < 0 ? d + ndim : d;
}

Shape infer_shape(Shape shape, int64_t numel, const Tensor& t) {
  int64_t known = 1, infer_at = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      NHA_CHECK(infer_at < 0) << "reshape: only one dimension may be -1, got " << shape_str(shape);
      infer_at = int64_t(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer_at >= 0) {
    NHA_CHECK(known > 0 && numel % known == 0)
        << "reshape of " << t.str() << " to " << shape_str(shape) << " is impossible";
    shape[infer_at] = numel / known;
  }
  NHA_CHECK(numel_of(shape) == numel) << "reshape of " << t.str() << " to " << shape_str(shape)
                                      << ": element counts differ";
  return shape;
}

struct ReshapeBackward final : Node {
  Shape input_shape;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    return {g[0].contiguous().reshape(input_shape)};
  }
  std::string name() const override { return "ReshapeBackward"; }
};

struct TransposeBackward final : Node {
  int64_t d0, d1;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override { return {g[0].transpose(d0, d1)}; }
  std::string name() const override { return "TransposeBackward"; }
};

struct SliceBackward final : Node {
  Shape input_shape;
  int64_t dim, start;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    const autograd::OutputMeta& m = outputs[0];
    Tensor dx = Tensor::zeros(input_shape, m.dtype, m.device);
    Tensor window = dx.slice(dim, start, start + g[0].size(dim));
    // Write the gradient into the window of the zero tensor, row block by row block.
    Tensor gc = g[0].contiguous();
    copy_into_view(window, gc);
    return {dx};
  }
  std::string name() const override { return "SliceBackward"; }

  // window is a view of a contiguous tensor sliced along `dim`: it is a sequence of contiguous
  // blocks of (size(dim) * inner) elements separated by the parent's stride of the outer dims.
  void copy_into_view(Tensor& window, const Tensor& src) {
    int64_t outer = 1, inner = 1;
    for (int64_t i = 0; i < dim; ++i) outer *= window.size(i);
    for (int64_t i = dim + 1; i < window.dim(); ++i) inner *= window.size(i);
    const int64_t block = window.size(dim) * inner;
    const int64_t parent_step = input_shape[dim] * inner;
    const size_t es = dtype_size(src.dtype());
    Backend& be = backend_for(src);
    for (int64_t o = 0; o < outer; ++o)
      be.copy_bytes(static_cast<char*>(window.data_ptr()) + o * parent_step * es, src.device(),
                    static_cast<const char*>(src.data_ptr()) + o * block * es, src.device(),
                    block * es);
  }
};

struct IdentityBackward final : Node {  // contiguous(), clone()
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override { return {g[0]}; }
  std::string name() const override { return "CopyBackward"; }
};

struct ToDeviceBackward final : Node {
  Device source;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override { return {g[0].to(source)}; }
  std::string name() const override { return "ToDeviceBackward"; }
};

struct ToDtypeBackward final : Node {
  DType source;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override { return {g[0].to(source)}; }
  std::string name() const override { return "ToDtypeBackward"; }
};

Tensor copy_contiguous(const Tensor& t) {
  Tensor out = Tensor::empty(t.shape(), t.dtype(), t.device());
  backend_for(t).copy_strided(out, t);
  return out;
}

}  // namespace

Tensor Tensor::reshape(const Shape& new_shape) const {
  Shape shape = infer_shape(new_shape, numel(), *this);
  Tensor src = is_contiguous() ? *this : copy_contiguous(*this);
  Tensor out = make_view(src, shape, contiguous_strides(shape), src.impl()->offset);
  if (autograd::any_requires_grad({*this})) {
    auto node = std::make_shared<ReshapeBackward>();
    node->input_shape = this->shape();
    record(node, {*this}, out);
  }
  return out;
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  d0 = normalize_dim(d0, dim(), *this);
  d1 = normalize_dim(d1, dim(), *this);
  Shape sh = shape(), st = strides();
  std::swap(sh[d0], sh[d1]);
  std::swap(st[d0], st[d1]);
  Tensor out = make_view(*this, sh, st, impl()->offset);
  if (autograd::any_requires_grad({*this})) {
    auto node = std::make_shared<TransposeBackward>();
    node->d0 = d0;
    node->d1 = d1;
    record(node, {*this}, out);
  }
  return out;
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end) const {
  d = normalize_dim(d, dim(), *this);
  NHA_CHECK(0 <= start && start <= end && end <= shape()[d])
      << "slice [" << start << ", " << end << ") out of range for dim " << d << " of " << str();
  Shape sh = shape();
  sh[d] = end - start;
  Tensor out = make_view(*this, sh, strides(), impl()->offset + start * strides()[d]);
  if (autograd::any_requires_grad({*this})) {
    NHA_CHECK(is_contiguous()) << "slice of a non-contiguous tensor " << str()
                               << " needs grad. HINT: call contiguous() first";
    auto node = std::make_shared<SliceBackward>();
    node->input_shape = shape();
    node->dim = d;
    node->start = start;
    record(node, {*this}, out);
  }
  return out;
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

Tensor Tensor::clone() const {
  Tensor out = copy_contiguous(*this);
  if (autograd::any_requires_grad({*this})) record(std::make_shared<IdentityBackward>(), {*this}, out);
  return out;
}

Tensor Tensor::to(Device target) const {
  if (device() == target) return *this;
  Tensor src = contiguous();
  Tensor out = Tensor::empty(shape(), dtype(), target);
  // The non-CPU side owns cross-device copies.
  Backend& be = target.is_cpu() ? backend_for(device()) : backend_for(target);
  be.copy_bytes(out.data_ptr(), target, src.data_ptr(), src.device(), out.nbytes());
  if (autograd::any_requires_grad({*this})) {
    auto node = std::make_shared<ToDeviceBackward>();
    node->source = device();
    record(node, {*this}, out);
  }
  return out;
}

Tensor Tensor::to(DType target) const {
  if (dtype() == target) return *this;
  Tensor src = contiguous();
  Tensor out = Tensor::empty(shape(), target, device());
  backend_for(*this).cast(out, src);
  if (autograd::any_requires_grad({*this}) && is_floating(target)) {
    auto node = std::make_shared<ToDtypeBackward>();
    node->source = dtype();
    record(node, {*this}, out);
  }
  return out;
}

Tensor cast_alias(const Tensor& x, const Tensor& copy) {
  NHA_CHECK(x.defined() && copy.defined() && copy.shape() == x.shape() &&
            copy.device() == x.device() && is_floating(x.dtype()) && is_floating(copy.dtype()))
      << "cast_alias: the copy " << (copy.defined() ? copy.str() : "undefined")
      << " must be a floating tensor shaped like " << (x.defined() ? x.str() : "undefined");
  // A new handle on the copy's memory: the node is recorded on it, never on the copy itself.
  Tensor out = make_view(copy, copy.shape(), copy.strides(), copy.impl()->offset);
  if (autograd::any_requires_grad({x})) {
    auto node = std::make_shared<ToDtypeBackward>();
    node->source = x.dtype();
    record(node, {x}, out);
  }
  return out;
}

}  // namespace nha
