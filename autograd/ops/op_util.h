// Small helpers shared by the op files (autograd/ops/*.cpp).
#pragma once
#include <vector>

#include "autograd/node.h"
#include "core/tensor.h"
#include "kernels/backend.h"

namespace nha::ops_detail {

// A new contiguous tensor like `t` (shape, dtype, device).
inline Tensor empty_like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype(), t.device()); }

// The dtype of statistics and losses computed from `t` (rstd, per-row losses): f32 for bf16 inputs,
// else t's own (docs/training.md, "Mixed precision": fp32 statistics and loss under bf16).
inline DType stats_dtype(const Tensor& t) {
  return t.dtype() == DType::BF16 ? DType::F32 : t.dtype();
}

// Records `node` as the producer of `out` when any input requires grad. Returns whether it did.
template <typename NodeT>
bool record(const std::shared_ptr<NodeT>& node, const std::vector<Tensor>& inputs, Tensor& out) {
  if (!autograd::any_requires_grad(inputs)) return false;
  std::vector<Tensor> outs{out};
  autograd::attach(node, inputs, outs);
  return true;
}

// Checks that all tensors sit on the device of the first one.
inline void check_same_device(const std::vector<Tensor>& ts, const char* op) {
  for (const Tensor& t : ts)
    NHA_CHECK(t.device() == ts[0].device())
        << op << ": inputs on different devices (" << ts[0].str() << " and " << t.str() << ")";
}

}  // namespace nha::ops_detail
