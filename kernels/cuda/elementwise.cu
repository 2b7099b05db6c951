// CUDA elementwise ops: add, mul, scale, SiLU and SwiGLU (forward and backward), AdamW (per tensor
// and over flat buffers).
//
// One generic kernel maps an f32 functor over NIN input and NOUT output arrays of one dtype
// (f32 or bf16): 16-byte loads/stores (4 f32 or 8 bf16 per access) when every pointer is 16-byte
// aligned, else element by element; the math is always f32. Outputs may alias inputs (in-place
// updates): each element is read and written by the same thread. The flat AdamW has its own kernel
// (a segment table instead of one range) around the same AdamW functor.
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

// The functor for one step: bias corrections bc1 = 1 - b1^step, bc2 = 1 - b2^step.
AdamWOp adamw_op(double lr, double beta1, double beta2, double eps, double weight_decay,
                 int64_t step) {
  NHA_CHECK(step >= 1) << "adamw_step: step counts from 1, got " << step;
  const double bc1 = 1.0 - std::pow(beta1, double(step));
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  return {float(lr),           float(beta1),     float(beta2),    float(eps),
          float(weight_decay), float(1.0 / bc1), float(1.0 / bc2)};
}

// ---- AdamW over flat buffers --------------------------------------------------------------------
// The elements of all segments are cut into chunks of kAdamWChunk: segment s holds
// ceil(numel_s / kAdamWChunk) chunks, numbered on from the previous segment's. Block b updates
// chunks b, b + G, b + 2G, ... (G = gridDim.x), finding them by walking the segment table (every
// block reads all S rows: a few KB from L2, against MBs of parameters per block).
constexpr int64_t kAdamWChunk = 4096;
constexpr int kAdamWThreads = 256;

__device__ __forceinline__ bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// AdamW on elements [j0, j1) of p, g, m, v (f32) with `op`; COPY: copy[j] = bf16(new p[j]).
// Packs of 4 (16-byte f32 loads, 8-byte bf16 stores) when every array is aligned at j0.
template <bool COPY>
__device__ void adamw_flat_range(float* __restrict__ p, const float* __restrict__ g,
                                 float* __restrict__ m, float* __restrict__ v,
                                 bf16_t* __restrict__ copy, int64_t j0, int64_t j1,
                                 const AdamWOp& op) {
  int64_t tail = j0;  // first element of the element-by-element part
  if (aligned_to(p + j0, 16) && aligned_to(g + j0, 16) && aligned_to(m + j0, 16) &&
      aligned_to(v + j0, 16) && (!COPY || aligned_to(copy + j0, 8))) {
    const int64_t packs = (j1 - j0) / 4;
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
      const int64_t j = j0 + 4 * k;
      Pack<float, 4> pp = load_pack<float, 4>(p + j), mp = load_pack<float, 4>(m + j),
                     vp = load_pack<float, 4>(v + j);
      const Pack<float, 4> gp = load_pack<float, 4>(g + j);
      [[maybe_unused]] Pack<bf16_t, 4> cp;  // the copy's pack (COPY only)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x[4] = {pp.v[e], gp.v[e], mp.v[e], vp.v[e]};
        float y[3];
        op(x, y);
        pp.v[e] = y[0];
        mp.v[e] = y[1];
        vp.v[e] = y[2];
        if constexpr (COPY) cp.v[e] = from_f32<bf16_t>(y[0]);
      }
      store_pack<float, 4>(p + j, pp);
      store_pack<float, 4>(m + j, mp);
      store_pack<float, 4>(v + j, vp);
      if constexpr (COPY) store_pack<bf16_t, 4>(copy + j, cp);
    }
    tail = j0 + 4 * packs;
  }
  for (int64_t j = tail + threadIdx.x; j < j1; j += blockDim.x) {
    const float x[4] = {p[j], g[j], m[j], v[j]};
    float y[3];
    op(x, y);
    p[j] = y[0];
    m[j] = y[1];
    v[j] = y[2];
    if constexpr (COPY) copy[j] = from_f32<bf16_t>(y[0]);
  }
}

// p, g, m, v [total] f32; copy [total] bf16 (COPY) or null; segments [S, 3] i64 (offset, numel,
// decay): weight decay op.wd where decay != 0, else 0. A row reaching outside [0, total) is
// clipped to it (AdamW builds the rows from its own layout; the CPU backend checks them), so no
// row can write outside the buffers.
template <bool COPY>
__global__ void adamw_flat_kernel(float* __restrict__ p, const float* __restrict__ g,
                                  float* __restrict__ m, float* __restrict__ v,
                                  bf16_t* __restrict__ copy, const int64_t* __restrict__ segments,
                                  int64_t S, int64_t total, AdamWOp op) {
  const int64_t G = gridDim.x, b = blockIdx.x;
  int64_t first = 0;  // number of segment s's first chunk
  for (int64_t s = 0; s < S; ++s) {
    const int64_t off = max(int64_t(0), segments[3 * s]);
    const int64_t n = max(int64_t(0), min(segments[3 * s + 1], total - off));
    const int64_t chunks = (n + kAdamWChunk - 1) / kAdamWChunk;
    AdamWOp o = op;
    o.wd = segments[3 * s + 2] != 0 ? op.wd : 0.f;
    // This block's chunks of the segment: numbers c >= first with c = b (mod G).
    for (int64_t c = first + ((b - first) % G + G) % G; c < first + chunks; c += G) {
      const int64_t j0 = off + (c - first) * kAdamWChunk;
      adamw_flat_range<COPY>(p, g, m, v, copy, j0, min(off + n, j0 + kAdamWChunk), o);
    }
    first += chunks;
  }
}

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
  const AdamWOp op = adamw_op(lr, beta1, beta2, eps, weight_decay, step);
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

void CudaBackend::adamw_step_flat(Tensor& params, const Tensor& grads, Tensor& m, Tensor& v,
                                  Tensor& copy, const Tensor& segments, double lr, double beta1,
                                  double beta2, double eps, double weight_decay, int64_t step) {
  const char* op_name = "adamw_step_flat";
  const int dev = check_elementwise(op_name, params, {&grads, &m, &v});
  check_dtype_is(params, DType::F32, op_name, "params (fp32 master weights)");
  NHA_CHECK(params.dim() == 1) << op_name << ": params must be flat, got " << params.str();
  check_cuda_tensor(segments, dev, op_name, "segments");
  check_dtype_is(segments, DType::I64, op_name, "segments");
  NHA_CHECK(segments.dim() == 2 && segments.size(1) == 3)
      << op_name << ": segments must be [S, 3] (offset, numel, decay), got " << segments.str();
  if (copy.defined()) {
    check_cuda_tensor(copy, dev, op_name, "copy");
    check_dtype_is(copy, DType::BF16, op_name, "copy");
    check_same_shape(copy, params, op_name);
  }
  const AdamWOp op = adamw_op(lr, beta1, beta2, eps, weight_decay, step);
  const int64_t S = segments.size(0), total = params.numel();
  if (S == 0) return;
  DeviceGuard guard(dev);
  // Enough blocks for every chunk when the buffers are small (at most total / chunk + S chunks),
  // else 8 per SM, each taking several chunks.
  const int64_t chunks = total / kAdamWChunk + S;
  const int blocks = int(std::max<int64_t>(
      1, std::min<int64_t>(chunks, 8 * int64_t(device_properties(dev).multiProcessorCount))));
  float* p = static_cast<float*>(params.data_ptr());
  const float* g = static_cast<const float*>(grads.data_ptr());
  float *pm = static_cast<float*>(m.data_ptr()), *pv = static_cast<float*>(v.data_ptr());
  const int64_t* seg = static_cast<const int64_t*>(segments.data_ptr());
  cudaStream_t st = current_stream(dev);
  if (copy.defined())
    adamw_flat_kernel<true><<<blocks, kAdamWThreads, 0, st>>>(
        p, g, pm, pv, static_cast<bf16_t*>(copy.data_ptr()), seg, S, total, op);
  else
    adamw_flat_kernel<false><<<blocks, kAdamWThreads, 0, st>>>(p, g, pm, pv, nullptr, seg, S,
                                                               total, op);
  CUDA_CHECK_LAUNCH();
}

}  // namespace nha
