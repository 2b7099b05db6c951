#include "core/tensor.h"

#include <sstream>

#include "core/random.h"

namespace nha {

std::string shape_str(const Shape& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

int64_t numel_of(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    NHA_CHECK(d >= 0) << "negative dimension in shape " << shape_str(shape);
    n *= d;
  }
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int64_t i = int64_t(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

// ---- factories ----------------------------------------------------------------------------------

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  impl->storage = std::make_shared<Storage>(size_t(numel_of(shape)) * dtype_size(dtype), device);
  return Tensor(std::move(impl));
}

// full(), from_vector() and the random factories fill through a Backend: kernels/tensor_factories.cpp.
// The in-place writes and backward() need autograd: autograd/tensor_autograd.cpp.

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  return full(shape, 0.0, dtype, device);
}

Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) {
  return full(shape, 1.0, dtype, device);
}

// ---- properties ---------------------------------------------------------------------------------

namespace {
const std::shared_ptr<TensorImpl>& checked(const std::shared_ptr<TensorImpl>& impl) {
  NHA_CHECK(impl) << "use of an undefined tensor. HINT: the tensor was default-constructed or moved from";
  return impl;
}
}  // namespace
#define NHA_IMPL() checked(impl_)

const Shape& Tensor::shape() const { return NHA_IMPL()->shape; }
const Shape& Tensor::strides() const { return NHA_IMPL()->strides; }
DType Tensor::dtype() const { return NHA_IMPL()->dtype; }
Device Tensor::device() const { return NHA_IMPL()->storage->device(); }
int64_t Tensor::numel() const { return numel_of(shape()); }

int64_t Tensor::size(int64_t d) const {
  int64_t n = dim();
  NHA_CHECK(d >= -n && d < n) << "dimension " << d << " out of range for " << str();
  return shape()[d < 0 ? d + n : d];
}

bool Tensor::is_contiguous() const {
  const Shape& sh = shape();
  const Shape& st = strides();
  int64_t expected = 1;
  for (int64_t i = int64_t(sh.size()) - 1; i >= 0; --i) {
    if (sh[i] != 1 && st[i] != expected) return false;
    expected *= sh[i];
  }
  return true;
}

std::string Tensor::str() const {
  if (!impl_) return "undefined";
  return std::string(dtype_name(dtype())) + shape_str(shape()) + " " + device().str();
}

void* Tensor::data_ptr() const {
  TensorImpl* impl = NHA_IMPL().get();
  return static_cast<char*>(impl->storage->data()) + impl->offset * int64_t(dtype_size(impl->dtype));
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  Tensor host = to(Device::cpu()).to(dtype_of<T>::value).contiguous();
  const T* p = host.data<T>();
  return std::vector<T>(p, p + host.numel());
}
template std::vector<float> Tensor::to_vector() const;
template std::vector<double> Tensor::to_vector() const;
template std::vector<int32_t> Tensor::to_vector() const;
template std::vector<int64_t> Tensor::to_vector() const;

template <typename T>
T Tensor::item() const {
  NHA_CHECK(numel() == 1) << "item() needs a tensor with one element, got " << str();
  return to_vector<T>()[0];
}
template float Tensor::item() const;
template double Tensor::item() const;
template int32_t Tensor::item() const;
template int64_t Tensor::item() const;

Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.impl()->storage;
  impl->dtype = base.dtype();
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  return Tensor(std::move(impl));
}

void Tensor::set_data(const Tensor& other) {
  TensorImpl* impl = NHA_IMPL().get();
  impl->storage = other.impl()->storage;
  impl->offset = other.impl()->offset;
  impl->shape = other.shape();
  impl->strides = other.strides();
  impl->dtype = other.dtype();
}

// ---- autograd accessors -------------------------------------------------------------------------

bool Tensor::requires_grad() const {
  return NHA_IMPL()->requires_grad || impl_->grad_fn != nullptr;
}

Tensor& Tensor::set_requires_grad(bool requires_grad) {
  NHA_CHECK(is_leaf()) << "set_requires_grad on a non-leaf tensor " << str()
                       << ". HINT: call detach() first";
  NHA_CHECK(!requires_grad || is_floating(dtype()))
      << "only floating tensors can require grad, got " << str();
  impl_->requires_grad = requires_grad;
  return *this;
}

const Tensor& Tensor::grad() const { return NHA_IMPL()->grad; }
Tensor& Tensor::mutable_grad() { return NHA_IMPL()->grad; }
const std::shared_ptr<autograd::Node>& Tensor::grad_fn() const { return NHA_IMPL()->grad_fn; }
uint32_t Tensor::output_nr() const { return NHA_IMPL()->output_nr; }

Tensor Tensor::detach() const { return make_view(*this, shape(), strides(), impl()->offset); }

// ---- checks -------------------------------------------------------------------------------------

void check_same_shape(const Tensor& a, const Tensor& b, const char* what) {
  NHA_CHECK(a.shape() == b.shape()) << what << ": shapes differ, " << a.str() << " vs " << b.str();
}
void check_dtype(const Tensor& t, DType dtype, const char* what) {
  NHA_CHECK(t.dtype() == dtype) << what << ": expected " << dtype_name(dtype) << ", got " << t.str();
}

}  // namespace nha
