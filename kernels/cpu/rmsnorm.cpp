// CPU RMSNorm over the last dim: forward and backward.
#include <algorithm>
#include <cmath>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

namespace {
// Columns of dw one thread owns in the backward (rows are read in contiguous chunks of this).
constexpr int64_t kDwColumnBlock = 64;
}  // namespace

// rstd[n] = 1 / sqrt(mean_c x[n,c]^2 + eps);  out[n,c] = x[n,c] * rstd[n] * w[c]
//   x, out [N, C] (any leading shape flattened to N rows); w [C]; rstd [N]
// The sum of squares is accumulated in double.
void CpuBackend::rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                                 double eps) {
  NHA_PROFILE_SCOPE("rmsnorm_forward");
  const int64_t C = x.size(-1), N = x.numel() / C;
  NHA_CHECK(w.numel() == C && rstd.numel() == N)
      << "rmsnorm: x " << x.str() << ", weight " << w.str() << ", rstd " << rstd.str();
  dispatch_floating(x, "rmsnorm_forward", [&]<typename T>() {
    const T *px = x.data<T>(), *pw = w.data<T>();  // [N, C], [C]
    T *py = out.data<T>(), *pr = rstd.data<T>();   // [N, C], [N]
#pragma omp parallel for schedule(static) if (N * C > 16384)
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = px + n * C;
      double ss = 0;
      for (int64_t c = 0; c < C; ++c) ss += double(xr[c]) * double(xr[c]);
      const T r = T(1.0 / std::sqrt(ss / double(C) + eps));
      pr[n] = r;
      for (int64_t c = 0; c < C; ++c) py[n * C + c] = xr[c] * r * pw[c];
    }
  });
}

// With xhat = x * rstd (per row):
//   dx[n,c] = rstd[n] * (w[c] dout[n,c] - xhat[n,c] * mean_c'(xhat[n,c'] w[c'] dout[n,c']))
//   dw[c]   = sum_n dout[n,c] xhat[n,c]
//   dout, x, dx [N, C]; w, dw [C]; rstd [N]
// dx is parallel over rows; dw over blocks of columns, each summed in row order (deterministic);
// both reductions accumulate in double.
void CpuBackend::rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x,
                                  const Tensor& w, const Tensor& rstd) {
  NHA_PROFILE_SCOPE("rmsnorm_backward");
  const int64_t C = x.size(-1), N = x.numel() / C;
  dispatch_floating(x, "rmsnorm_backward", [&]<typename T>() {
    const T *pg = dout.data<T>(), *px = x.data<T>();  // [N, C]
    const T *pw = w.data<T>(), *pr = rstd.data<T>();  // [C], [N]
    T *pdx = dx.data<T>(), *pdw = dw.data<T>();       // [N, C], [C]
#pragma omp parallel for schedule(static) if (N * C > 16384)
    for (int64_t n = 0; n < N; ++n) {
      const T *g = pg + n * C, *xr = px + n * C;
      const double r = pr[n];
      double dot = 0;  // sum_c xhat * w * dout
      for (int64_t c = 0; c < C; ++c) dot += double(xr[c]) * r * double(pw[c]) * double(g[c]);
      const double m = dot / double(C);
      for (int64_t c = 0; c < C; ++c)
        pdx[n * C + c] = T(r * (double(pw[c]) * double(g[c]) - double(xr[c]) * r * m));
    }
    const int64_t blocks = (C + kDwColumnBlock - 1) / kDwColumnBlock;
#pragma omp parallel for schedule(static) if (N * C > 16384)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kDwColumnBlock, c1 = std::min(C, c0 + kDwColumnBlock);
      double acc[kDwColumnBlock] = {};
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = c0; c < c1; ++c)
          acc[c - c0] += double(pg[n * C + c]) * double(px[n * C + c]) * double(pr[n]);
      for (int64_t c = c0; c < c1; ++c) pdw[c] = T(acc[c - c0]);
    }
  });
}

// The residual add fused with the norm after it: on the CPU (the reference) literally the two
// kernels in a row, so the result is add() + rmsnorm_forward() bit for bit.
//   h = x + delta;  rstd[n] = 1 / sqrt(mean_c h[n,c]^2 + eps);  out[n,c] = h[n,c] * rstd[n] * w[c]
//   x, delta, h, out [N, C]; w [C]; rstd [N]
void CpuBackend::add_rmsnorm_forward(Tensor& h, Tensor& out, Tensor& rstd, const Tensor& x,
                                     const Tensor& delta, const Tensor& w, double eps) {
  NHA_PROFILE_SCOPE("add_rmsnorm_forward");
  check_same_shape(delta, x, "add_rmsnorm delta");
  check_same_shape(h, x, "add_rmsnorm h");
  add(h, x, delta, 1.0, 1.0);
  rmsnorm_forward(out, rstd, h, w, eps);
}

// dx = dh + rmsnorm_backward's dx (with h in place of x): the gradient of both x and delta;
// dw as in rmsnorm_backward. dx, dout, dh, h [N, C]; w, dw [C]; rstd [N]
void CpuBackend::add_rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout,
                                      const Tensor& dh, const Tensor& h, const Tensor& w,
                                      const Tensor& rstd) {
  NHA_PROFILE_SCOPE("add_rmsnorm_backward");
  check_same_shape(dh, h, "add_rmsnorm_backward dh");
  rmsnorm_backward(dx, dw, dout, h, w, rstd);
  add(dx, dx, dh, 1.0, 1.0);
}

}  // namespace nha
