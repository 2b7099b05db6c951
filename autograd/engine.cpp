// The backward pass: one walk over the graph reachable from the roots.
//
// 1. Count, for every node, how many edges point into it (its dependencies).
// 2. Start from the roots' nodes; a node runs once every node that feeds it has run, so all the
//    gradients for its outputs have been summed into its input buffer (this is how a tensor used
//    twice, like a residual or tied embedding, gets the sum of both contributions).
//    Among ready nodes the most recently created runs first (PyTorch's order on the CPU).
// 3. Undefined output gradients become zeros of the recorded shape before a node runs.
// A leaf's AccumulateGrad therefore runs once per backward, with the leaf's summed gradient: the
// moment the gradient-ready hook (node.h) reports it to data-parallel training.
#include <queue>
#include <unordered_map>

#include "autograd/node.h"
#include "kernels/backend.h"

namespace nha::autograd {

namespace {

struct ReadyOrder {
  bool operator()(const Node* a, const Node* b) const { return a->sequence_nr < b->sequence_nr; }
};

void accumulate(Tensor& slot, const Tensor& grad) {
  if (!grad.defined()) return;
  if (!slot.defined()) {
    slot = grad;
  } else {
    // A fresh sum: `slot` may be a tensor that a node handed out and still references.
    Tensor sum = Tensor::empty(slot.shape(), slot.dtype(), slot.device());
    Tensor a = slot.contiguous(), b = grad.contiguous();
    backend_for(sum).add(sum, a, b, 1.0, 1.0);
    slot = sum;
  }
}

}  // namespace

void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads,
                  bool retain_graph) {
  NHA_CHECK(roots.size() == grads.size()) << "backward: " << roots.size() << " roots but "
                                          << grads.size() << " gradients";
  NoGradGuard no_grad;  // backward formulas are not themselves recorded

  // Root edges (a leaf root gets its accumulator).
  std::vector<Edge> root_edges;
  for (size_t i = 0; i < roots.size(); ++i) {
    check_same_shape(roots[i], grads[i], "backward gradient vs root");
    root_edges.push_back(gradient_edge(roots[i]));
  }

  // 1. dependencies
  std::unordered_map<Node*, int> dependencies;
  std::unordered_map<Node*, std::shared_ptr<Node>> keep_alive;
  std::vector<Node*> stack;
  for (const Edge& e : root_edges)
    if (e.valid() && !keep_alive.count(e.fn.get())) {
      keep_alive[e.fn.get()] = e.fn;
      stack.push_back(e.fn.get());
    }
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (const Edge& e : n->next_edges) {
      if (!e.valid()) continue;
      ++dependencies[e.fn.get()];
      if (!keep_alive.count(e.fn.get())) {
        keep_alive[e.fn.get()] = e.fn;
        stack.push_back(e.fn.get());
      }
    }
  }

  // 2. seed the input buffers with the root gradients
  std::unordered_map<Node*, std::vector<Tensor>> buffers;
  auto buffer_of = [&](Node* n) -> std::vector<Tensor>& {
    auto& b = buffers[n];
    if (b.empty()) b.resize(std::max<size_t>(1, n->outputs.size()));
    return b;
  };
  std::priority_queue<Node*, std::vector<Node*>, ReadyOrder> ready;
  for (size_t i = 0; i < root_edges.size(); ++i) {
    const Edge& e = root_edges[i];
    if (!e.valid()) continue;
    accumulate(buffer_of(e.fn.get())[e.input_nr], grads[i]);
  }
  for (auto& [node, _] : keep_alive)
    if (dependencies[node] == 0) ready.push(node);

  // 3. run
  while (!ready.empty()) {
    Node* node = ready.top();
    ready.pop();
    std::vector<Tensor> inputs = std::move(buffer_of(node));
    buffers.erase(node);
    for (size_t i = 0; i < node->outputs.size() && i < inputs.size(); ++i)
      if (!inputs[i].defined()) {
        const OutputMeta& m = node->outputs[i];
        inputs[i] = Tensor::zeros(m.shape, m.dtype, m.device);
      }
    std::vector<Tensor> out_grads = node->apply(std::move(inputs));
    if (!retain_graph) node->release_saved();
    for (size_t i = 0; i < node->next_edges.size(); ++i) {
      const Edge& e = node->next_edges[i];
      if (!e.valid()) continue;
      if (i < out_grads.size()) accumulate(buffer_of(e.fn.get())[e.input_nr], out_grads[i]);
      if (--dependencies[e.fn.get()] == 0) ready.push(e.fn.get());
    }
  }
}

}  // namespace nha::autograd
