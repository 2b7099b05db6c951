// CPU optimizer kernels: AdamW, per tensor and over flat buffers (multi-tensor).
#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

namespace {

// The step's constants: bias corrections bc1 = 1 - b1^step, bc2 = 1 - b2^step.
struct AdamWConstants {
  double lr, b1, b2, eps, bc1, bc2;
};

AdamWConstants adamw_constants(double lr, double beta1, double beta2, double eps, int64_t step) {
  NHA_CHECK(step >= 1) << "adamw_step: step counts from 1, got " << step;
  return {lr, beta1, beta2, eps, 1.0 - std::pow(beta1, double(step)),
          1.0 - std::pow(beta2, double(step))};
}

// One element of AdamW (the math is in kernels/backend.h), computed in double and stored back in
// T. The weight decay term uses the parameter value from before this step, as in the formula.
template <typename T>
inline void adamw_element(T& p, T& m, T& v, double g, const AdamWConstants& k, double wd) {
  const double mi = k.b1 * double(m) + (1.0 - k.b1) * g;
  const double vi = k.b2 * double(v) + (1.0 - k.b2) * g * g;
  const double pi = double(p);
  const double update = (mi / k.bc1) / (std::sqrt(vi / k.bc2) + k.eps) + wd * pi;
  m = T(mi);
  v = T(vi);
  p = T(pi - k.lr * update);
}

}  // namespace

// Element-wise over one tensor; param, grad, m, v of one dtype (f32 or f64).
void CpuBackend::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            int64_t step) {
  NHA_PROFILE_SCOPE("adamw_step");
  check_same_shape(grad, param, "adamw_step grad");
  check_same_shape(m, param, "adamw_step m");
  check_same_shape(v, param, "adamw_step v");
  NHA_CHECK(grad.dtype() == param.dtype() && m.dtype() == param.dtype() &&
            v.dtype() == param.dtype())
      << "adamw_step on the cpu wants param, grad, m, v of one dtype, got " << param.str() << ", "
      << grad.str() << ", " << m.str() << ", " << v.str();
  const AdamWConstants k = adamw_constants(lr, beta1, beta2, eps, step);
  dispatch_floating(param, "adamw_step", [&]<typename T>() {
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    T* pm = m.data<T>();
    T* pv = v.data<T>();
    const int64_t n = param.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i)
      adamw_element(p[i], pm[i], pv[i], double(g[i]), k, weight_decay);
  });
}

// The same element update over segments of flat buffers (kernels/backend.h), so a flat step gives
// exactly the per-tensor steps' bits:
//   params, grads, m, v [total] (f32 or f64); segments [S, 3] i64 (offset, numel, decay);
//   copy [total] bf16 or undefined: copy[j] = bf16(params[j]) after the update, for updated j.
void CpuBackend::adamw_step_flat(Tensor& params, const Tensor& grads, Tensor& m, Tensor& v,
                                 Tensor& copy, const Tensor& segments, double lr, double beta1,
                                 double beta2, double eps, double weight_decay, int64_t step) {
  NHA_PROFILE_SCOPE("adamw_step_flat");
  const int64_t total = params.numel();
  for (const Tensor* t : std::initializer_list<const Tensor*>{&grads, &m, &v})
    NHA_CHECK(t->dim() == 1 && t->numel() == total && t->dtype() == params.dtype())
        << "adamw_step_flat: grads, m, v must be flat like params " << params.str() << ", got "
        << t->str();
  NHA_CHECK(params.dim() == 1) << "adamw_step_flat: params must be flat, got " << params.str();
  NHA_CHECK(segments.dim() == 2 && segments.size(1) == 3 && segments.dtype() == DType::I64)
      << "adamw_step_flat: segments must be i64 [S, 3] (offset, numel, decay), got "
      << segments.str();
  NHA_CHECK(!copy.defined() || (copy.dtype() == DType::BF16 && params.dtype() == DType::F32 &&
                                copy.dim() == 1 && copy.numel() == total))
      << "adamw_step_flat: the copy must be bf16 [" << total << "] of f32 params, got "
      << copy.str() << " for " << params.str();
  const AdamWConstants k = adamw_constants(lr, beta1, beta2, eps, step);
  const int64_t S = segments.size(0);
  const int64_t* seg = segments.data<int64_t>();  // [S, 3]
  for (int64_t s = 0; s < S; ++s)
    NHA_CHECK(seg[3 * s] >= 0 && seg[3 * s + 1] >= 0 && seg[3 * s] + seg[3 * s + 1] <= total)
        << "adamw_step_flat: segment " << s << " (offset " << seg[3 * s] << ", numel "
        << seg[3 * s + 1] << ") is outside the buffers of " << total << " elements";
  bf16* pc = copy.defined() ? copy.data<bf16>() : nullptr;  // [total] or null
  dispatch_floating(params, "adamw_step_flat", [&]<typename T>() {
    T* p = params.data<T>();
    const T* g = grads.data<T>();
    T* pm = m.data<T>();
    T* pv = v.data<T>();
    for (int64_t s = 0; s < S; ++s) {
      const int64_t off = seg[3 * s], n = seg[3 * s + 1];
      const double wd = seg[3 * s + 2] != 0 ? weight_decay : 0.0;
#pragma omp parallel for schedule(static) if (n > 65536)
      for (int64_t j = off; j < off + n; ++j) {
        adamw_element(p[j], pm[j], pv[j], double(g[j]), k, wd);
        if constexpr (std::is_same_v<T, float>)
          if (pc) pc[j] = bf16(p[j]);
      }
    }
  });
}

}  // namespace nha
