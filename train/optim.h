// The optimizer: AdamW over a list of named parameters, and global gradient-norm clipping.
//
//   std::vector<ParamEntry> entries = {{"wte", wte, false}, {"blocks.0.wq", wq, true}, ...};
//   AdamW opt(entries, {.lr = 3e-4, .weight_decay = 0.01});
//   ... loss.backward();
//   double norm = clip_grad_norm(params, 1.0);
//   opt.step(lr_schedule(step));
//   opt.zero_grad();
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace nha {

// One parameter handed to the optimizer. `name` keys its state in checkpoints; `decay` says
// whether weight decay applies (the usual choice: matrices yes, norms/biases/embeddings no).
struct ParamEntry {
  std::string name;
  Tensor param;
  bool decay = true;
};

// AdamW hyper-parameters. `lr` is the default for step(); a schedule passes its own to step(lr).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// AdamW (decoupled weight decay, bias-corrected; the math is Backend::adamw_step in
// kernels/backend.h). Keeps per parameter the first and second moments m and v: zero-initialized,
// same shape and device as the parameter, dtype f32 (f64 for f64 parameters, so float64 tests stay
// exact). One step counter is shared by all parameters (like llm.c): it counts calls to step(), and
// bias correction uses it also for a parameter that had no gradient in earlier steps.
class AdamW {
 public:
  AdamW(std::vector<ParamEntry> params, AdamWOptions options);

  // One update with learning rate `lr`, under autograd::NoGradGuard: increments the step counter,
  // then for every parameter whose grad() is defined runs Backend::adamw_step (weight decay
  // options.weight_decay where entry.decay, else 0). Parameters without a gradient are left alone
  // (their moments too). Parameters are updated in place (their storage version is bumped, so a
  // graph that saved them before the step refuses to run backward afterwards).
  void step(double lr);
  void step() { step(options_.lr); }
  // Resets every parameter's grad to undefined (the next backward allocates it afresh).
  void zero_grad();

  // ---- state, for checkpoints ------------------------------------------------------------------
  const std::vector<ParamEntry>& params() const { return params_; }
  const AdamWOptions& options() const { return options_; }
  AdamWOptions& options() { return options_; }
  // Number of step() calls so far (0 before the first; the first step uses 1 in bias correction).
  int64_t step_count() const { return step_; }
  void set_step_count(int64_t step);
  // Moments of parameter i (same order as params()). Restore a checkpoint with m(i).copy_(saved).
  Tensor& m(size_t i) { return m_.at(i); }
  Tensor& v(size_t i) { return v_.at(i); }
  const Tensor& m(size_t i) const { return m_.at(i); }
  const Tensor& v(size_t i) const { return v_.at(i); }
  // Index of the parameter named `name`; fails with a message when there is none.
  size_t index_of(const std::string& name) const;

 private:
  std::vector<ParamEntry> params_;
  AdamWOptions options_;
  std::vector<Tensor> m_, v_;
  int64_t step_ = 0;
};

// Global gradient-norm clipping (PyTorch's clip_grad_norm_). Returns the total L2 norm
// sqrt(sum over params of sum(grad^2)) of the gradients that are defined (Backend::sum_squares per
// tensor, summed in double; parameters without grad count as zero). When max_norm > 0 and
// norm > max_norm, scales every gradient in place by max_norm / (norm + 1e-6). max_norm <= 0:
// no clipping, only the norm. A non-finite norm is returned as is and nothing is scaled (the caller
// decides whether to skip the step).
double clip_grad_norm(const std::vector<Tensor>& params, double max_norm);

}  // namespace nha
