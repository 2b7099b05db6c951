// The Tensor methods that need autograd (core/tensor.h): in-place writes, refused on leaves that
// require grad while grad mode is on, and backward(). They live here, above core/.
#include "autograd/node.h"
#include "core/tensor.h"
#include "kernels/backend.h"

namespace nha {

namespace {
void check_inplace_allowed(const Tensor& t, const char* op) {
  NHA_CHECK(!(t.is_leaf() && t.requires_grad() && autograd::grad_mode_enabled()))
      << op << " on a leaf tensor that requires grad (" << t.str()
      << "). HINT: wrap parameter updates in autograd::NoGradGuard";
}
// In-place kernels write contiguous memory; views with gaps must be made contiguous first.
template <typename F>
void write_inplace(Tensor& self, F&& write) {
  NHA_CHECK(self.is_contiguous()) << "in-place write into a non-contiguous view " << self.str()
                                  << ". HINT: call contiguous() first";
  write(self);
  self.impl()->storage->bump_version();
}
}  // namespace

Tensor& Tensor::fill_(double value) {
  check_inplace_allowed(*this, "fill_");
  write_inplace(*this, [&](Tensor& t) { backend_for(t).fill(t, value); });
  return *this;
}

Tensor& Tensor::copy_(const Tensor& src) {
  check_inplace_allowed(*this, "copy_");
  NHA_CHECK(src.shape() == shape()) << "copy_ from " << src.str() << " into " << str();
  write_inplace(*this, [&](Tensor& t) {
    Tensor s = src.detach().to(t.device()).to(t.dtype()).contiguous();
    backend_for(t).copy_bytes(t.data_ptr(), t.device(), s.data_ptr(), s.device(), t.nbytes());
  });
  return *this;
}

Tensor& Tensor::add_(const Tensor& other, double alpha) {
  check_inplace_allowed(*this, "add_");
  check_same_shape(*this, other, "add_");
  write_inplace(*this, [&](Tensor& t) {
    Tensor o = other.detach().to(t.device()).to(t.dtype()).contiguous();
    backend_for(t).add(t, t, o, 1.0, alpha);
  });
  return *this;
}

Tensor& Tensor::mul_(double factor) {
  check_inplace_allowed(*this, "mul_");
  write_inplace(*this, [&](Tensor& t) { backend_for(t).scale(t, t, factor); });
  return *this;
}

void Tensor::backward(const Tensor& grad, bool retain_graph) const {
  NHA_CHECK(requires_grad()) << "backward() on a tensor that does not require grad (" << str()
                             << "). HINT: did any input have set_requires_grad(true)?";
  Tensor g = grad;
  if (!g.defined()) {
    NHA_CHECK(numel() == 1) << "backward() without a gradient needs a scalar, got " << str();
    g = Tensor::ones(shape(), dtype(), device());
  }
  autograd::run_backward({*this}, {g}, retain_graph);
}

}  // namespace nha
