// Mixed precision: autocast, PyTorch's torch.autocast in small.
//
// The trainer keeps fp32 master parameters and, on the GPU with train.precision bf16, runs each
// forward pass under an AutocastGuard(DType::BF16). While the guard is alive (on this thread):
//   linear / matmul   cast both operands to the autocast dtype: GEMMs and everything fed by them
//                     (RoPE, attention, NHA, SwiGLU, the logits) run in bf16;
//   embedding         casts its output (the table stays fp32), so the residual stream is bf16;
//   rmsnorm           casts x and the gain (the kernel computes in fp32 internally; rstd is fp32).
// Every cast is the differentiable Tensor::to(dtype): the backward casts the gradient back, so the
// gradients that reach the fp32 master parameters are fp32 and accumulate in fp32 over
// micro-batches; AdamW and its moments stay fp32. The loss is fp32 (cross-entropy of bf16 logits
// returns an fp32 loss, see docs/cuda.md "Dtype rules").
// Outside a guard, or with the guard's dtype equal to the tensors' own, nothing is cast.
// f64 tensors (float64 gradient checks) and integer tensors are never cast.
// Weights need not be cast in every forward: the trainer's AdamW keeps a bf16 copy of its fp32
// masters, which autocast uses while it is current (WeightCopies below).
#pragma once
#include <cstdint>
#include <memory>
#include <unordered_map>

#include "core/dtype.h"
#include "core/tensor.h"

namespace nha {

class AutocastGuard {
 public:
  // dtype F32 turns autocast off in the scope (e.g. inside a region that must stay fp32).
  explicit AutocastGuard(DType dtype);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool prev_enabled_;
  DType prev_dtype_;
};

// Whether autocast is on for this thread, and its compute dtype.
bool autocast_enabled();
DType autocast_dtype();

// t.to(autocast dtype) when autocast is on and t is an f32/bf16 tensor of another dtype; else t.
// When a registered WeightCopies set holds a current copy of t in that dtype, the copy instead
// (through cast_alias, autograd/ops.h: same values, same gradient).
Tensor autocast(const Tensor& t);

// Copies of fp32 master weights in a compute dtype, kept by their owner (AdamW writes a flat bf16
// copy in its update kernel, train/optim.h) and used by autocast() instead of casting the masters
// in every forward. A copy is used only while it is current: while its master's storage is the
// one, at the version, recorded by the last mark_current(). Any other write to a master
// (checkpoint loading, copy_, Module::to) makes autocast cast as usual until the owner writes the
// copies again and calls mark_current(). Sets are registered process-wide for their lifetime;
// the training thread that owns them is the one that runs the forward passes.
class WeightCopies {
 public:
  WeightCopies();  // registers the set
  ~WeightCopies();  // unregisters it
  WeightCopies(const WeightCopies&) = delete;
  WeightCopies& operator=(const WeightCopies&) = delete;

  // Adds the copy of `master` (an f32 tensor): same shape and device, the compute dtype. The set
  // holds both tensors.
  void add(const Tensor& master, const Tensor& copy);
  // The owner has just written every copy from its master's current values.
  void mark_current();
  // Whether every copy is current (false when a master was written since mark_current()).
  bool current() const;
  // The current copy of `master` in `dtype`, or an undefined tensor.
  Tensor find(const Tensor& master, DType dtype) const;

 private:
  struct Entry {
    Tensor master, copy;
    std::shared_ptr<Storage> storage;  // the master's storage at mark_current() (held: no reuse)
    uint64_t version = 0;              // and its version then
    bool fresh() const;
  };
  std::unordered_map<const TensorImpl*, Entry> entries_;  // by the master's impl
};

}  // namespace nha
