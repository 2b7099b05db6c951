#include "layers/nha.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "autograd/node.h"
#include "kernels/backend.h"

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

NhaMixer::Projections NhaMixer::project(const Tensor& x,
                                        const std::vector<int64_t>& positions) const {
  NHA_CHECK(x.dim() == 3 && x.size(2) == wq->weight.size(1))
      << "nha mixer: x must be [B, T, d] with d = " << wq->weight.size(1) << ", got " << x.str();
  const int64_t B = x.size(0), T = x.size(1), hd = x.size(2) / n_heads;
  Projections p;
  p.q = wq->forward(x).reshape({B, T, n_heads, hd});
  p.k = wk->forward(x).reshape({B, T, n_heads, hd});
  p.v = silu(wv->forward(x)).reshape({B, T, n_heads, hd});
  std::tie(p.g, p.s) = nha_gates(wf->forward(x).reshape({B, T, n_heads, slots}));
  p.qr = decode::rope_rows(p.q, rope_base, positions);
  p.kr = decode::rope_rows(p.k, rope_base, positions);
  return p;
}

Tensor NhaMixer::output(const Tensor& o) const {
  const int64_t B = o.size(0), T = o.size(1);
  return wo->forward(out_norm->forward(silu(o.reshape({B, T, -1}))));  // [B, T, d]
}

Tensor NhaMixer::forward(const Tensor& x) const {
  const Projections p = project(x, std::vector<int64_t>(size_t(x.size(0)), 0));
  return output(nha_attend(p.q, p.k, p.qr, p.kr, p.v, p.s, p.g, window));
}

// ---- decode ---------------------------------------------------------------------------------
// Everything below runs through Backend ops (gemm, elementwise, softmax, copies), so the decode
// form runs wherever the layer does.

namespace {

// One memory write per (row, head), docs/nha.md §2, in place on Hk [BH, D, M], Hv [BH, M, D]:
//   Hk = Hk * a[None,:] + k s^T;  Hv = Hv * a[:,None] + s v^T;  a = e^g = 1 - s
// k, v hold BH*D values, s BH*M (a ring slot or the current token). s = 0 (an empty slot) leaves
// the memory exactly as it was.
void nha_memory_write(Tensor& Hk, Tensor& Hv, const Tensor& k, const Tensor& v, const Tensor& s) {
  const int64_t BH = Hk.size(0), D = Hk.size(1), M = Hk.size(2);
  Backend& be = backend_for(Hk);
  const Tensor s_row = s.contiguous().reshape({BH, 1, M});
  Tensor a = Tensor::empty({BH, 1, M}, Hk.dtype(), Hk.device());  // decay per slot
  be.fill(a, 1.0);
  be.add(a, a, s_row, 1.0, -1.0);
  Tensor decay = Tensor::empty({BH, D, M}, Hk.dtype(), Hk.device());
  be.broadcast_dim(decay, a, BH, D, M);  // a along the key dim
  be.mul(Hk, Hk, decay);
  be.gemm(Hk, k.contiguous().reshape({BH, D, 1}), s_row, false, false, 1.0, 1.0);
  decay = Tensor::empty({BH, M, D}, Hk.dtype(), Hk.device());
  be.broadcast_dim(decay, a, BH * M, D, 1);  // a along the value dim
  be.mul(Hv, Hv, decay);
  be.gemm(Hv, s_row.reshape({BH, M, 1}), v.contiguous().reshape({BH, 1, D}), false, false, 1.0,
          1.0);
}

// The memory after writing the first n tokens of one prompt into an empty memory, in closed form:
//   Hk = sum_j k_j w_j^T,  Hv = sum_j w_j v_j^T,  w_j = s_j * exp(sum_{j < i < n} g_i)
// (token j decayed by every later write; the exponent is <= 0). The weights w come from a reverse
// cumulative sum of g on the host in double; two batched GEMMs over the heads do the rest.
// k, v [1, T, H, D], g, s [1, T, H, M] (T >= n) -> Hk [H, D, M], Hv [H, M, D] (overwritten).
void nha_prompt_memory(Tensor& Hk, Tensor& Hv, const Tensor& k, const Tensor& v, const Tensor& g,
                       const Tensor& s, int64_t n) {
  const int64_t H = k.size(2), M = s.size(3), HM = H * M;
  const Tensor gh = g.slice(1, 0, n).to(Device::cpu()).to(DType::F64).contiguous();  // [1, n, H, M]
  const Tensor sh = s.slice(1, 0, n).to(Device::cpu()).to(DType::F64).contiguous();  // [1, n, H, M]
  Tensor w = Tensor::empty({n, H, M}, DType::F64);
  const double *pg = gh.data<double>(), *ps = sh.data<double>();
  double* pw = w.data<double>();
  for (int64_t hm = 0; hm < HM; ++hm) {
    double later = 0;  // sum of g over the tokens after j
    for (int64_t j = n - 1; j >= 0; --j) {
      pw[j * HM + hm] = ps[j * HM + hm] * std::exp(later);
      later += pg[j * HM + hm];
    }
  }
  // [n, H, X] -> per-head matrices [H, n, X] in the state's dtype and device
  auto heads = [&](const Tensor& t) {
    const Tensor per_head = t.reshape({n, H, t.size(-1)}).transpose(0, 1).contiguous();
    return per_head.to(Hk.dtype()).to(Hk.device());
  };
  const Tensor K = heads(k.slice(1, 0, n)), V = heads(v.slice(1, 0, n)), W = heads(w);
  Backend& be = backend_for(Hk);
  be.gemm(Hk, K, W, true, false, 1.0, 0.0);  // [H, D, M] = K^T W
  be.gemm(Hv, W, V, true, false, 1.0, 0.0);  // [H, M, D] = W^T V
}

// [N, A] and [N, C] -> [N, A + C] (the joint softmax's slot and window logits side by side):
// written as rows of the transpose, where both parts are contiguous blocks.
Tensor nha_concat_cols(const Tensor& a, const Tensor& c) {
  const int64_t N = a.size(0), A = a.size(1), C = c.size(1);
  Tensor t = Tensor::empty({A + C, N}, a.dtype(), a.device());
  t.slice(0, 0, A).copy_(a.transpose(0, 1));
  t.slice(0, A, A + C).copy_(c.transpose(0, 1));
  return t.transpose(0, 1).contiguous();
}

}  // namespace

NhaDecodeState NhaMixer::decode_state(int64_t batch, int64_t max_len) const {
  NHA_CHECK(batch >= 1 && max_len >= 1)
      << "nha decode_state: batch and max_len must be positive, got " << batch << ", " << max_len;
  const Tensor& w = wq->weight;
  const int64_t H = n_heads, D = w.size(1) / H, M = slots;
  const DType dt = decode::state_dtype(w);
  const Device dev = w.device();
  NhaDecodeState st;
  st.batch = batch;
  st.start.assign(size_t(batch), 0);
  st.Hk = Tensor::zeros({batch, H, D, M}, dt, dev);
  st.Hv = Tensor::zeros({batch, H, M, D}, dt, dev);
  st.cap = std::min(window, max_len);
  if (st.cap > 0) {
    st.k = Tensor::zeros({st.cap, batch, H, D}, dt, dev);
    st.kr = Tensor::zeros({st.cap, batch, H, D}, dt, dev);
    st.v = Tensor::zeros({st.cap, batch, H, D}, dt, dev);
    st.s = Tensor::zeros({st.cap, batch, H, M}, dt, dev);
  }
  return st;
}

std::unique_ptr<MixerState> NhaMixer::new_state(int64_t batch, int64_t max_len) const {
  return std::make_unique<NhaDecodeState>(decode_state(batch, max_len));
}

std::vector<Tensor> NhaMixer::prefill(const std::vector<Tensor>& xs, MixerState& state) const {
  autograd::NoGradGuard no_grad;
  NhaDecodeState& st = decode::state_as<NhaDecodeState>(state, "nha");
  const int64_t d = wq->weight.size(1), H = n_heads, D = d / H, M = slots;
  const int64_t L = decode::begin_prefill(xs, st, d, "nha");
  NHA_CHECK(st.cap == window || L <= st.cap)
      << "nha prefill: a prompt of " << L << " tokens does not fit the ring of " << st.cap
      << " tokens (window " << window << "). HINT: raise max_len in decode_state";
  std::vector<Tensor> ys, k, kr, v, s;  // per row; the ring parts [1, T_b, H, X]
  for (size_t b = 0; b < xs.size(); ++b) {
    const Projections p = project(xs[b], {0});
    ys.push_back(output(nha_attend(p.q, p.k, p.qr, p.kr, p.v, p.s, p.g, window)));
    // Tokens the prompt's steps wrote into the memory: all of them without a window, those that
    // left a wrapping window otherwise, none while the ring holds every step (cap < window).
    const int64_t T = xs[b].size(1);
    const int64_t written =
        window == 0 ? T : (st.cap == window ? std::max<int64_t>(0, T - window) : 0);
    if (written > 0) {
      Tensor Hk = st.Hk.slice(0, int64_t(b), int64_t(b) + 1).reshape({H, D, M});
      Tensor Hv = st.Hv.slice(0, int64_t(b), int64_t(b) + 1).reshape({H, M, D});
      nha_prompt_memory(Hk, Hv, p.k, p.v, p.g, p.s, written);
    }
    k.push_back(p.k);
    kr.push_back(p.kr);
    v.push_back(p.v);
    s.push_back(p.s);
  }
  if (st.cap > 0) {
    const int64_t n = std::min(L, st.cap);  // the steps still in the window
    decode::ring_write(st.k, L - n, decode::right_aligned_tail(k, n));
    decode::ring_write(st.kr, L - n, decode::right_aligned_tail(kr, n));
    decode::ring_write(st.v, L - n, decode::right_aligned_tail(v, n));
    decode::ring_write(st.s, L - n, decode::right_aligned_tail(s, n));
  }
  return ys;
}

Tensor NhaMixer::step(const Tensor& x_t, MixerState& state) const {
  autograd::NoGradGuard no_grad;
  NhaDecodeState& st = decode::state_as<NhaDecodeState>(state, "nha");
  const int64_t d = wq->weight.size(1), B = st.batch, H = n_heads, D = d / H, M = slots;
  const int64_t BH = B * H;
  decode::check_step_input(x_t, st, d, "nha");
  NHA_CHECK(st.cap == window || st.pos < st.cap)
      << "nha step: token " << st.pos << " does not fit the ring of " << st.cap
      << " tokens (window " << window << "). HINT: raise max_len in decode_state";
  const DType dt = st.Hk.dtype();
  const Device dev = st.Hk.device();
  Projections p = project(x_t, st.positions());
  for (Tensor* t : {&p.q, &p.k, &p.qr, &p.kr, &p.v, &p.s}) *t = t->to(dt).contiguous();
  Tensor Hk = st.Hk.reshape({BH, D, M}), Hv = st.Hv.reshape({BH, M, D});
  if (window == 0) {
    nha_memory_write(Hk, Hv, p.k, p.v, p.s);  // unshifted: the token itself, before the read
  } else {
    if (st.cap == window) {  // token pos - w leaves the window (an empty slot: a no-op)
      const int64_t slot = st.pos % st.cap;
      nha_memory_write(Hk, Hv, st.k.slice(0, slot, slot + 1), st.v.slice(0, slot, slot + 1),
                       st.s.slice(0, slot, slot + 1));
    }
    decode::ring_write(st.k, st.pos, p.k);
    decode::ring_write(st.kr, st.pos, p.kr);
    decode::ring_write(st.v, st.pos, p.v);
    decode::ring_write(st.s, st.pos, p.s);
  }
  // One softmax over [scale q Hk (M slots) ; scale qr . kr_u (the ring)], then
  // o = p[:M] Hv + p[M:] V_ring.
  const double scale = 1.0 / std::sqrt(double(D));
  Backend& be = backend_for(Hk);
  Tensor z = Tensor::empty({BH, 1, M}, dt, dev);  // slot logits
  be.gemm(z, p.q.reshape({BH, 1, D}), Hk, false, false, scale, 0.0);
  const int64_t C = st.cap;
  if (C > 0)
    z = nha_concat_cols(z.reshape({BH, M}),
                        decode::ring_logits(p.qr, st.kr, st, scale).reshape({BH, C}))
            .reshape({BH, 1, M + C});
  const Tensor prob = softmax(z);  // [BH, 1, M + C]
  Tensor o = Tensor::empty({BH, 1, D}, dt, dev);
  be.gemm(o, prob.slice(2, 0, M).contiguous(), Hv, false, false, 1.0, 0.0);
  if (C > 0) decode::ring_read(o, prob.slice(2, M, M + C).contiguous(), st.v, 1.0);
  ++st.pos;
  return output(o.reshape({B, 1, H, D}).to(x_t.dtype()));  // [B, 1, d]
}

}  // namespace nha
