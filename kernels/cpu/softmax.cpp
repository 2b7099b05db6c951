// CPU softmax over the last dim: forward and backward.
#include <algorithm>
#include <cmath>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

// out[n,c] = exp(x[n,c] - m_n) / sum_c' exp(x[n,c'] - m_n),  m_n = max_c x[n,c]
//   x, out [N, C] (any leading shape flattened to N rows)
// Subtracting the row max keeps exp() <= 1 (no overflow); the sum is accumulated in double.
void CpuBackend::softmax_forward(Tensor& out, const Tensor& x) {
  NHA_PROFILE_SCOPE("softmax_forward");
  check_same_shape(out, x, "softmax");
  const int64_t C = x.size(-1), N = x.numel() / C;
  dispatch_floating(x, "softmax_forward", [&]<typename T>() {
    const T* px = x.data<T>();  // [N, C]
    T* py = out.data<T>();      // [N, C]
#pragma omp parallel for schedule(static) if (N * C > 16384)
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = px + n * C;
      T* yr = py + n * C;
      const T m = *std::max_element(xr, xr + C);
      double s = 0;
      for (int64_t c = 0; c < C; ++c) {
        yr[c] = std::exp(xr[c] - m);
        s += double(yr[c]);
      }
      const T inv = T(1.0 / s);
      for (int64_t c = 0; c < C; ++c) yr[c] *= inv;
    }
  });
}

// dx[n,c] = out[n,c] * (dout[n,c] - sum_c' dout[n,c'] out[n,c'])
//   dout, out, dx [N, C]; the row dot product is accumulated in double.
void CpuBackend::softmax_backward(Tensor& dx, const Tensor& dout, const Tensor& out) {
  NHA_PROFILE_SCOPE("softmax_backward");
  check_same_shape(dout, out, "softmax backward");
  const int64_t C = out.size(-1), N = out.numel() / C;
  dispatch_floating(out, "softmax_backward", [&]<typename T>() {
    const T *pg = dout.data<T>(), *py = out.data<T>();  // [N, C]
    T* pdx = dx.data<T>();                              // [N, C]
#pragma omp parallel for schedule(static) if (N * C > 16384)
    for (int64_t n = 0; n < N; ++n) {
      const T *g = pg + n * C, *y = py + n * C;
      double dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += double(g[c]) * double(y[c]);
      for (int64_t c = 0; c < C; ++c) pdx[n * C + c] = T(double(y[c]) * (double(g[c]) - dot));
    }
  });
}

// out[n] = first c with x[n,c] = max_c' x[n,c']     x [N, C]; out [N] i64
void CpuBackend::argmax(Tensor& out, const Tensor& x) {
  NHA_PROFILE_SCOPE("argmax");
  check_dtype(out, DType::I64, "argmax output");
  const int64_t C = x.size(-1), N = x.numel() / C;
  NHA_CHECK(out.numel() == N) << "argmax: output " << out.str() << " for " << N << " rows";
  dispatch_floating(x, "argmax", [&]<typename T>() {
    const T* px = x.data<T>();          // [N, C]
    int64_t* po = out.data<int64_t>();  // [N]
#pragma omp parallel for schedule(static) if (N * C > 16384)
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = px + n * C;
      po[n] = std::max_element(xr, xr + C) - xr;  // the first maximum
    }
  });
}

}  // namespace nha
