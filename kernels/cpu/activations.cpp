// CPU activations: SiLU and SwiGLU, forward and backward (elementwise over any shape).
#include <cmath>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

namespace {

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// d silu(x) / dx = s (1 + x (1 - s)),  s = sigmoid(x)
template <typename T>
T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

}  // namespace

// out = x * sigmoid(x)        x, out [n]
void CpuBackend::silu_forward(Tensor& out, const Tensor& x) {
  NHA_PROFILE_SCOPE("silu_forward");
  check_same_shape(out, x, "silu");
  dispatch_floating(x, "silu_forward", [&]<typename T>() {
    const T* px = x.data<T>();
    T* py = out.data<T>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) py[i] = px[i] * sigmoid(px[i]);
  });
}

// dx = dout * sigmoid(x) * (1 + x * (1 - sigmoid(x)))        dout, x, dx [n]
void CpuBackend::silu_backward(Tensor& dx, const Tensor& dout, const Tensor& x) {
  NHA_PROFILE_SCOPE("silu_backward");
  check_same_shape(dout, x, "silu backward");
  dispatch_floating(x, "silu_backward", [&]<typename T>() {
    const T *pg = dout.data<T>(), *px = x.data<T>();
    T* pdx = dx.data<T>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) pdx[i] = pg[i] * silu_grad(px[i]);
  });
}

// out = silu(gate) * up        gate, up, out [n]
void CpuBackend::swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up) {
  NHA_PROFILE_SCOPE("swiglu_forward");
  check_same_shape(gate, up, "swiglu");
  dispatch_floating(gate, "swiglu_forward", [&]<typename T>() {
    const T *pa = gate.data<T>(), *pb = up.data<T>();
    T* py = out.data<T>();
    const int64_t n = gate.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) py[i] = pa[i] * sigmoid(pa[i]) * pb[i];
  });
}

// dgate = dout * up * silu'(gate);  dup = dout * silu(gate)        all [n]
void CpuBackend::swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate,
                                 const Tensor& up) {
  NHA_PROFILE_SCOPE("swiglu_backward");
  check_same_shape(gate, up, "swiglu backward");
  check_same_shape(dout, gate, "swiglu backward");
  dispatch_floating(gate, "swiglu_backward", [&]<typename T>() {
    const T *pg = dout.data<T>(), *pa = gate.data<T>(), *pb = up.data<T>();
    T *pda = dgate.data<T>(), *pdb = dup.data<T>();
    const int64_t n = gate.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      pda[i] = pg[i] * pb[i] * silu_grad(pa[i]);
      pdb[i] = pg[i] * pa[i] * sigmoid(pa[i]);
    }
  });
}

}  // namespace nha
