#include "layers/nha.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "autograd/node.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

NhaMixer::NhaMixer(const ModelConfig& cfg, const MixerConfig& mixer, double out_scale,
                   Generator& gen)
    : n_heads(cfg.n_heads), window(mixer.window), slots(mixer.slots), rope_base(cfg.rope_base) {
  NHA_CHECK(window >= 0 && slots >= 1)
      << "nha mixer: window must be >= 0 and slots >= 1, got window " << window << ", slots "
      << slots << ". HINT: window 0 = pure memory (gsa); slots is the memory size m (default 64)";
  const int64_t d = cfg.d_model;
  wq = register_module("wq", std::make_shared<Linear>(d, d, cfg.init_std, gen));
  wk = register_module("wk", std::make_shared<Linear>(d, d, cfg.init_std, gen));
  wv = register_module("wv", std::make_shared<Linear>(d, d, cfg.init_std, gen));
  wf = register_module("wf", std::make_shared<Linear>(d, n_heads * slots, cfg.init_std, gen));
  wo = register_module("wo", std::make_shared<Linear>(d, d, cfg.init_std * out_scale, gen));
  out_norm = register_module("out_norm", std::make_shared<RMSNorm>(d, 1e-6));
}

NhaMixer::Projections NhaMixer::project(const Tensor& x, int64_t start_pos) const {
  NHA_CHECK(x.dim() == 3 && x.size(2) == wq->weight.size(1))
      << "nha mixer: x must be [B, T, d] with d = " << wq->weight.size(1) << ", got " << x.str();
  const int64_t B = x.size(0), T = x.size(1), hd = x.size(2) / n_heads;
  Projections p;
  p.q = wq->forward(x).reshape({B, T, n_heads, hd});
  p.k = wk->forward(x).reshape({B, T, n_heads, hd});
  p.v = silu(wv->forward(x)).reshape({B, T, n_heads, hd});
  std::tie(p.g, p.s) = nha_gates(wf->forward(x).reshape({B, T, n_heads, slots}));
  p.qr = rope(p.q, rope_base, start_pos);
  p.kr = rope(p.k, rope_base, start_pos);
  return p;
}

Tensor NhaMixer::output(const Tensor& o) const {
  const int64_t B = o.size(0), T = o.size(1);
  return wo->forward(out_norm->forward(silu(o.reshape({B, T, -1}))));  // [B, T, d]
}

Tensor NhaMixer::forward(const Tensor& x) const {
  const Projections p = project(x, 0);
  return output(nha_attend(p.q, p.k, p.qr, p.kr, p.v, p.s, p.g, window));
}

// ---- decode ---------------------------------------------------------------------------------

namespace {

// Memory write of one token (SPEC-NHA §2), Hk [Dk, M], Hv [M, Dv]:
//   Hk = Hk * e^g[None,:] + k s^T;  Hv = Hv * e^g[:,None] + s v^T
template <typename S>
void memory_write(S* Hk, S* Hv, const S* k, const S* v, const S* s, const S* g, int64_t Dk,
                  int64_t Dv, int64_t M) {
  for (int64_t m = 0; m < M; ++m) {
    const double a = std::exp(double(g[m])), sm = double(s[m]);
    for (int64_t d = 0; d < Dk; ++d)
      Hk[d * M + m] = S(double(Hk[d * M + m]) * a + double(k[d]) * sm);
    for (int64_t e = 0; e < Dv; ++e)
      Hv[m * Dv + e] = S(double(Hv[m * Dv + e]) * a + sm * double(v[e]));
  }
}

// The attention core of one decode step (SPEC-NHA §5) for every (b, h). Token inputs q, k, qr,
// kr, v [B, 1, H, hd] and s, g [B, 1, H, M] are in the state's dtype S; writes o [B, 1, H, hd].
// With a window: pop token pos - w into the memory (its ring slot is the one the new token
// takes), push the new token, then read the slots and the ring. Without: write the token first.
template <typename S>
void decode_core(NhaDecodeState& st, Tensor& o, const Tensor& q, const Tensor& k, const Tensor& qr,
                 const Tensor& kr, const Tensor& v, const Tensor& s, const Tensor& g, int64_t w,
                 double scale) {
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3), M = s.size(3), cap = st.cap;
  const int64_t t = st.pos;
  const int64_t u0 = w == 0 ? t + 1 : std::max<int64_t>(0, t - w + 1);  // window: u0..t
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      S* Hk = st.Hk.data<S>() + bh * D * M;  // [D, M]
      S* Hv = st.Hv.data<S>() + bh * M * D;  // [M, D]
      // Ring row (b, slot, h) of a [B, cap, H, X] buffer.
      auto ring = [&](const Tensor& r, int64_t u, int64_t X) {
        return r.data<S>() + ((b * cap + u % cap) * H + h) * X;
      };
      const S *kt = k.data<S>() + bh * D, *vt = v.data<S>() + bh * D;
      const S *s_t = s.data<S>() + bh * M, *gt = g.data<S>() + bh * M;
      if (w == 0) {
        memory_write(Hk, Hv, kt, vt, s_t, gt, D, D, M);
      } else {
        if (t >= w)
          memory_write(Hk, Hv, ring(st.k, t, D), ring(st.v, t, D), ring(st.s, t, M),
                       ring(st.g, t, M), D, D, M);
        std::copy(kt, kt + D, ring(st.k, t, D));
        std::copy(vt, vt + D, ring(st.v, t, D));
        std::copy(s_t, s_t + M, ring(st.s, t, M));
        std::copy(gt, gt + M, ring(st.g, t, M));
        const S* krt = kr.data<S>() + bh * D;
        std::copy(krt, krt + D, ring(st.kr, t, D));
      }
      // Logits [scale q Hk ; scale qr . kr_u], one softmax, o = p[:M] Hv + sum_u p[M+u] v_u.
      const S *qt = q.data<S>() + bh * D, *qrt = qr.data<S>() + bh * D;
      std::vector<double> z(size_t(M + t + 1 - u0), 0.0);
      for (int64_t d = 0; d < D; ++d)
        for (int64_t m = 0; m < M; ++m) z[m] += scale * double(qt[d]) * double(Hk[d * M + m]);
      for (int64_t u = u0; u <= t; ++u) {
        const S* kru = ring(st.kr, u, D);
        for (int64_t d = 0; d < D; ++d) z[M + u - u0] += scale * double(qrt[d]) * double(kru[d]);
      }
      const double mx = *std::max_element(z.begin(), z.end());
      double sum = 0;
      for (double& zi : z) sum += (zi = std::exp(zi - mx));
      std::vector<double> acc(size_t(D), 0.0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t e = 0; e < D; ++e) acc[e] += z[m] * double(Hv[m * D + e]);
      for (int64_t u = u0; u <= t; ++u) {
        const S* vu = ring(st.v, u, D);
        for (int64_t e = 0; e < D; ++e) acc[e] += z[M + u - u0] * double(vu[e]);
      }
      S* ot = o.data<S>() + bh * D;
      for (int64_t e = 0; e < D; ++e) ot[e] = S(acc[e] / sum);
    }
}

}  // namespace

NhaDecodeState NhaMixer::decode_state(int64_t batch, int64_t max_len) const {
  const Tensor& w = wq->weight;
  NHA_CHECK(w.device() == Device::cpu())
      << "nha decode runs on the cpu, the layer is on " << w.device().str()
      << ". HINT: move the model with .to(Device::cpu())";
  NHA_CHECK(batch >= 1 && max_len >= 1)
      << "nha decode_state: batch and max_len must be positive, got " << batch << ", " << max_len;
  const int64_t H = n_heads, D = w.size(1) / H, M = slots;
  const DType dt = w.dtype() == DType::F64 ? DType::F64 : DType::F32;
  NhaDecodeState st;
  st.Hk = Tensor::zeros({batch, H, D, M}, dt);
  st.Hv = Tensor::zeros({batch, H, M, D}, dt);
  st.cap = std::min(window, max_len);
  if (st.cap > 0) {
    st.k = Tensor::zeros({batch, st.cap, H, D}, dt);
    st.kr = Tensor::zeros({batch, st.cap, H, D}, dt);
    st.v = Tensor::zeros({batch, st.cap, H, D}, dt);
    st.g = Tensor::zeros({batch, st.cap, H, M}, dt);
    st.s = Tensor::zeros({batch, st.cap, H, M}, dt);
  }
  return st;
}

Tensor NhaMixer::step(const Tensor& x_t, NhaDecodeState& st) const {
  autograd::NoGradGuard no_grad;
  NHA_CHECK(x_t.dim() == 3 && x_t.size(1) == 1 && x_t.size(0) == st.Hk.size(0))
      << "nha step: x_t must be [B, 1, d] with the state's B = " << st.Hk.size(0) << ", got "
      << x_t.str() << ". HINT: feed one token per call; make the state with decode_state(B, ...)";
  NHA_CHECK(st.cap == window || st.pos < st.cap)
      << "nha step: token " << st.pos << " does not fit the ring of " << st.cap
      << " tokens (window " << window << "). HINT: raise max_len in decode_state";
  const DType dt = st.Hk.dtype();
  Projections p = project(x_t, st.pos);
  for (Tensor* t : {&p.q, &p.k, &p.qr, &p.kr, &p.v, &p.s, &p.g}) *t = t->to(dt).contiguous();
  Tensor o = Tensor::empty(p.v.shape(), dt);  // [B, 1, H, hd]
  const double scale = 1.0 / std::sqrt(double(p.q.size(3)));
  dispatch_floating(o, "nha step", [&]<typename S>() {
    decode_core<S>(st, o, p.q, p.k, p.qr, p.kr, p.v, p.s, p.g, window, scale);
  });
  ++st.pos;
  return output(o.to(x_t.dtype()));
}

}  // namespace nha
