// Tensor: a shape, strides and a dtype over shared Storage, plus autograd metadata.
//
// A Tensor is a cheap handle (shared_ptr to TensorImpl): copies alias the same data, like PyTorch.
// Views (reshape of a contiguous tensor, transpose, slice) share storage; kernels want contiguous
// inputs and call contiguous() which copies only when needed. Shape/view methods and arithmetic are
// differentiable: they are recorded by autograd when an input requires grad (autograd/ops.h).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"

namespace nha {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);
int64_t numel_of(const Shape& shape);
Shape contiguous_strides(const Shape& shape);

class Generator;
struct TensorImpl;
namespace autograd {
class Node;
}

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- factories -------------------------------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::F32,
                     Device device = Device::cpu());
  // Copies host values into a new tensor of dtype_of<T> on `device`.
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape,
                            Device device = Device::cpu());
  // N(0, std^2) / U[lo, hi) from the counter-based generator: same numbers on every device
  // (uninitialised, the generator still advanced, under a SkipInitGuard: core/random.h).
  static Tensor randn(const Shape& shape, Generator& gen, double std = 1.0,
                      DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor rand(const Shape& shape, Generator& gen, double lo = 0.0, double hi = 1.0,
                     DType dtype = DType::F32, Device device = Device::cpu());

  // ---- properties ------------------------------------------------------------------------------
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const;
  const Shape& strides() const;
  int64_t dim() const { return int64_t(shape().size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const;
  DType dtype() const;
  Device device() const;
  bool is_contiguous() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype()); }
  std::string str() const;  // "f32[2, 3] cpu" for messages

  // Raw pointer to the first element (device memory for CUDA tensors).
  void* data_ptr() const;
  template <typename T>
  T* data() const {
    NHA_CHECK(dtype() == dtype_of<T>::value)
        << "data<" << dtype_name(dtype_of<T>::value) << ">() on a " << str() << " tensor";
    return static_cast<T*>(data_ptr());
  }
  // Host copy of all elements in row-major order, converted to T.
  template <typename T>
  std::vector<T> to_vector() const;
  template <typename T>
  T item() const;

  // ---- views and copies (differentiable) -------------------------------------------------------
  Tensor reshape(const Shape& shape) const;  // view when contiguous, else copy; one dim may be -1
  Tensor transpose(int64_t d0, int64_t d1) const;      // view
  Tensor slice(int64_t d, int64_t start, int64_t end) const;  // view of [start, end) along d
  Tensor contiguous() const;                           // self when already contiguous
  Tensor clone() const;
  Tensor to(Device device) const;                      // self when already there
  Tensor to(DType dtype) const;                        // self when already that dtype

  // ---- in-place (bump the storage version; refuse leaves that require grad in grad mode) --------
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }
  Tensor& copy_(const Tensor& src);  // same shape; any device/dtype
  Tensor& add_(const Tensor& other, double alpha = 1.0);  // self += alpha * other
  Tensor& mul_(double factor);
  // Replace the data behind this handle (PyTorch's `param.data = t`); every alias sees it.
  void set_data(const Tensor& other);

  // ---- autograd ---------------------------------------------------------------------------------
  bool requires_grad() const;
  Tensor& set_requires_grad(bool requires_grad);
  const Tensor& grad() const;    // undefined until backward() reaches this leaf
  Tensor& mutable_grad();
  const std::shared_ptr<autograd::Node>& grad_fn() const;
  uint32_t output_nr() const;
  bool is_leaf() const { return grad_fn() == nullptr; }
  // Accumulates d(self)/d(leaves) into every reachable leaf's grad(). self must be a scalar unless
  // `grad` is given. The graph's saved tensors are freed unless retain_graph.
  void backward(const Tensor& grad = Tensor(), bool retain_graph = false) const;
  Tensor detach() const;  // shares storage, no history

  // ---- internals (autograd, backends) -----------------------------------------------------------
  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& o) const { return impl_ == o.impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements
  Shape shape;
  Shape strides;  // in elements
  DType dtype = DType::F32;

  // autograd
  bool requires_grad = false;                  // leaves only; non-leaves require grad via grad_fn
  std::shared_ptr<autograd::Node> grad_fn;     // the node that produced this tensor
  uint32_t output_nr = 0;                      // which output of grad_fn
  Tensor grad;                                 // accumulated gradient of a leaf
  std::weak_ptr<autograd::Node> grad_accumulator;  // AccumulateGrad node of a leaf, made lazily
};

// A tensor viewing `base`'s storage with a new shape/strides/offset (no copy, no autograd).
Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset);

// Checks used by kernels and ops; they name the argument in the error.
void check_same_shape(const Tensor& a, const Tensor& b, const char* what);
void check_dtype(const Tensor& t, DType dtype, const char* what);

}  // namespace nha
