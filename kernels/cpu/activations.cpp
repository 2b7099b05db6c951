// CPU activations: SiLU and SwiGLU, forward and backward (elementwise over any shape).
#include <algorithm>
#include <cmath>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/vec_math.h"

namespace nha {

namespace {

// Elements per task: each task computes the sigmoids of its block into a stack buffer, the exps
// in one vectorized call (kernels/cpu/vec_math.h).
constexpr int64_t kBlock = 1024;

// s [n] = sigmoid(x) = 1 / (1 + exp(-x)), n <= kBlock.
template <typename T>
void sigmoid_block(T* s, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = -x[i];
  exp_shifted(s, s, T(0), n);
  for (int64_t i = 0; i < n; ++i) s[i] = T(1) / (T(1) + s[i]);
}

// Runs fn(i0, n, s) over blocks [i0, i0 + n) of [0, total) with s [n] = sigmoid(x[i0..]),
// threaded over blocks for large inputs.
template <typename T, typename F>
void for_sigmoid_blocks(const T* x, int64_t total, F&& fn) {
  const int64_t blocks = (total + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (total > 65536)
  for (int64_t b = 0; b < blocks; ++b) {
    T s[kBlock];
    const int64_t i0 = b * kBlock, n = std::min(kBlock, total - i0);
    sigmoid_block(s, x + i0, n);
    fn(i0, n, s);
  }
}

}  // namespace

// out = x * sigmoid(x)        x, out [n]
void CpuBackend::silu_forward(Tensor& out, const Tensor& x) {
  NHA_PROFILE_SCOPE("silu_forward");
  check_same_shape(out, x, "silu");
  dispatch_floating(x, "silu_forward", [&]<typename T>() {
    const T* px = x.data<T>();
    T* py = out.data<T>();
    for_sigmoid_blocks(px, x.numel(), [&](int64_t i0, int64_t n, const T* s) {
      for (int64_t i = 0; i < n; ++i) py[i0 + i] = px[i0 + i] * s[i];
    });
  });
}

// dx = dout * s * (1 + x * (1 - s)), s = sigmoid(x)        dout, x, dx [n]
void CpuBackend::silu_backward(Tensor& dx, const Tensor& dout, const Tensor& x) {
  NHA_PROFILE_SCOPE("silu_backward");
  check_same_shape(dout, x, "silu backward");
  dispatch_floating(x, "silu_backward", [&]<typename T>() {
    const T *pg = dout.data<T>(), *px = x.data<T>();
    T* pdx = dx.data<T>();
    for_sigmoid_blocks(px, x.numel(), [&](int64_t i0, int64_t n, const T* s) {
      for (int64_t i = 0; i < n; ++i)
        pdx[i0 + i] = pg[i0 + i] * s[i] * (T(1) + px[i0 + i] * (T(1) - s[i]));
    });
  });
}

// out = silu(gate) * up        gate, up, out [n]
void CpuBackend::swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up) {
  NHA_PROFILE_SCOPE("swiglu_forward");
  check_same_shape(gate, up, "swiglu");
  dispatch_floating(gate, "swiglu_forward", [&]<typename T>() {
    const T *pa = gate.data<T>(), *pb = up.data<T>();
    T* py = out.data<T>();
    for_sigmoid_blocks(pa, gate.numel(), [&](int64_t i0, int64_t n, const T* s) {
      for (int64_t i = 0; i < n; ++i) py[i0 + i] = pa[i0 + i] * s[i] * pb[i0 + i];
    });
  });
}

// dgate = dout * up * silu'(gate);  dup = dout * silu(gate)        all [n]
// silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)
void CpuBackend::swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate,
                                 const Tensor& up) {
  NHA_PROFILE_SCOPE("swiglu_backward");
  check_same_shape(gate, up, "swiglu backward");
  check_same_shape(dout, gate, "swiglu backward");
  dispatch_floating(gate, "swiglu_backward", [&]<typename T>() {
    const T *pg = dout.data<T>(), *pa = gate.data<T>(), *pb = up.data<T>();
    T *pda = dgate.data<T>(), *pdb = dup.data<T>();
    for_sigmoid_blocks(pa, gate.numel(), [&](int64_t i0, int64_t n, const T* s) {
      for (int64_t i = 0; i < n; ++i) {
        const T a = pa[i0 + i], g = pg[i0 + i];
        pda[i0 + i] = g * pb[i0 + i] * s[i] * (T(1) + a * (T(1) - s[i]));
        pdb[i0 + i] = g * a * s[i];
      }
    });
  });
}

}  // namespace nha
