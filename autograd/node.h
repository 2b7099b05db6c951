// Reverse-mode autograd in the PyTorch style.
//
// Every differentiable op that sees an input requiring grad creates a Node: it saves what its
// backward needs (SavedTensor, with a version check) and points to the nodes that produced its
// inputs through Edges. Leaves that require grad get an AccumulateGrad node that adds into
// tensor.grad(). backward() walks the graph once in reverse topological order (engine.cpp), summing
// the gradients that reach a node through several paths before calling it.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace nha::autograd {

class Node;

// Where a gradient goes: input `input_nr` of node `fn` (nullptr: nowhere, input needs no grad).
struct Edge {
  std::shared_ptr<Node> fn;
  uint32_t input_nr = 0;
  bool valid() const { return fn != nullptr; }
};

// Shape/dtype/device of one forward output, so the engine can make zeros for an output that
// received no gradient.
struct OutputMeta {
  Shape shape;
  DType dtype = DType::F32;
  Device device;
};

class Node : public std::enable_shared_from_this<Node> {
 public:
  Node();
  virtual ~Node() = default;

  // grads[i] is the gradient w.r.t. forward output i (never undefined: the engine fills zeros).
  // Returns one gradient per next edge; entries for invalid edges may be undefined.
  virtual std::vector<Tensor> apply(std::vector<Tensor>&& grads) = 0;
  virtual std::string name() const = 0;
  // Frees saved tensors after backward (unless retain_graph).
  virtual void release_saved() {}

  // Whether gradient i (for next_edges[i]) is needed at all (PyTorch's should_compute_output).
  bool needs_grad(size_t i) const { return i < next_edges.size() && next_edges[i].valid(); }

  std::vector<Edge> next_edges;
  std::vector<OutputMeta> outputs;
  uint64_t sequence_nr;  // creation order; later nodes run first among ready ones
};

// A tensor saved for backward. unpack() fails if the tensor was modified in place after saving,
// because the backward would silently use the wrong values.
class SavedTensor {
 public:
  SavedTensor() = default;
  SavedTensor(const Tensor& t, const char* what);
  Tensor unpack() const;
  void reset() { tensor_ = Tensor(); }
  bool defined() const { return tensor_.defined(); }

 private:
  Tensor tensor_;
  uint64_t saved_version_ = 0;
  const char* what_ = "";
  std::string op_;
};

// Sink of a leaf: adds incoming gradients into tensor.grad() (allocates it on first use).
class AccumulateGrad final : public Node {
 public:
  explicit AccumulateGrad(const std::shared_ptr<TensorImpl>& leaf) : leaf_(leaf) {}
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override;
  std::string name() const override { return "AccumulateGrad"; }

 private:
  std::weak_ptr<TensorImpl> leaf_;
};

// ---- gradient-ready hook ------------------------------------------------------------------------
// Called by a leaf's AccumulateGrad right after it has added this backward pass's gradient into
// leaf.grad(). The engine runs that node once per backward, after every contribution to the leaf
// was summed, so at this point the leaf's gradient is final for this backward. Data-parallel
// training uses it to start reducing a gradient bucket while the rest of the backward still runs
// (train/distributed.h).
using GradReadyHook = std::function<void(const Tensor& leaf)>;
// Installs `hook` for the backward passes run on this thread in its scope; restores the previous
// hook (usually none) when it ends.
class GradReadyHookGuard {
 public:
  explicit GradReadyHookGuard(GradReadyHook hook);
  ~GradReadyHookGuard();
  GradReadyHookGuard(const GradReadyHookGuard&) = delete;
  GradReadyHookGuard& operator=(const GradReadyHookGuard&) = delete;

 private:
  GradReadyHook previous_;
};

// ---- grad mode ----------------------------------------------------------------------------------
bool grad_mode_enabled();
// Disables graph recording in its scope (evaluation, optimizer steps, in-place parameter init).
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

// ---- building graphs ----------------------------------------------------------------------------
// True when grad mode is on and some input requires grad: the op must record a node.
bool any_requires_grad(const std::vector<Tensor>& inputs);
// The edge that carries a gradient to `t` (its grad_fn, or its leaf accumulator, or none).
Edge gradient_edge(const Tensor& t);
// Connects `node` to `inputs` and makes it the grad_fn of `outputs` (which must be fresh tensors).
void attach(const std::shared_ptr<Node>& node, const std::vector<Tensor>& inputs,
            std::vector<Tensor>& outputs);

// Runs backward from `roots` with upstream gradients `grads` (engine.cpp).
void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads,
                  bool retain_graph);

// ---- custom ops with a hand-written backward ----------------------------------------------------
// A new fused op without a Node class of its own (the built-in ones, NHA and flash attention, are
// named Nodes in autograd/ops/): compute the outputs yourself (grad mode is off inside `forward`),
// save what you need in the context, and give the backward as a function.
//
//   auto outs = custom_op("MyOp", {x, w},
//       [&](CustomOpContext& ctx) { ...; ctx.save(x); return std::vector<Tensor>{y}; },
//       [](CustomOpContext& ctx, std::vector<Tensor>&& dy) { ...; return {dx, dw}; });
struct CustomOpContext {
  void save(const Tensor& t) { saved.emplace_back(t, "custom op input"); }
  Tensor saved_tensor(size_t i) const { return saved.at(i).unpack(); }
  // Whether the gradient of input i is needed (false for inputs that do not require grad).
  bool needs_input_grad(size_t i) const { return i < input_needs_grad.size() && input_needs_grad[i]; }

  std::vector<SavedTensor> saved;
  std::vector<bool> input_needs_grad;
  std::vector<double> scalars;  // free slot for non-tensor state (sizes, flags)
};
using CustomForward = std::function<std::vector<Tensor>(CustomOpContext&)>;
using CustomBackward = std::function<std::vector<Tensor>(CustomOpContext&, std::vector<Tensor>&&)>;
std::vector<Tensor> custom_op(const std::string& name, const std::vector<Tensor>& inputs,
                              const CustomForward& forward, const CustomBackward& backward);

}  // namespace nha::autograd
