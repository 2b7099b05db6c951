// attention and attention_with_lse: causal (optionally sliding-window) softmax attention through
// Backend::attention_forward / attention_backward (the math is in kernels/backend.h).
#include <cmath>

#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::record;

namespace {

// out = attention(q, k, v);  dq, dk, dv from Backend::attention_backward with the saved out and
// lse. lse is not an output of this node (it is returned detached), so the node has one output.
struct AttentionBackward final : Node {
  SavedTensor q, k, v, out, lse;
  double scale;
  int64_t window;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor qv = q.unpack(), kv = k.unpack(), vv = v.unpack(), ov = out.unpack(), lv = lse.unpack();
    Tensor dout = g[0].contiguous();
    Tensor dq = Tensor::empty(qv.shape(), qv.dtype(), qv.device());
    Tensor dk = Tensor::empty(kv.shape(), kv.dtype(), kv.device());
    Tensor dv = Tensor::empty(vv.shape(), vv.dtype(), vv.device());
    // One kernel gives all three gradients; hand out only the ones that are needed.
    backend_for(qv).attention_backward(dq, dk, dv, dout, qv, kv, vv, ov, lv, scale, window);
    return {needs_grad(0) ? dq : Tensor(), needs_grad(1) ? dk : Tensor(),
            needs_grad(2) ? dv : Tensor()};
  }
  std::string name() const override { return "AttentionBackward"; }
  void release_saved() override {
    q.reset();
    k.reset();
    v.reset();
    out.reset();
    lse.reset();
  }
};

void check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  NHA_CHECK(q.defined() && k.defined() && v.defined()) << "attention: q, k, v must be defined";
  NHA_CHECK(q.dim() == 4)
      << "attention: q must be [B, T, H, D], got " << q.str()
      << ". HINT: reshape the projections to [batch, time, heads, head_dim]";
  NHA_CHECK(k.shape() == q.shape() && v.shape() == q.shape())
      << "attention: q, k, v must have equal shapes [B, T, H, D], got q " << q.str() << ", k "
      << k.str() << ", v " << v.str();
  NHA_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype())
      << "attention: q, k, v must share one dtype, got " << q.str() << ", " << k.str() << ", "
      << v.str();
  NHA_CHECK(is_floating(q.dtype())) << "attention: q, k, v must be floating, got " << q.str();
  ops_detail::check_same_device({q, k, v}, "attention");
}

}  // namespace

std::pair<Tensor, Tensor> attention_with_lse(const Tensor& q, const Tensor& k, const Tensor& v,
                                             int64_t window, double scale) {
  check_attention_inputs(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  if (scale <= 0) scale = 1.0 / std::sqrt(double(D));
  Tensor qc = q.contiguous().detach(), kc = k.contiguous().detach(), vc = v.contiguous().detach();
  Tensor out = Tensor::empty(q.shape(), q.dtype(), q.device());  // [B, T, H, D]
  // lse in f32 (f64 for f64 inputs): statistics stay full precision under bf16 activations.
  Tensor lse = Tensor::empty({B, H, T}, q.dtype() == DType::F64 ? DType::F64 : DType::F32,
                             q.device());  // [B, H, T]
  backend_for(qc).attention_forward(out, lse, qc, kc, vc, scale, window);
  if (autograd::any_requires_grad({q, k, v})) {
    auto node = std::make_shared<AttentionBackward>();
    node->q = SavedTensor(qc, "attention.q");
    node->k = SavedTensor(kc, "attention.k");
    node->v = SavedTensor(vc, "attention.v");
    // A detached alias of the output: saving `out` itself would make node -> out -> node a cycle.
    node->out = SavedTensor(out.detach(), "attention.out");
    node->lse = SavedTensor(lse, "attention.lse");
    node->scale = scale;
    node->window = window;
    record(node, {q, k, v}, out);
  }
  return {out, lse};
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window, double scale) {
  return attention_with_lse(q, k, v, window, scale).first;
}

}  // namespace nha
