// AdamW and gradient clipping (see train/optim.h).
#include "train/optim.h"

#include <cmath>
#include <set>

#include "autograd/node.h"
#include "kernels/backend.h"

namespace nha {

namespace {
// Moments are f32, except for f64 parameters (float64 references and tests).
DType moment_dtype(const Tensor& param) {
  return param.dtype() == DType::F64 ? DType::F64 : DType::F32;
}
}  // namespace

AdamW::AdamW(std::vector<ParamEntry> params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  NHA_CHECK(options_.beta1 >= 0 && options_.beta1 < 1 && options_.beta2 >= 0 &&
            options_.beta2 < 1)
      << "AdamW: betas must be in [0, 1), got (" << options_.beta1 << ", " << options_.beta2
      << "). HINT: the usual values are beta1 = 0.9, beta2 = 0.95";
  NHA_CHECK(options_.eps > 0) << "AdamW: eps must be positive, got " << options_.eps;
  NHA_CHECK(options_.weight_decay >= 0)
      << "AdamW: weight_decay must be >= 0, got " << options_.weight_decay;
  std::set<std::string> names;
  m_.reserve(params_.size());
  v_.reserve(params_.size());
  for (const ParamEntry& e : params_) {
    NHA_CHECK(e.param.defined()) << "AdamW: parameter '" << e.name << "' is undefined";
    NHA_CHECK(is_floating(e.param.dtype()))
        << "AdamW: parameter '" << e.name << "' is not floating: " << e.param.str();
    NHA_CHECK(e.param.is_contiguous())
        << "AdamW: parameter '" << e.name << "' is a non-contiguous view " << e.param.str()
        << ". HINT: optimize the tensor that owns the memory, not a view of it";
    NHA_CHECK(names.insert(e.name).second)
        << "AdamW: parameter name '" << e.name << "' appears twice. HINT: names key the "
        << "optimizer state in checkpoints and must be unique";
    m_.push_back(Tensor::zeros(e.param.shape(), moment_dtype(e.param), e.param.device()));
    v_.push_back(Tensor::zeros(e.param.shape(), moment_dtype(e.param), e.param.device()));
  }
}

void AdamW::step(double lr) {
  autograd::NoGradGuard no_grad;
  ++step_;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor& p = params_[i].param;
    const Tensor& g = p.grad();
    if (!g.defined()) continue;
    NHA_CHECK(g.shape() == p.shape())
        << "AdamW: gradient of '" << params_[i].name << "' is " << g.str()
        << " but the parameter is " << p.str();
    Tensor gc = g.contiguous();
    const double wd = params_[i].decay ? options_.weight_decay : 0.0;
    backend_for(p).adamw_step(p, gc, m_[i], v_[i], lr, options_.beta1, options_.beta2,
                              options_.eps, wd, step_);
    // In-place writes: bump versions so saved-tensor checks see them.
    p.impl()->storage->bump_version();
    m_[i].impl()->storage->bump_version();
    v_[i].impl()->storage->bump_version();
  }
}

void AdamW::zero_grad() {
  for (ParamEntry& e : params_) e.param.mutable_grad() = Tensor();
}

void AdamW::set_step_count(int64_t step) {
  NHA_CHECK(step >= 0) << "AdamW: step count must be >= 0, got " << step;
  step_ = step;
}

size_t AdamW::index_of(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].name == name) return i;
  NHA_FAIL() << "AdamW: no parameter named '" << name << "'";
}

double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  autograd::NoGradGuard no_grad;
  double total = 0;  // sum of squares over all gradients, in double
  for (const Tensor& p : params) {
    if (!p.defined() || !p.grad().defined()) continue;
    Tensor g = p.grad().contiguous();
    Tensor s = Tensor::empty({}, g.dtype() == DType::F64 ? DType::F64 : DType::F32, g.device());
    backend_for(g).sum_squares(s, g);
    total += s.item<double>();
  }
  const double norm = std::sqrt(total);
  if (max_norm > 0 && norm > max_norm) {  // false for NaN: a NaN norm scales nothing
    const double factor = max_norm / (norm + 1e-6);
    for (const Tensor& p : params) {
      if (!p.defined() || !p.grad().defined()) continue;
      Tensor g = p.grad();
      g.mul_(factor);  // mul_ refuses non-contiguous views; leaf grads are contiguous
    }
  }
  return norm;
}

}  // namespace nha
