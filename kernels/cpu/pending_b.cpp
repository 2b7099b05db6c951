// TEMPORARY: placeholders until the op-family files land (helper B deletes this file).
#include "kernels/cpu/cpu_backend.h"
namespace nha {
#define PENDING(op) NHA_FAIL() << #op " pending"
void CpuBackend::attention_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t) { PENDING(attention_forward); }
void CpuBackend::attention_backward(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t) { PENDING(attention_backward); }
void CpuBackend::adamw_step(Tensor&, const Tensor&, Tensor&, Tensor&, double, double, double, double, double, int64_t) { PENDING(adamw_step); }
}  // namespace nha
