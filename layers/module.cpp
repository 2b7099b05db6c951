#include "layers/module.h"

#include <algorithm>

#include "autograd/node.h"
#include "autograd/ops.h"

namespace nha {

// ---- Module -------------------------------------------------------------------------------------

Tensor Module::register_parameter(const std::string& name, Tensor value, ParamKind kind) {
  for (const NamedParameter& p : params_)
    NHA_CHECK(p.name != name) << "parameter '" << name << "' registered twice";
  value.set_requires_grad(true);
  params_.push_back({name, value, kind});
  return value;
}

void Module::collect(const std::string& prefix, std::vector<NamedParameter>& out) const {
  for (const NamedParameter& p : params_) out.push_back({prefix + p.name, p.tensor, p.kind});
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

std::vector<NamedParameter> Module::named_parameters() const {
  std::vector<NamedParameter> out;
  collect("", out);
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (NamedParameter& p : named_parameters()) out.push_back(p.tensor);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  std::vector<const TensorImpl*> seen;  // tied parameters count once
  for (const NamedParameter& p : named_parameters()) {
    if (std::find(seen.begin(), seen.end(), p.tensor.impl()) != seen.end()) continue;
    seen.push_back(p.tensor.impl());
    n += p.tensor.numel();
  }
  return n;
}

void Module::to(Device device) {
  autograd::NoGradGuard no_grad;
  for (NamedParameter& p : named_parameters()) {
    Tensor t = p.tensor;
    if (t.device() != device) t.set_data(t.detach().to(device));
  }
}

void Module::to(DType dtype) {
  autograd::NoGradGuard no_grad;
  for (NamedParameter& p : named_parameters()) {
    Tensor t = p.tensor;
    if (t.dtype() != dtype) t.set_data(t.detach().to(dtype));
  }
}

void Module::zero_grad() {
  for (NamedParameter& p : named_parameters()) p.tensor.mutable_grad() = Tensor();
}

// ---- building blocks ----------------------------------------------------------------------------

Linear::Linear(int64_t in_features, int64_t out_features, double init_std, Generator& gen) {
  weight = register_parameter("weight", Tensor::randn({out_features, in_features}, gen, init_std),
                              ParamKind::Weight);
}

Embedding::Embedding(int64_t vocab, int64_t dim, double init_std, Generator& gen) {
  weight = register_parameter("weight", Tensor::randn({vocab, dim}, gen, init_std),
                              ParamKind::Embedding);
}

Tensor Embedding::forward(const Tensor& ids) const { return embedding(weight, ids); }

RMSNorm::RMSNorm(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", Tensor::ones({dim}), ParamKind::Norm);
}

Tensor RMSNorm::forward(const Tensor& x) const { return rmsnorm(x, weight, eps); }

std::pair<Tensor, Tensor> RMSNorm::forward_residual(const Tensor& x, const Tensor& delta) const {
  return add_rmsnorm(x, delta, weight, eps);
}

SwiGLU::SwiGLU(int64_t d, int64_t hidden, double init_std, double out_scale, Generator& gen) {
  gate = register_module("gate", std::make_shared<Linear>(d, hidden, init_std, gen));
  up = register_module("up", std::make_shared<Linear>(d, hidden, init_std, gen));
  down = register_module("down", std::make_shared<Linear>(hidden, d, init_std * out_scale, gen));
}

Tensor SwiGLU::forward(const Tensor& x) const {
  return down->forward(swiglu(gate->forward(x), up->forward(x)));
}

}  // namespace nha
