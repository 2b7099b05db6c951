// Helpers for the CUDA backend tests: inputs made on the CPU and moved to the GPU, float64 CPU
// references computed from exactly the values the GPU sees, outputs poisoned with NaN.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/testing.h"
#include "core/device.h"
#include "core/tensor.h"
#include "kernels/backend.h"

namespace nha::cudatest {

#define NHA_SKIP_WITHOUT_CUDA()                                                 \
  do {                                                                          \
    if (::nha::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device here"; \
  } while (0)

inline Device gpu() { return Device::cuda(0); }
inline Backend& cuda_be() { return backend_for(gpu()); }
inline Backend& cpu_be() { return backend_for(Device::cpu()); }

// N(0, std^2) values drawn on the CPU (f64), rounded to `dtype`, placed on the GPU.
inline Tensor gpu_randn(const Shape& shape, uint64_t seed, DType dtype, double std = 1.0) {
  return testing::randn(shape, seed, DType::F64, std).to(dtype).to(gpu());
}
// The exact values of a GPU tensor as a CPU f64 tensor (the reference's input).
inline Tensor ref(const Tensor& t) { return t.to(Device::cpu()).to(DType::F64); }
// A GPU tensor whose every element is NaN: elements a kernel fails to write stay NaN.
inline Tensor poisoned(const Shape& shape, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype, gpu());
  cuda_be().fill(t, std::numeric_limits<double>::quiet_NaN());
  return t;
}
inline Tensor cpu_empty(const Shape& shape) { return Tensor::empty(shape, DType::F64); }

// rel_rms of a GPU result against a CPU f64 reference (NaN anywhere: +inf).
inline double err(const Tensor& gpu_out, const Tensor& cpu_ref) {
  return testing::rel_rms(gpu_out.to(Device::cpu()).to(DType::F64), cpu_ref);
}

// Per-dtype thresholds: one bf16 rounding of the output ~1e-3 relative; f32 far below 1e-5.
inline double tol(DType t, double bf16_tol = 4e-3, double f32_tol = 1e-5) {
  return t == DType::BF16 ? bf16_tol : f32_tol;
}

// Raw bytes of a tensor on the host (for bitwise comparisons).
inline std::vector<unsigned char> bytes(const Tensor& t) {
  Tensor c = t.contiguous();
  std::vector<unsigned char> out(c.nbytes());
  backend_for(c).copy_bytes(out.data(), Device::cpu(), c.data_ptr(), c.device(), c.nbytes());
  return out;
}

inline const char* name(DType t) { return dtype_name(t); }

}  // namespace nha::cudatest
