// nha_attend and nha_gates: the Native Hybrid Attention core and its gates through
// Backend::nha_forward / nha_backward / nha_gate_forward / nha_gate_backward (math in
// kernels/backend.h, docs/nha.md §2 and §4).
#include <cmath>

#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::empty_like;
using ops_detail::record;

namespace {

// out = nha_attend(q, k, qr, kr, v, s, g); one backward kernel gives all seven gradients and the
// node hands out those that are needed. lse is saved for the backward, not an output.
struct NhaAttendBackward final : Node {
  SavedTensor q, k, qr, kr, v, s, g, out, lse;
  double scale;
  int64_t window;
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override {
    Tensor qv = q.unpack(), kv = k.unpack(), qrv = qr.unpack(), krv = kr.unpack(), vv = v.unpack(),
           sv = s.unpack(), gv = g.unpack();
    Tensor dout = grads[0].contiguous();
    Tensor dq = empty_like(qv), dk = empty_like(kv), dqr = empty_like(qrv), dkr = empty_like(krv),
           dv = empty_like(vv), ds = empty_like(sv), dg = empty_like(gv);
    backend_for(qv).nha_backward(dq, dk, dqr, dkr, dv, ds, dg, dout, qv, kv, qrv, krv, vv, sv, gv,
                                 out.unpack(), lse.unpack(), scale, window);
    std::vector<Tensor> result{dq, dk, dqr, dkr, dv, ds, dg};
    for (size_t i = 0; i < result.size(); ++i)
      if (!needs_grad(i)) result[i] = Tensor();
    return result;
  }
  std::string name() const override { return "NhaAttendBackward"; }
  void release_saved() override {
    for (SavedTensor* t : {&q, &k, &qr, &kr, &v, &s, &g, &out, &lse}) t->reset();
  }
};

void check_nha_inputs(const Tensor& q, const Tensor& k, const Tensor& qr, const Tensor& kr,
                      const Tensor& v, const Tensor& s, const Tensor& g, int64_t window) {
  NHA_CHECK(q.defined() && k.defined() && qr.defined() && kr.defined() && v.defined() &&
            s.defined() && g.defined())
      << "nha_attend: q, k, qr, kr, v, s, g must all be defined";
  NHA_CHECK(q.dim() == 4 && v.dim() == 4 && s.dim() == 4)
      << "nha_attend: q, v, s must be 4-D, got q " << q.str() << ", v " << v.str() << ", s "
      << s.str() << ". HINT: q, k, qr, kr, v are [B, T, H, D] and the gates s, g [B, T, H, M]";
  NHA_CHECK(k.shape() == q.shape() && qr.shape() == q.shape() && kr.shape() == q.shape())
      << "nha_attend: q, k, qr, kr must have equal shapes [B, T, H, Dk], got q " << q.str()
      << ", k " << k.str() << ", qr " << qr.str() << ", kr " << kr.str()
      << ". HINT: qr, kr are rope(q), rope(k), all [batch, time, heads, head_dim]";
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  NHA_CHECK(v.size(0) == B && v.size(1) == T && v.size(2) == H)
      << "nha_attend: v " << v.str() << " must be [B, T, H, Dv] with B, T, H of q " << q.str()
      << ". HINT: reshape the value projection to [batch, time, heads, head_dim]";
  NHA_CHECK(s.size(0) == B && s.size(1) == T && s.size(2) == H && g.shape() == s.shape())
      << "nha_attend: s and g must both be [B, T, H, M] with B, T, H of q " << q.str() << ", got s "
      << s.str() << ", g " << g.str() << ". HINT: reshape the gate projection to [B, T, H, slots]";
  NHA_CHECK(is_floating(q.dtype()) && k.dtype() == q.dtype() && qr.dtype() == q.dtype() &&
            kr.dtype() == q.dtype() && v.dtype() == q.dtype())
      << "nha_attend: q, k, qr, kr, v must share one floating dtype, got " << q.str() << ", "
      << k.str() << ", " << qr.str() << ", " << kr.str() << ", " << v.str()
      << ". HINT: convert them with .to(dtype)";
  // Gates may stay f32 under bf16 activations (nha_gates makes them so): the decay cumsum needs it.
  NHA_CHECK(g.dtype() == s.dtype() &&
            (s.dtype() == q.dtype() || (q.dtype() == DType::BF16 && s.dtype() == DType::F32)))
      << "nha_attend: s, g must have q's dtype (or f32 when q is bf16), got q " << q.str() << ", s "
      << s.str() << ", g " << g.str() << ". HINT: make s, g with nha_gates";
  NHA_CHECK(window >= 0) << "nha_attend: window must be >= 0, got " << window
                         << ". HINT: 0 = no window (pure memory); >= T = full attention";
  ops_detail::check_same_device({q, k, qr, kr, v, s, g}, "nha_attend");
}

// {g, s} = nha_gates(f); df = (dg - e^g ds) sigmoid(-f) / 8. The engine hands zeros for an
// output that got no gradient (e.g. only s used), so both grads are always defined.
struct NhaGatesBackward final : Node {
  SavedTensor f;
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override {
    Tensor fv = f.unpack();
    Tensor df = empty_like(fv);
    backend_for(fv).nha_gate_backward(df, grads[0].contiguous(), grads[1].contiguous(), fv);
    return {df};
  }
  std::string name() const override { return "NhaGatesBackward"; }
  void release_saved() override { f.reset(); }
};

}  // namespace

Tensor nha_attend(const Tensor& q, const Tensor& k, const Tensor& qr, const Tensor& kr,
                  const Tensor& v, const Tensor& s, const Tensor& g, int64_t window, double scale) {
  check_nha_inputs(q, k, qr, kr, v, s, g, window);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  if (scale <= 0) scale = 1.0 / std::sqrt(double(q.size(3)));
  Tensor in[7] = {q, k, qr, kr, v, s, g};
  for (Tensor& t : in) t = t.contiguous().detach();
  Tensor out = Tensor::empty(v.shape(), v.dtype(), v.device());                   // [B, T, H, Dv]
  Tensor lse = Tensor::empty({B, H, T}, ops_detail::stats_dtype(q), q.device());  // [B, H, T]
  backend_for(in[0]).nha_forward(out, lse, in[0], in[1], in[2], in[3], in[4], in[5], in[6], scale,
                                 window);
  if (autograd::any_requires_grad({q, k, qr, kr, v, s, g})) {
    auto node = std::make_shared<NhaAttendBackward>();
    node->q = SavedTensor(in[0], "nha_attend.q");
    node->k = SavedTensor(in[1], "nha_attend.k");
    node->qr = SavedTensor(in[2], "nha_attend.qr");
    node->kr = SavedTensor(in[3], "nha_attend.kr");
    node->v = SavedTensor(in[4], "nha_attend.v");
    node->s = SavedTensor(in[5], "nha_attend.s");
    node->g = SavedTensor(in[6], "nha_attend.g");
    // A detached alias of the output: saving `out` itself would make node -> out -> node a cycle.
    node->out = SavedTensor(out.detach(), "nha_attend.out");
    node->lse = SavedTensor(lse, "nha_attend.lse");
    node->scale = scale;
    node->window = window;
    record(node, {q, k, qr, kr, v, s, g}, out);
  }
  return out;
}

std::pair<Tensor, Tensor> nha_gates(const Tensor& f) {
  NHA_CHECK(f.defined() && is_floating(f.dtype()))
      << "nha_gates: f must be a floating tensor, got " << (f.defined() ? f.str() : "undefined")
      << ". HINT: pass the gate projection x Wf^T";
  Tensor fc = f.contiguous().detach();
  // f32 gates under bf16 activations: the decay is summed over the sequence.
  const DType dt = ops_detail::stats_dtype(f);
  Tensor g = Tensor::empty(f.shape(), dt, f.device()), s = Tensor::empty(f.shape(), dt, f.device());
  backend_for(fc).nha_gate_forward(g, s, fc);
  if (autograd::any_requires_grad({f})) {
    auto node = std::make_shared<NhaGatesBackward>();
    node->f = SavedTensor(fc, "nha_gates.f");
    std::vector<Tensor> outs{g, s};
    autograd::attach(node, {f}, outs);
  }
  return {g, s};
}

}  // namespace nha
