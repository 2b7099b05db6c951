// CUDA elementwise ops: add, mul, scale, SiLU and SwiGLU (forward and backward), AdamW.
//
// One generic kernel maps an f32 functor over NIN input and NOUT output arrays of one dtype
// (f32 or bf16): 16-byte loads/stores (4 f32 or 8 bf16 per access) when every pointer is 16-byte
// aligned, else element by element; the math is always f32. Outputs may alias inputs (in-place
// updates): each element is read and written by the same thread.
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace nha {

using namespace cuda;

namespace {

template <typename T, int NIN, int NOUT>
struct Arrays {
  const T* in[NIN];
  T* out[NOUT];
};

// for i < n: (out_0[i], ..) = op(in_0[i], ..), op works on f32 values
template <typename T, int VEC, int NIN, int NOUT, typename Op>
__global__ void nary_kernel(int64_t n, Op op, Arrays<T, NIN, NOUT> a) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    Pack<T, VEC> in[NIN], out[NOUT];
#pragma unroll
    for (int k = 0; k < NIN; ++k) in[k] = load_pack<T, VEC>(a.in[k] + i * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float x[NIN], y[NOUT];
#pragma unroll
      for (int k = 0; k < NIN; ++k) x[k] = to_f32(in[k].v[e]);
      op(x, y);
#pragma unroll
      for (int k = 0; k < NOUT; ++k) out[k].v[e] = from_f32<T>(y[k]);
    }
#pragma unroll
    for (int k = 0; k < NOUT; ++k) store_pack<T, VEC>(a.out[k] + i * VEC, out[k]);
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {  // tail (VEC > 1 only)
    float x[NIN], y[NOUT];
#pragma unroll
    for (int k = 0; k < NIN; ++k) x[k] = to_f32(a.in[k][i]);
    op(x, y);
#pragma unroll
    for (int k = 0; k < NOUT; ++k) a.out[k][i] = from_f32<T>(y[k]);
  }
}

template <typename T, int NIN, int NOUT, typename Op>
void launch_nary(int dev, int64_t n, const Op& op, Arrays<T, NIN, NOUT> a) {
  if (n == 0) return;
  bool vec = true;
  for (int k = 0; k < NIN; ++k) vec = vec && aligned16(a.in[k]);
  for (int k = 0; k < NOUT; ++k) vec = vec && aligned16(a.out[k]);
  constexpr int kThreads = 256;
  cudaStream_t st = current_stream(dev);
  if (vec) {
    constexpr int V = kVec16<T>;
    const int64_t work = n / V > 0 ? n / V : 1;
    nary_kernel<T, V, NIN, NOUT, Op><<<grid_for(work, kThreads), kThreads, 0, st>>>(n, op, a);
  } else {
    nary_kernel<T, 1, NIN, NOUT, Op><<<grid_for(n, kThreads), kThreads, 0, st>>>(n, op, a);
  }
  CUDA_CHECK_LAUNCH();
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// ---- functors (the math of each op, on f32) ------------------------------------------------------
struct AddOp {  // out = alpha a + beta b
  float alpha, beta;
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const {
    y[0] = alpha * x[0] + beta * x[1];
  }
};
struct MulOp {  // out = a b
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const { y[0] = x[0] * x[1]; }
};
struct ScaleOp {  // out = s a
  float s;
  __device__ void operator()(const float (&x)[1], float (&y)[1]) const { y[0] = s * x[0]; }
};
struct SiluFwdOp {  // out = x sigmoid(x)
  __device__ void operator()(const float (&x)[1], float (&y)[1]) const {
    y[0] = x[0] * sigmoidf_(x[0]);
  }
};
struct SiluBwdOp {  // dx = dout s (1 + x (1 - s)), s = sigmoid(x);  inputs (dout, x)
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const {
    const float s = sigmoidf_(x[1]);
    y[0] = x[0] * s * (1.f + x[1] * (1.f - s));
  }
};
struct SwigluFwdOp {  // out = silu(gate) up;  inputs (gate, up)
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const {
    y[0] = x[0] * sigmoidf_(x[0]) * x[1];
  }
};
struct SwigluBwdOp {  // dgate = dout up silu'(gate), dup = dout silu(gate);  inputs (dout, gate, up)
  __device__ void operator()(const float (&x)[3], float (&y)[2]) const {
    const float g = x[1], s = sigmoidf_(g);
    y[0] = x[0] * x[2] * s * (1.f + g * (1.f - s));
    y[1] = x[0] * g * s;
  }
};
// AdamW, inputs (p, g, m, v), outputs (p, m, v):
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr ((m/bc1) / (sqrt(v/bc2) + eps) + wd p)
struct AdamWOp {
  float lr, b1, b2, eps, wd, inv_bc1, inv_bc2;
  __device__ void operator()(const float (&x)[4], float (&y)[3]) const {
    const float p = x[0], g = x[1];
    const float m = b1 * x[2] + (1.f - b1) * g;
    const float v = b2 * x[3] + (1.f - b2) * g * g;
    const float update = (m * inv_bc1) / (sqrtf(v * inv_bc2) + eps) + wd * p;
    y[0] = p - lr * update;
    y[1] = m;
    y[2] = v;
  }
};

// Common checks: every tensor on `out`'s device, contiguous, same shape and dtype as `out`.
int check_elementwise(const char* op, const Tensor& out, std::initializer_list<const Tensor*> ins) {
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, op, "out");
  for (const Tensor* t : ins) {
    check_cuda_tensor(*t, dev, op, "input");
    check_same_shape(out, *t, op);
    NHA_CHECK(t->dtype() == out.dtype()) << op << ": dtypes differ, " << t->str() << " vs "
                                         << out.str();
  }
  return dev;
}

}  // namespace

void CudaBackend::add(Tensor& out, const Tensor& a, const Tensor& b, double alpha, double beta) {
  const int dev = check_elementwise("add", out, {&a, &b});
  DeviceGuard guard(dev);
  dispatch_f32_bf16(out, "add", [&]<typename T>() {
    launch_nary<T, 2, 1>(dev, out.numel(), AddOp{float(alpha), float(beta)},
                         {{static_cast<const T*>(a.data_ptr()), static_cast<const T*>(b.data_ptr())},
                          {static_cast<T*>(out.data_ptr())}});
  });
}

void CudaBackend::mul(Tensor& out, const Tensor& a, const Tensor& b) {
  const int dev = check_elementwise("mul", out, {&a, &b});
  DeviceGuard guard(dev);
  dispatch_f32_bf16(out, "mul", [&]<typename T>() {
    launch_nary<T, 2, 1>(dev, out.numel(), MulOp{},
                         {{static_cast<const T*>(a.data_ptr()), static_cast<const T*>(b.data_ptr())},
                          {static_cast<T*>(out.data_ptr())}});
  });
}

void CudaBackend::scale(Tensor& out, const Tensor& a, double s) {
  const int dev = check_elementwise("scale", out, {&a});
  DeviceGuard guard(dev);
  dispatch_f32_bf16(out, "scale", [&]<typename T>() {
    launch_nary<T, 1, 1>(dev, out.numel(), ScaleOp{float(s)},
                         {{static_cast<const T*>(a.data_ptr())}, {static_cast<T*>(out.data_ptr())}});
  });
}

void CudaBackend::silu_forward(Tensor& out, const Tensor& x) {
  const int dev = check_elementwise("silu_forward", out, {&x});
  DeviceGuard guard(dev);
  dispatch_f32_bf16(out, "silu_forward", [&]<typename T>() {
    launch_nary<T, 1, 1>(dev, out.numel(), SiluFwdOp{},
                         {{static_cast<const T*>(x.data_ptr())}, {static_cast<T*>(out.data_ptr())}});
  });
}

void CudaBackend::silu_backward(Tensor& dx, const Tensor& dout, const Tensor& x) {
  const int dev = check_elementwise("silu_backward", dx, {&dout, &x});
  DeviceGuard guard(dev);
  dispatch_f32_bf16(dx, "silu_backward", [&]<typename T>() {
    launch_nary<T, 2, 1>(
        dev, dx.numel(), SiluBwdOp{},
        {{static_cast<const T*>(dout.data_ptr()), static_cast<const T*>(x.data_ptr())},
         {static_cast<T*>(dx.data_ptr())}});
  });
}

void CudaBackend::swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up) {
  const int dev = check_elementwise("swiglu_forward", out, {&gate, &up});
  DeviceGuard guard(dev);
  dispatch_f32_bf16(out, "swiglu_forward", [&]<typename T>() {
    launch_nary<T, 2, 1>(
        dev, out.numel(), SwigluFwdOp{},
        {{static_cast<const T*>(gate.data_ptr()), static_cast<const T*>(up.data_ptr())},
         {static_cast<T*>(out.data_ptr())}});
  });
}

void CudaBackend::swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout,
                                  const Tensor& gate, const Tensor& up) {
  const int dev = check_elementwise("swiglu_backward", dgate, {&dup, &dout, &gate, &up});
  DeviceGuard guard(dev);
  dispatch_f32_bf16(dgate, "swiglu_backward", [&]<typename T>() {
    launch_nary<T, 3, 2>(dev, dgate.numel(), SwigluBwdOp{},
                         {{static_cast<const T*>(dout.data_ptr()),
                           static_cast<const T*>(gate.data_ptr()),
                           static_cast<const T*>(up.data_ptr())},
                          {static_cast<T*>(dgate.data_ptr()), static_cast<T*>(dup.data_ptr())}});
  });
}

void CudaBackend::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr,
                             double beta1, double beta2, double eps, double weight_decay,
                             int64_t step) {
  const int dev = check_elementwise("adamw_step", param, {&grad, &m, &v});
  NHA_CHECK(step >= 1) << "adamw_step: step counts from 1, got " << step;
  const double bc1 = 1.0 - std::pow(beta1, double(step));  // bias corrections
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  const AdamWOp op{float(lr),           float(beta1),     float(beta2),    float(eps),
                   float(weight_decay), float(1.0 / bc1), float(1.0 / bc2)};
  DeviceGuard guard(dev);
  dispatch_f32_bf16(param, "adamw_step", [&]<typename T>() {
    launch_nary<T, 4, 3>(
        dev, param.numel(), op,
        {{static_cast<const T*>(param.data_ptr()), static_cast<const T*>(grad.data_ptr()),
          static_cast<const T*>(m.data_ptr()), static_cast<const T*>(v.data_ptr())},
         {static_cast<T*>(param.data_ptr()), static_cast<T*>(m.data_ptr()),
          static_cast<T*>(v.data_ptr())}});
  });
}

}  // namespace nha
