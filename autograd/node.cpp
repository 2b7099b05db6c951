#include "autograd/node.h"

#include <atomic>

namespace nha::autograd {

namespace {
std::atomic<uint64_t> next_sequence_nr{0};
thread_local bool grad_mode = true;
thread_local GradReadyHook grad_ready_hook;  // empty: no hook (the usual case)
}  // namespace

Node::Node() : sequence_nr(next_sequence_nr++) {}

// ---- saved tensors ------------------------------------------------------------------------------

SavedTensor::SavedTensor(const Tensor& t, const char* what)
    : tensor_(t), saved_version_(t.impl()->storage->version()), what_(what) {}

Tensor SavedTensor::unpack() const {
  NHA_CHECK(tensor_.defined()) << "the saved tensor '" << what_
                               << "' was already freed by an earlier backward. HINT: pass "
                                  "retain_graph=true to the first backward()";
  NHA_CHECK(tensor_.impl()->storage->version() == saved_version_)
      << "the tensor '" << what_ << "' (" << tensor_.str()
      << ") saved for backward was modified in place afterwards (version " << saved_version_
      << " -> " << tensor_.impl()->storage->version()
      << "). HINT: clone() it before modifying, or modify it before it is used";
  return tensor_;
}

// ---- leaves -------------------------------------------------------------------------------------

std::vector<Tensor> AccumulateGrad::apply(std::vector<Tensor>&& grads) {
  std::shared_ptr<TensorImpl> leaf = leaf_.lock();
  if (!leaf || !grads[0].defined()) return {};  // leaf gone, or no gradient reached it
  NoGradGuard no_grad;
  Tensor& g = leaf->grad;
  if (!g.defined()) {
    // Own the memory: the incoming gradient may alias a buffer another node still uses.
    g = grads[0].contiguous().clone();
  } else {
    g.add_(grads[0]);
  }
  if (grad_ready_hook) grad_ready_hook(Tensor(leaf));
  return {};
}

GradReadyHookGuard::GradReadyHookGuard(GradReadyHook hook) : previous_(std::move(grad_ready_hook)) {
  grad_ready_hook = std::move(hook);
}
GradReadyHookGuard::~GradReadyHookGuard() { grad_ready_hook = std::move(previous_); }

// ---- grad mode ----------------------------------------------------------------------------------

bool grad_mode_enabled() { return grad_mode; }
NoGradGuard::NoGradGuard() : previous_(grad_mode) { grad_mode = false; }
NoGradGuard::~NoGradGuard() { grad_mode = previous_; }

// ---- building graphs ----------------------------------------------------------------------------

bool any_requires_grad(const std::vector<Tensor>& inputs) {
  if (!grad_mode) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

Edge gradient_edge(const Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return {};
  if (t.grad_fn()) return {t.grad_fn(), t.output_nr()};
  TensorImpl* impl = t.impl();
  std::shared_ptr<Node> acc = impl->grad_accumulator.lock();
  if (!acc) {
    acc = std::make_shared<AccumulateGrad>(t.impl_ptr());
    impl->grad_accumulator = acc;
  }
  return {acc, 0};
}

void attach(const std::shared_ptr<Node>& node, const std::vector<Tensor>& inputs,
            std::vector<Tensor>& outputs) {
  node->next_edges.clear();
  for (const Tensor& t : inputs) node->next_edges.push_back(gradient_edge(t));
  node->outputs.clear();
  for (uint32_t i = 0; i < outputs.size(); ++i) {
    Tensor& out = outputs[i];
    node->outputs.push_back({out.shape(), out.dtype(), out.device()});
    NHA_CHECK(out.is_leaf()) << node->name() << ": output " << i << " already has a grad_fn";
    out.impl()->grad_fn = node;
    out.impl()->output_nr = i;
  }
}

// ---- custom ops ---------------------------------------------------------------------------------

namespace {
class CustomNode final : public Node {
 public:
  CustomNode(std::string name, CustomBackward backward)
      : name_(std::move(name)), backward_(std::move(backward)) {}
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override {
    std::vector<Tensor> result = backward_(ctx, std::move(grads));
    NHA_CHECK(result.size() == next_edges.size())
        << "custom op " << name_ << ": backward returned " << result.size()
        << " gradients for " << next_edges.size() << " inputs";
    for (size_t i = 0; i < result.size(); ++i)
      if (needs_grad(i)) {
        NHA_CHECK(result[i].defined())
            << "custom op " << name_ << ": backward left the gradient of input " << i
            << " undefined although that input requires grad";
        NHA_CHECK(result[i].shape() == outputs_of_inputs[i])
            << "custom op " << name_ << ": gradient of input " << i << " has shape "
            << shape_str(result[i].shape()) << ", the input has "
            << shape_str(outputs_of_inputs[i]);
      }
    return result;
  }
  std::string name() const override { return name_; }
  void release_saved() override {
    for (SavedTensor& s : ctx.saved) s.reset();
  }

  CustomOpContext ctx;
  std::vector<Shape> outputs_of_inputs;  // input shapes, to check the returned gradients

 private:
  std::string name_;
  CustomBackward backward_;
};
}  // namespace

std::vector<Tensor> custom_op(const std::string& name, const std::vector<Tensor>& inputs,
                              const CustomForward& forward, const CustomBackward& backward) {
  const bool record = any_requires_grad(inputs);
  auto node = std::make_shared<CustomNode>(name, backward);
  for (const Tensor& t : inputs) {
    node->ctx.input_needs_grad.push_back(record && t.defined() && t.requires_grad());
    node->outputs_of_inputs.push_back(t.defined() ? t.shape() : Shape{});
  }
  std::vector<Tensor> outputs;
  {
    NoGradGuard no_grad;
    outputs = forward(node->ctx);
  }
  if (!record) return outputs;
  // Outputs must be fresh tensors: an output that aliases an input gets its own handle.
  for (Tensor& out : outputs) out = out.detach();
  attach(node, inputs, outputs);
  return outputs;
}

}  // namespace nha::autograd
