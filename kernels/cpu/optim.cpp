// CPU optimizer kernels: AdamW.
#include <cmath>

#include "kernels/cpu/cpu_backend.h"

namespace nha {

// AdamW with decoupled weight decay and bias correction (the math is in kernels/backend.h).
// Element-wise, computed in double and stored back in the tensors' dtype (f32 or f64). The weight
// decay term uses the parameter value from before this step, as in the documented formula.
void CpuBackend::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            int64_t step) {
  check_same_shape(grad, param, "adamw_step grad");
  check_same_shape(m, param, "adamw_step m");
  check_same_shape(v, param, "adamw_step v");
  NHA_CHECK(grad.dtype() == param.dtype() && m.dtype() == param.dtype() &&
            v.dtype() == param.dtype())
      << "adamw_step on the cpu wants param, grad, m, v of one dtype, got " << param.str() << ", "
      << grad.str() << ", " << m.str() << ", " << v.str();
  NHA_CHECK(step >= 1) << "adamw_step: step counts from 1, got " << step;
  const double bc1 = 1.0 - std::pow(beta1, double(step));  // bias corrections
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  dispatch_floating(param, "adamw_step", [&]<typename T>() {
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    T* pm = m.data<T>();
    T* pv = v.data<T>();
    const int64_t n = param.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      const double gi = double(g[i]);
      const double mi = beta1 * double(pm[i]) + (1.0 - beta1) * gi;
      const double vi = beta2 * double(pv[i]) + (1.0 - beta2) * gi * gi;
      const double pi = double(p[i]);
      const double update = (mi / bc1) / (std::sqrt(vi / bc2) + eps) + weight_decay * pi;
      pm[i] = T(mi);
      pv[i] = T(vi);
      p[i] = T(pi - lr * update);
    }
  });
}

}  // namespace nha
