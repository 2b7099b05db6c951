#include "kernels/backend.h"

namespace nha {

#define NHA_MISSING(op) \
  NHA_FAIL() << "op " #op " is not implemented on the " << name() << " backend"

// Every kernel a backend does not override fails with the op's name and the backend's.
#define NHA_KERNEL(name, params) \
  void Backend::name params { NHA_MISSING(name); }
#include "kernels/kernels.inc"
#undef NHA_KERNEL

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

}  // namespace nha
