// CPU rotary position embedding (rotate-half / NeoX layout); the inverse rotation is the backward.
#include <cmath>
#include <vector>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

// For position p = start_pos + t and i < D/2, with angle = p * base^(-2i/D) (negated if inverse):
//   out[b,t,h,i]       = x[b,t,h,i] cos(angle) - x[b,t,h,i + D/2] sin(angle)
//   out[b,t,h,i + D/2] = x[b,t,h,i + D/2] cos(angle) + x[b,t,h,i] sin(angle)
//   x, out [B, T, H, D]
// cos/sin are computed once per (t, i) in double and shared by every batch row and head.
void CpuBackend::rope(Tensor& out, const Tensor& x, double base, int64_t start_pos, bool inverse) {
  NHA_PROFILE_SCOPE("rope");
  NHA_CHECK(x.dim() == 4) << "rope wants x [B, T, H, D], got " << x.str();
  check_same_shape(out, x, "rope");
  const int64_t B = x.size(0), T_ = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  NHA_CHECK(D % 2 == 0) << "rope: head dim " << D << " of " << x.str()
                        << " is odd. HINT: pick model.d / model.heads even";
  std::vector<double> cos_t(T_ * half), sin_t(T_ * half);  // [T, D/2] each
  const double sign = inverse ? -1.0 : 1.0;
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = double(start_pos + t) * std::pow(base, -2.0 * double(i) / double(D));
      cos_t[t * half + i] = std::cos(angle);
      sin_t[t * half + i] = sign * std::sin(angle);
    }
  dispatch_floating(x, "rope", [&]<typename T>() {
    const T* px = x.data<T>();  // [B, T, H, D]
    T* py = out.data<T>();      // [B, T, H, D]
#pragma omp parallel for collapse(2) schedule(static) if (B * T_ * H * D > 65536)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t off = ((b * T_ + t) * H + h) * D;
          const double *cs = cos_t.data() + t * half, *sn = sin_t.data() + t * half;
          for (int64_t i = 0; i < half; ++i) {
            const double x1 = px[off + i], x2 = px[off + i + half];
            py[off + i] = T(x1 * cs[i] - x2 * sn[i]);
            py[off + i + half] = T(x2 * cs[i] + x1 * sn[i]);
          }
        }
  });
}

}  // namespace nha
