#include "kernels/backend.h"

namespace nha {

#define NHA_MISSING(op) \
  NHA_FAIL() << "op " #op " is not implemented on the " << name() << " backend"

void Backend::copy_bytes(void*, Device, const void*, Device, size_t) { NHA_MISSING(copy_bytes); }
void Backend::copy_strided(Tensor&, const Tensor&) { NHA_MISSING(copy_strided); }
void Backend::fill(Tensor&, double) { NHA_MISSING(fill); }
void Backend::cast(Tensor&, const Tensor&) { NHA_MISSING(cast); }
void Backend::fill_normal(Tensor&, uint64_t, uint64_t, double) { NHA_MISSING(fill_normal); }
void Backend::fill_uniform(Tensor&, uint64_t, uint64_t, double, double) {
  NHA_MISSING(fill_uniform);
}
void Backend::add(Tensor&, const Tensor&, const Tensor&, double, double) { NHA_MISSING(add); }
void Backend::mul(Tensor&, const Tensor&, const Tensor&) { NHA_MISSING(mul); }
void Backend::scale(Tensor&, const Tensor&, double) { NHA_MISSING(scale); }
void Backend::sum_dim(Tensor&, const Tensor&, int64_t, int64_t, int64_t) { NHA_MISSING(sum_dim); }
void Backend::broadcast_dim(Tensor&, const Tensor&, int64_t, int64_t, int64_t) {
  NHA_MISSING(broadcast_dim);
}
void Backend::sum_squares(Tensor&, const Tensor&) { NHA_MISSING(sum_squares); }
void Backend::gemm(Tensor&, const Tensor&, const Tensor&, bool, bool, double, double) {
  NHA_MISSING(gemm);
}
void Backend::embedding_forward(Tensor&, const Tensor&, const Tensor&) {
  NHA_MISSING(embedding_forward);
}
void Backend::embedding_backward(Tensor&, const Tensor&, const Tensor&) {
  NHA_MISSING(embedding_backward);
}
void Backend::rmsnorm_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, double) {
  NHA_MISSING(rmsnorm_forward);
}
void Backend::rmsnorm_backward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&) {
  NHA_MISSING(rmsnorm_backward);
}
void Backend::add_rmsnorm_forward(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, double) {
  NHA_MISSING(add_rmsnorm_forward);
}
void Backend::add_rmsnorm_backward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&) {
  NHA_MISSING(add_rmsnorm_backward);
}
void Backend::rope(Tensor&, const Tensor&, double, int64_t, bool) { NHA_MISSING(rope); }
void Backend::silu_forward(Tensor&, const Tensor&) { NHA_MISSING(silu_forward); }
void Backend::silu_backward(Tensor&, const Tensor&, const Tensor&) { NHA_MISSING(silu_backward); }
void Backend::swiglu_forward(Tensor&, const Tensor&, const Tensor&) {
  NHA_MISSING(swiglu_forward);
}
void Backend::swiglu_backward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  NHA_MISSING(swiglu_backward);
}
void Backend::softmax_forward(Tensor&, const Tensor&) { NHA_MISSING(softmax_forward); }
void Backend::softmax_backward(Tensor&, const Tensor&, const Tensor&) {
  NHA_MISSING(softmax_backward);
}
void Backend::nha_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                          int64_t) {
  NHA_MISSING(nha_forward);
}
void Backend::nha_backward(Tensor&, Tensor&, Tensor&, Tensor&, Tensor&, Tensor&, Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, double, int64_t) {
  NHA_MISSING(nha_backward);
}
void Backend::nha_gate_forward(Tensor&, Tensor&, const Tensor&) { NHA_MISSING(nha_gate_forward); }
void Backend::nha_gate_backward(Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  NHA_MISSING(nha_gate_backward);
}
void Backend::argmax(Tensor&, const Tensor&) { NHA_MISSING(argmax); }
void Backend::attention_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                double, int64_t) {
  NHA_MISSING(attention_forward);
}
void Backend::attention_backward(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 double, int64_t) {
  NHA_MISSING(attention_backward);
}
void Backend::cross_entropy_forward(Tensor&, const Tensor&, const Tensor&, int64_t) {
  NHA_MISSING(cross_entropy_forward);
}
void Backend::cross_entropy_backward(Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     int64_t) {
  NHA_MISSING(cross_entropy_backward);
}
void Backend::adamw_step(Tensor&, const Tensor&, Tensor&, Tensor&, double, double, double, double,
                         double, int64_t) {
  NHA_MISSING(adamw_step);
}
void Backend::adamw_step_flat(Tensor&, const Tensor&, Tensor&, Tensor&, Tensor&, const Tensor&,
                              double, double, double, double, double, int64_t) {
  NHA_MISSING(adamw_step_flat);
}

namespace {
Backend*& registered(DeviceKind kind) {
  static Backend* table[2] = {nullptr, nullptr};
  return table[static_cast<int>(kind)];
}
}  // namespace

Backend& cpu_backend();  // kernels/cpu/cpu_backend.cpp

Backend& backend_for(Device device) {
  if (device.is_cpu()) return cpu_backend();
  Backend* b = registered(device.kind);
#ifdef NHA_WITH_CUDA
  if (b == nullptr && device.is_cuda()) b = registered(device.kind) = &cuda_backend();
#endif
  NHA_CHECK(b != nullptr) << "no backend for " << device.str()
                          << ". HINT: this binary was built without CUDA; rebuild with "
                             "-DNHA_CUDA=ON on a machine with nvcc, or use device cpu";
  return *b;
}

Backend& backend_for(const Tensor& t) { return backend_for(t.device()); }

void register_backend(DeviceKind kind, Backend* backend) { registered(kind) = backend; }

}  // namespace nha
