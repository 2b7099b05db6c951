// CUDA rotary position embedding (rotate-half / NeoX layout); inverse = the backward.
//
// For position p = start_pos + t and i < D/2, angle = p * base^(-2i/D) (negated if inverse):
//   out[b,t,h,i]       = x[b,t,h,i] cos(angle) - x[b,t,h,i + D/2] sin(angle)
//   out[b,t,h,i + D/2] = x[b,t,h,i + D/2] cos(angle) + x[b,t,h,i] sin(angle)
//   x, out [B, T, H, D] (f32 or bf16; out may alias x)
// The angle and its cos/sin are computed in double, once per thread, exactly as the CPU does:
// positions reach 1e4..1e5 radians, where an f32 angle would be off by ~1e-3. A thread owns one
// (t, i) pair of one batch row and applies it to every head.
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace nha {

using namespace cuda;

namespace {

template <typename T>
__global__ void rope_kernel(T* out, const T* x, int64_t T_, int64_t H, int64_t D, double base,
                            int64_t start_pos, double sign) {
  const int64_t half = D / 2;
  const int64_t pair = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;  // (t, i)
  if (pair >= T_ * half) return;
  const int64_t t = pair / half, i = pair % half, b = blockIdx.y;
  const double angle = double(start_pos + t) * pow(base, -2.0 * double(i) / double(D));
  double s, c;
  sincos(angle, &s, &c);
  const double sn = sign * s;
  for (int64_t h = 0; h < H; ++h) {
    const int64_t off = ((b * T_ + t) * H + h) * D;
    const double x1 = to_f32(x[off + i]), x2 = to_f32(x[off + i + half]);
    out[off + i] = from_f32<T>(float(x1 * c - x2 * sn));
    out[off + i + half] = from_f32<T>(float(x2 * c + x1 * sn));
  }
}

}  // namespace

void CudaBackend::rope(Tensor& out, const Tensor& x, double base, int64_t start_pos, bool inverse) {
  const int dev = x.device().index;
  check_cuda_tensor(out, dev, "rope", "out");
  check_cuda_tensor(x, dev, "rope", "x");
  NHA_CHECK(x.dim() == 4) << "rope wants x [B, T, H, D], got " << x.str();
  check_same_shape(out, x, "rope");
  NHA_CHECK(out.dtype() == x.dtype()) << "rope: dtypes differ, " << out.str() << " vs " << x.str();
  const int64_t B = x.size(0), T_ = x.size(1), H = x.size(2), D = x.size(3);
  NHA_CHECK(D % 2 == 0) << "rope: head dim " << D << " of " << x.str()
                        << " is odd. HINT: pick model.d / model.heads even";
  if (x.numel() == 0) return;
  NHA_CHECK(B <= 65535) << "rope: batch " << B << " too large for one launch";
  DeviceGuard guard(dev);
  const int64_t pairs = T_ * (D / 2);
  const dim3 grid(unsigned((pairs + 255) / 256), unsigned(B));
  dispatch_f32_bf16(x, "rope", [&]<typename T>() {
    rope_kernel<T><<<grid, 256, 0, current_stream(dev)>>>(
        static_cast<T*>(out.data_ptr()), static_cast<const T*>(x.data_ptr()), T_, H, D, base,
        start_pos, inverse ? -1.0 : 1.0);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace nha
