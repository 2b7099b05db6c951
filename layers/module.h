// Module: a named tree of parameters and submodules, PyTorch's nn.Module in small.
//
// Parameter names join the path with dots ("layers.3.mixer.wq") and are the checkpoint keys.
// Each parameter carries a kind so optimizers can treat norms and embeddings differently
// (no weight decay by default).
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "autograd/ops.h"
#include "core/random.h"
#include "core/tensor.h"

namespace nha {

enum class ParamKind : uint8_t { Weight, Norm, Embedding };

struct NamedParameter {
  std::string name;
  Tensor tensor;
  ParamKind kind;
};

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // All parameters, depth first in registration order.
  std::vector<NamedParameter> named_parameters() const;
  std::vector<Tensor> parameters() const;
  int64_t num_parameters() const;
  // Moves/casts every parameter in place (handles held elsewhere see the new data).
  void to(Device device);
  void to(DType dtype);
  void zero_grad();

 protected:
  Tensor register_parameter(const std::string& name, Tensor value, ParamKind kind);
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    children_.emplace_back(name, module);
    return module;
  }

 private:
  void collect(const std::string& prefix, std::vector<NamedParameter>& out) const;

  std::vector<NamedParameter> params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
};

// ---- building blocks ----------------------------------------------------------------------------

// y = x W^T, W [out, in] ~ N(0, init_std^2). No bias (Llama-style models have none).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, double init_std, Generator& gen);
  Tensor forward(const Tensor& x) const { return linear(x, weight); }
  Tensor weight;  // [out, in]
};

// ids [...] -> rows of table [V, C] ~ N(0, init_std^2).
class Embedding : public Module {
 public:
  Embedding(int64_t vocab, int64_t dim, double init_std, Generator& gen);
  Tensor forward(const Tensor& ids) const;
  Tensor weight;  // [V, C]
};

// x / rms(x) * g over the last dim, g initialised to ones.
class RMSNorm : public Module {
 public:
  RMSNorm(int64_t dim, double eps);
  Tensor forward(const Tensor& x) const;
  // The residual add before the norm, fused with it: {h = x + delta, forward(h)}.
  std::pair<Tensor, Tensor> forward_residual(const Tensor& x, const Tensor& delta) const;
  Tensor weight;  // [C]
  double eps;
};

// down(SiLU(gate x) * up x): gate, up [hidden, d]; down [d, hidden] (init scaled by out_scale).
class SwiGLU : public Module {
 public:
  SwiGLU(int64_t d, int64_t hidden, double init_std, double out_scale, Generator& gen);
  Tensor forward(const Tensor& x) const;
  std::shared_ptr<Linear> gate, up, down;
};

}  // namespace nha
