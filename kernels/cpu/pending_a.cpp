// TEMPORARY: placeholders until the op-family files land (helper A deletes this file).
#include "kernels/cpu/cpu_backend.h"
namespace nha {
#define PENDING(op) NHA_FAIL() << #op " pending"
void CpuBackend::embedding_forward(Tensor&, const Tensor&, const Tensor&) { PENDING(embedding_forward); }
void CpuBackend::embedding_backward(Tensor&, const Tensor&, const Tensor&) { PENDING(embedding_backward); }
void CpuBackend::rmsnorm_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, double) { PENDING(rmsnorm_forward); }
void CpuBackend::rmsnorm_backward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) { PENDING(rmsnorm_backward); }
void CpuBackend::rope(Tensor&, const Tensor&, double, int64_t, bool) { PENDING(rope); }
void CpuBackend::silu_forward(Tensor&, const Tensor&) { PENDING(silu_forward); }
void CpuBackend::silu_backward(Tensor&, const Tensor&, const Tensor&) { PENDING(silu_backward); }
void CpuBackend::swiglu_forward(Tensor&, const Tensor&, const Tensor&) { PENDING(swiglu_forward); }
void CpuBackend::swiglu_backward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&) { PENDING(swiglu_backward); }
void CpuBackend::softmax_forward(Tensor&, const Tensor&) { PENDING(softmax_forward); }
void CpuBackend::softmax_backward(Tensor&, const Tensor&, const Tensor&) { PENDING(softmax_backward); }
void CpuBackend::cross_entropy_forward(Tensor&, const Tensor&, const Tensor&, int64_t) { PENDING(cross_entropy_forward); }
void CpuBackend::cross_entropy_backward(Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t) { PENDING(cross_entropy_backward); }
}  // namespace nha
