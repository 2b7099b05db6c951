// The Tensor factories that write values (core/tensor.h): they fill through the device's Backend,
// so they live here, above core/ (core/tensor.cpp has the ones that only allocate).
#include "core/random.h"
#include "core/tensor.h"
#include "kernels/backend.h"

namespace nha {

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  backend_for(device).fill(t, value);
  return t;
}

template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& values, const Shape& shape, Device device) {
  NHA_CHECK(int64_t(values.size()) == numel_of(shape))
      << values.size() << " values do not fill shape " << shape_str(shape);
  Tensor t = empty(shape, dtype_of<T>::value, device);
  backend_for(device).copy_bytes(t.data_ptr(), device, values.data(), Device::cpu(),
                                 values.size() * sizeof(T));
  return t;
}
template Tensor Tensor::from_vector(const std::vector<float>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<double>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<bf16>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<int32_t>&, const Shape&, Device);
template Tensor Tensor::from_vector(const std::vector<int64_t>&, const Shape&, Device);

namespace {
thread_local bool skip_init_active = false;
}  // namespace
SkipInitGuard::SkipInitGuard() : prev_(skip_init_active) { skip_init_active = true; }
SkipInitGuard::~SkipInitGuard() { skip_init_active = prev_; }

Tensor Tensor::randn(const Shape& shape, Generator& gen, double std, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  const uint64_t offset = gen.advance(uint64_t(t.numel()));
  if (!skip_init_active) backend_for(device).fill_normal(t, gen.seed(), offset, std);
  return t;
}

Tensor Tensor::rand(const Shape& shape, Generator& gen, double lo, double hi, DType dtype,
                    Device device) {
  Tensor t = empty(shape, dtype, device);
  const uint64_t offset = gen.advance(uint64_t(t.numel()));
  if (!skip_init_active) backend_for(device).fill_uniform(t, gen.seed(), offset, lo, hi);
  return t;
}

}  // namespace nha
