// CPU Native Hybrid Attention core (docs/nha.md §2, §4): the chunkwise forward and backward used for
// CPU training and as the oracle of the CUDA kernels, and the gates.
//
// Layout: q, k, qr, kr [B, T, H, Dk]; v, out [B, T, H, Dv]; s, g [B, T, H, M]; lse [B, H, T].
// Row t of one (b, h) slice of a [B, T, H, X] tensor starts at ((b*T + t)*H + h)*X: a block of
// rows of one head is a strided matrix (leading dimension H*X) that OpenBLAS reads in place.
//
// Plan. OpenMP runs over (b, h); each task walks its head's chunks of C = kChunk rows in order
// (backward: in reverse), carrying the memory state. Arithmetic in the tensors' dtype (f32: sgemm,
// f64: dgemm), except the gate cumsums, their differences and the reverse cumsum of the gate
// gradient (double: long sums whose differences and cancellations matter).
//
// The memory branch of chunk n reads the state at the chunk start (Hk_n [Dk, M], Hv_n [M, Dv])
// plus the chunk's own shifted writes (K'_j = k_{j-w}, S'_j = s_{j-w}, G'_j = g_{j-w},
// V'_j = v_{j-w}; none for j < w). With B_i = inclusive cumsum of G' inside the chunk and
// D_ij = e^{B_i - B_j} (j <= i):
//   lm_i = scale (q_i Hk_n) ⊙ e^{B_i} + sum_{j<=i} A_ij S'_j ⊙ D_ij,   A_ij = scale q_i . K'_j
// The window branch: lw_ij = scale qr_i . kr_j for i - w < j <= i (any w, across chunks). One
// softmax over [lm_i ; lw_i] gives pm_i, pw_i, and
//   o_i = (pm_i ⊙ e^{B_i}) Hv_n + sum_{j<=i} (pm_i . (S'_j ⊙ D_ij)) V'_j + sum_j pw_ij v_j.
// Every exponent is <= 0 because g <= 0 and j <= i: no e^{-B} is ever formed alone, so any gate
// values stay finite and exact (each D_ij is its own exp of B_i - B_j, C^2 M / 2 per chunk).
// Per chunk the products over rows are GEMMs on the strided blocks (Q Hk, Q K'^T, Qr Kr^T, P V,
// the state updates and their transposes in the backward); only the sums weighted by D_ij
// (over j for lm and dpm, over s for W and dA, over i for dS') are loops, vectorized over M.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

#include "core/profile.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/vec_math.h"

namespace nha {

namespace {

// Rows per chunk. The work per token of the D_ij-weighted sums (and their exps) grows with C, the
// GEMMs' efficiency too: of 16, 32 and 64, 16 was fastest on the tiny NHA model (2 cores, profiles
// of 10 steps: nha_forward 1.8 / 2.3 / 3.4 ms per call, nha_backward 3.7 / 4.1 / 5.9 ms).
constexpr int64_t kChunk = 16;

struct NhaDims {
  int64_t B, T, H, Dk, Dv, M;
};

// The cpu kernels read and write every tensor of a call in one dtype; checked up front because a
// mismatch found inside the OpenMP region could not be reported.
void check_one_dtype(const Tensor& q, std::initializer_list<const Tensor*> ts, const char* op) {
  for (const Tensor* t : ts)
    NHA_CHECK(t->dtype() == q.dtype())
        << op << ": the cpu kernel needs one dtype for all tensors, got " << q.str() << " and "
        << t->str();
}

// Checks one nha_forward / nha_backward call's inputs and returns their sizes.
NhaDims nha_dims(const Tensor& q, const Tensor& k, const Tensor& qr, const Tensor& kr,
                 const Tensor& v, const Tensor& s, const Tensor& g, const char* op) {
  NHA_CHECK(q.dim() == 4 && v.dim() == 4 && s.dim() == 4)
      << op << ": q, v, s must be [B, T, H, D] / [B, T, H, M], got " << q.str() << ", " << v.str()
      << ", " << s.str();
  check_same_shape(k, q, op);
  check_same_shape(qr, q, op);
  check_same_shape(kr, q, op);
  check_same_shape(g, s, op);
  const NhaDims d{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3), s.size(3)};
  NHA_CHECK(v.shape() == (Shape{d.B, d.T, d.H, d.Dv}) && s.shape() == (Shape{d.B, d.T, d.H, d.M}))
      << op << ": v " << v.str() << " and s " << s.str() << " must share [B, T, H] with q "
      << q.str();
  check_one_dtype(q, {&k, &qr, &kr, &v, &s, &g}, op);
  return d;
}

// One (b, h) slice of the inputs: row t of q at q + t * ldk, of v at v + t * ldv, of s and g at
// s + t * ldm (ld = H * X: the strides between time steps).
template <typename S>
struct Head {
  const S *q, *k, *qr, *kr, *v, *s, *g;
  int64_t ldk, ldv, ldm, T, Dk, Dv, M, w;
};

template <typename S>
Head<S> head_of(const NhaDims& d, const Tensor& q, const Tensor& k, const Tensor& qr,
                const Tensor& kr, const Tensor& v, const Tensor& s, const Tensor& g, int64_t b,
                int64_t h, int64_t w) {
  const int64_t ok = (b * d.T * d.H + h) * d.Dk, ov = (b * d.T * d.H + h) * d.Dv,
                om = (b * d.T * d.H + h) * d.M;
  return {.q = q.data<S>() + ok, .k = k.data<S>() + ok, .qr = qr.data<S>() + ok,
          .kr = kr.data<S>() + ok, .v = v.data<S>() + ov, .s = s.data<S>() + om,
          .g = g.data<S>() + om, .ldk = d.H * d.Dk, .ldv = d.H * d.Dv, .ldm = d.H * d.M,
          .T = d.T, .Dk = d.Dk, .Dv = d.Dv, .M = d.M, .w = w};
}

// Chunk rows [c0, c0 + n). Local row j carries the memory write of token c0 + j - w exactly when
// j >= j0: np = n - j0 writes, from tokens [src0, src0 + np) (contiguous). The window keys of the
// chunk's queries are [kb, c0 + n): nk of them (none for w = 0).
struct Chunk {
  int64_t c0, n, j0, np, src0, kb, nk;
  Chunk(int64_t chunk_start, int64_t T, int64_t w)
      : c0(chunk_start), n(std::min(kChunk, T - c0)), j0(std::clamp<int64_t>(w - c0, 0, n)),
        np(n - j0), src0(np ? c0 + j0 - w : 0),
        kb(w == 0 ? c0 + n : std::max<int64_t>(0, c0 - w + 1)), nk(c0 + n - kb) {}
  // Window columns of local row i: [win_lo(i), win_hi(i)) (empty for w = 0).
  int64_t win_lo(int64_t i, int64_t w) const {
    return w == 0 ? 0 : std::max<int64_t>(0, c0 + i - w + 1) - kb;
  }
  int64_t win_hi(int64_t i, int64_t w) const { return w == 0 ? 0 : c0 + i + 1 - kb; }
};

// The decay factors of one chunk (sizes for n rows, np writes, jj = j - j0 indexing writes).
template <typename S>
struct Decay {
  std::vector<double> B;  // [n, M]       B_i, inclusive cumsum of G' (0 before j0)
  std::vector<S> eB;      // [n, M]       e^{B_i}; its last row is e^{b}, b = B_{n-1}
  std::vector<S> ebB;     // [np, M]      e^{b - B_j}
  std::vector<S> SE;      // [np, M]      S'_j ⊙ e^{b - B_j}: the writes' weights at the chunk end
  std::vector<S> D;       // [n, np, M]   e^{B_i - B_j} for j0 <= j <= i
  std::vector<S> SD;      // [n, np, M]   S'_j ⊙ D_ij

  const S* eb(const Chunk& c, int64_t M) const { return eB.data() + (c.n - 1) * M; }

  // with_D = false skips D and SD (the backward's pass that only rebuilds the states).
  void build(const Head<S>& x, const Chunk& c, bool with_D) {
    const int64_t M = x.M, n = c.n, np = c.np;
    B.assign(size_t(n * M), 0.0);
    for (int64_t i = c.j0; i < n; ++i) {
      const S* gi = x.g + (c.src0 + i - c.j0) * x.ldm;  // G'_i
      for (int64_t s = 0; s < M; ++s) B[i * M + s] = (i > 0 ? B[(i - 1) * M + s] : 0.0) + gi[s];
    }
    eB.resize(size_t(n * M));
    for (int64_t e = 0; e < n * M; ++e) eB[e] = S(std::exp(B[e]));
    ebB.resize(size_t(np * M));
    SE.resize(size_t(np * M));
    const double* b = B.data() + (n - 1) * M;
    // Exponents first (differences in double), then one vectorized exp over the block.
    for (int64_t jj = 0; jj < np; ++jj) {
      const double* Bj = B.data() + (c.j0 + jj) * M;
      for (int64_t s = 0; s < M; ++s) ebB[jj * M + s] = S(b[s] - Bj[s]);
    }
    exp_shifted(ebB.data(), ebB.data(), S(0), np * M);
    for (int64_t jj = 0; jj < np; ++jj) {
      const S* Sj = x.s + (c.src0 + jj) * x.ldm;
      for (int64_t s = 0; s < M; ++s) SE[jj * M + s] = Sj[s] * ebB[jj * M + s];
    }
    if (!with_D) return;
    D.resize(size_t(n * np * M));
    SD.resize(D.size());
    for (int64_t i = c.j0; i < n; ++i) {
      const int64_t pairs = i - c.j0 + 1;  // j0 <= j <= i: contiguous in D's row i
      const double* Bi = B.data() + i * M;
      S *Di = D.data() + i * np * M, *SDi = SD.data() + i * np * M;
      for (int64_t jj = 0; jj < pairs; ++jj) {
        const double* Bj = B.data() + (c.j0 + jj) * M;
        for (int64_t s = 0; s < M; ++s) Di[jj * M + s] = S(Bi[s] - Bj[s]);
      }
      exp_shifted(Di, Di, S(0), pairs * M);
      for (int64_t jj = 0; jj < pairs; ++jj) {
        const S* Sj = x.s + (c.src0 + jj) * x.ldm;
        for (int64_t s = 0; s < M; ++s) SDi[jj * M + s] = Sj[s] * Di[jj * M + s];
      }
    }
  }
};

// Hk [Dk, M] <- Hk ⊙ e^{b}[None, :] + K'^T SE;   Hv [M, Dv] <- e^{b}[:, None] ⊙ Hv + SE^T V'.
template <typename S>
void advance_state(S* Hk, S* Hv, const Head<S>& x, const Chunk& c, const Decay<S>& dc) {
  const int64_t Dk = x.Dk, Dv = x.Dv, M = x.M;
  const S* eb = dc.eb(c, M);
  for (int64_t d = 0; d < Dk; ++d)
    for (int64_t s = 0; s < M; ++s) Hk[d * M + s] *= eb[s];
  for (int64_t s = 0; s < M; ++s)
    for (int64_t e = 0; e < Dv; ++e) Hv[s * Dv + e] *= eb[s];
  gemm_rm<S>(true, false, Dk, M, c.np, S(1), x.k + c.src0 * x.ldk, x.ldk, dc.SE.data(), M, S(1),
             Hk, M);
  gemm_rm<S>(true, false, M, Dv, c.np, S(1), dc.SE.data(), M, x.v + c.src0 * x.ldv, x.ldv, S(1),
             Hv, Dv);
}

// y [M] += sum_{j0<=j<=i} a_j SD_ij (a indexed by jj = j - j0); off [M], when given, receives y
// before the j = i term, whose SD_ii = S'_i (D_ii = 1) is added last.
template <typename S>
void add_decayed_rows(S* y, const S* a, int64_t i, const Chunk& c, const Decay<S>& dc, int64_t M,
                      S* off) {
  const int64_t diag = i - c.j0;  // jj of j = i; < 0 when row i writes nothing
  for (int64_t jj = 0; jj < diag; ++jj) {
    const S *SDij = dc.SD.data() + (i * c.np + jj) * M, aj = a[jj];
    for (int64_t s = 0; s < M; ++s) y[s] += aj * SDij[s];
  }
  if (off) std::copy_n(y, M, off);
  if (diag >= 0) {
    const S *SDii = dc.SD.data() + (i * c.np + diag) * M, ai = a[diag];
    for (int64_t s = 0; s < M; ++s) y[s] += ai * SDii[s];
  }
}

// The joint logits of the chunk's rows, L [n, M + nk] = [lm ; lw] (window entries outside a row's
// window are -inf), and A [n, np] = scale q_i . K'_j (read for j <= i only). Loff [n, M], when
// given, receives lm without its j = i term (see the gate gradient in backward_head).
template <typename S>
void chunk_logits(S* L, S* A, S* Loff, const Head<S>& x, const Chunk& c, const Decay<S>& dc,
                  const S* Hk, double scale) {
  const int64_t M = x.M, ld = M + c.nk, np = c.np;
  const S* q = x.q + c.c0 * x.ldk;
  gemm_rm<S>(false, false, c.n, M, x.Dk, S(scale), q, x.ldk, Hk, M, S(0), L, ld);
  gemm_rm<S>(false, true, c.n, c.nk, x.Dk, S(scale), x.qr + c.c0 * x.ldk, x.ldk,
             x.kr + c.kb * x.ldk, x.ldk, S(0), L + M, ld);
  gemm_rm<S>(false, true, c.n, np, x.Dk, S(scale), q, x.ldk, x.k + c.src0 * x.ldk, x.ldk, S(0), A,
             np);
  for (int64_t i = 0; i < c.n; ++i) {
    S* lm = L + i * ld;
    for (int64_t s = 0; s < M; ++s) lm[s] *= dc.eB[i * M + s];
    add_decayed_rows(lm, A + i * np, i, c, dc, M, Loff ? Loff + i * M : nullptr);
    S* lw = lm + M;
    std::fill(lw, lw + c.win_lo(i, x.w), -std::numeric_limits<S>::infinity());
    std::fill(lw + c.win_hi(i, x.w), lw + c.nk, -std::numeric_limits<S>::infinity());
  }
}

// X [n, np] with X_ij = sum_s Y_i[s] SD_ij[s] for j0 <= j <= i, 0 elsewhere; Y [n, ldy].
template <typename S>
void decay_dots(S* X, const S* Y, int64_t ldy, const Chunk& c, const Decay<S>& dc, int64_t M) {
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t jj = 0; jj < c.np; ++jj) {
      S a = 0;
      if (jj <= i - c.j0) {
        const S *Yi = Y + i * ldy, *SDij = dc.SD.data() + (i * c.np + jj) * M;
        for (int64_t s = 0; s < M; ++s) a += Yi[s] * SDij[s];
      }
      X[i * c.np + jj] = a;
    }
}

// Per-thread scratch of one (b, h) task, kept across calls: the step allocates nothing here.
template <typename S>
struct Scratch {
  Decay<S> dc;
  std::vector<S> Hk, Hv, states;         // [Dk, M], [M, Dv]; backward: every chunk's start states
  std::vector<S> L, P, dP, dL;           // [n, M + nk]: logits, probabilities, their gradients
  std::vector<S> A, OV, dA, W;           // [n, np]
  std::vector<S> PE, LE, Loff, dPoff;    // [n, M]: pm ⊙ e^B, dlm ⊙ e^B, lm and dpm without j = i
  std::vector<S> dSp, KH;                // [np, M]: dS' without i = j, K'_j dHk + V'_j dHv^T
  std::vector<S> dHk, dHv;               // [Dk, M], [M, Dv]
  std::vector<double> dGsum;             // [M]
};

// Forward of one (b, h): out rows (b, :, h, :) [T, Dv] (stride ldv) and lse [T].
template <typename S>
void forward_head(S* out, S* lse, const Head<S>& x, double scale, Scratch<S>& sc) {
  const int64_t T = x.T, Dv = x.Dv, M = x.M;
  sc.Hk.assign(size_t(x.Dk * M), S(0));
  sc.Hv.assign(size_t(M * Dv), S(0));
  for (int64_t c0 = 0; c0 < T; c0 += kChunk) {
    const Chunk c(c0, T, x.w);
    const int64_t ld = M + c.nk;
    sc.dc.build(x, c, true);
    sc.L.resize(size_t(c.n * ld));
    sc.A.resize(size_t(c.n * c.np));
    chunk_logits(sc.L.data(), sc.A.data(), static_cast<S*>(nullptr), x, c, sc.dc, sc.Hk.data(),
                 scale);
    // Joint softmax of each row, in place: L becomes [pm ; pw].
    for (int64_t i = 0; i < c.n; ++i) {
      S* p = sc.L.data() + i * ld;
      const auto [mx, sum] = exp_minus_max(p, p, ld);
      const S inv = S(1 / sum);
      for (int64_t e = 0; e < ld; ++e) p[e] *= inv;
      lse[c0 + i] = S(double(mx) + std::log(sum));
    }
    // o = (pm ⊙ e^B) Hv_n + W V' + pw V[kb:],  W_ij = pm_i . SD_ij.
    sc.PE.resize(size_t(c.n * M));
    for (int64_t i = 0; i < c.n; ++i)
      for (int64_t s = 0; s < M; ++s) sc.PE[i * M + s] = sc.L[i * ld + s] * sc.dc.eB[i * M + s];
    sc.W.resize(size_t(c.n * c.np));
    decay_dots(sc.W.data(), sc.L.data(), ld, c, sc.dc, M);
    S* o = out + c0 * x.ldv;
    gemm_rm<S>(false, false, c.n, Dv, M, S(1), sc.PE.data(), M, sc.Hv.data(), Dv, S(0), o, x.ldv);
    gemm_rm<S>(false, false, c.n, Dv, c.np, S(1), sc.W.data(), c.np, x.v + c.src0 * x.ldv, x.ldv,
               S(1), o, x.ldv);
    gemm_rm<S>(false, false, c.n, Dv, c.nk, S(1), sc.L.data() + M, ld, x.v + c.kb * x.ldv, x.ldv,
               S(1), o, x.ldv);
    advance_state(sc.Hk.data(), sc.Hv.data(), x, c, sc.dc);
  }
}

// Gradients of one (b, h): rows of the gradient tensors, strided like the inputs.
template <typename S>
struct HeadGrads {
  S *dq, *dk, *dqr, *dkr, *dv, *ds, *dg;
};

// Backward of one (b, h) (docs/nha.md §4 backward, steps (a)-(f)). dO rows at dout + t * ldv.
// Chunks run in reverse; dHk [Dk, M] and dHv [M, Dv] carry dL/d(state at the next chunk's start),
// dGsum [M] the reverse cumsum of the gate terms (e). dk, dv, dkr receive contributions from
// several chunks (the window reaches back, and the writes K'_j, V'_j are earlier tokens): they are
// zeroed first and accumulated; dq, dqr are written per chunk; ds, dg per written token (zero for
// the last w tokens, which are never written).
template <typename S>
void backward_head(const HeadGrads<S>& gr, const S* dout, const S* lse, const Head<S>& x,
                   double scale, Scratch<S>& sc) {
  const int64_t T = x.T, Dk = x.Dk, Dv = x.Dv, M = x.M;
  const int64_t n_chunks = (T + kChunk - 1) / kChunk, state = Dk * M + M * Dv;
  for (int64_t t = 0; t < T; ++t) {
    std::fill_n(gr.dk + t * x.ldk, Dk, S(0));
    std::fill_n(gr.dkr + t * x.ldk, Dk, S(0));
    std::fill_n(gr.dv + t * x.ldv, Dv, S(0));
    std::fill_n(gr.ds + t * x.ldm, M, S(0));
    std::fill_n(gr.dg + t * x.ldm, M, S(0));
  }
  // Chunk-start states [n_chunks, Dk*M + M*Dv] (Hk_n then Hv_n), recomputed forward.
  sc.states.assign(size_t(n_chunks * state), S(0));
  for (int64_t n = 0; n + 1 < n_chunks; ++n) {
    const Chunk c(n * kChunk, T, x.w);
    S* next = sc.states.data() + (n + 1) * state;
    std::copy_n(sc.states.data() + n * state, state, next);
    sc.dc.build(x, c, false);
    advance_state(next, next + Dk * M, x, c, sc.dc);
  }
  sc.dHk.assign(size_t(Dk * M), S(0));
  sc.dHv.assign(size_t(M * Dv), S(0));
  sc.dGsum.assign(size_t(M), 0.0);
  S *dHk = sc.dHk.data(), *dHv = sc.dHv.data();
  for (int64_t n = n_chunks - 1; n >= 0; --n) {
    const Chunk c(n * kChunk, T, x.w);
    const Decay<S>& dc = sc.dc;
    sc.dc.build(x, c, true);
    const int64_t c0 = c.c0, nc = c.n, np = c.np, ld = M + c.nk;
    const S* Hk = sc.states.data() + n * state;
    const S* Hv = Hk + Dk * M;
    const S *q = x.q + c0 * x.ldk, *dO = dout + c0 * x.ldv;
    const S *Kp = x.k + c.src0 * x.ldk, *Vp = x.v + c.src0 * x.ldv;  // K', V' [np, D]
    for (auto* buf : {&sc.L, &sc.P, &sc.dP, &sc.dL}) buf->resize(size_t(nc * ld));
    for (auto* buf : {&sc.A, &sc.OV, &sc.dA, &sc.W}) buf->resize(size_t(nc * np));
    for (auto* buf : {&sc.PE, &sc.LE, &sc.Loff, &sc.dPoff}) buf->resize(size_t(nc * M));
    for (auto* buf : {&sc.dSp, &sc.KH}) buf->assign(size_t(np * M), S(0));
    S *L = sc.L.data(), *P = sc.P.data(), *dP = sc.dP.data(), *dL = sc.dL.data();
    S *A = sc.A.data(), *OV = sc.OV.data(), *dA = sc.dA.data(), *W = sc.W.data();
    S *PE = sc.PE.data(), *LE = sc.LE.data(), *dSp = sc.dSp.data(), *KH = sc.KH.data();
    S *Loff = sc.Loff.data(), *dPoff = sc.dPoff.data();

    chunk_logits(L, A, Loff, x, c, dc, Hk, scale);
    for (int64_t i = 0; i < nc; ++i)  // the forward's joint softmax, from its lse
      exp_shifted(P + i * ld, L + i * ld, lse[c0 + i], ld);
    // (a) dpm_i = (dO_i Hv_n^T) ⊙ e^{B_i} + sum_{j<=i} (dO_i . V'_j) SD_ij;  dpw = dO V[kb:]^T.
    gemm_rm<S>(false, true, nc, M, Dv, S(1), dO, x.ldv, Hv, Dv, S(0), dP, ld);
    gemm_rm<S>(false, true, nc, np, Dv, S(1), dO, x.ldv, Vp, x.ldv, S(0), OV, np);
    gemm_rm<S>(false, true, nc, c.nk, Dv, S(1), dO, x.ldv, x.v + c.kb * x.ldv, x.ldv, S(0),
               dP + M, ld);
    for (int64_t i = 0; i < nc; ++i) {
      S* dpm = dP + i * ld;
      for (int64_t s = 0; s < M; ++s) dpm[s] *= dc.eB[i * M + s];
      add_decayed_rows(dpm, OV + i * np, i, c, dc, M, dPoff + i * M);
      // (b) joint softmax: dL = P (dP - <P, dP>).
      double delta = 0;
      for (int64_t e = 0; e < ld; ++e) delta += double(P[i * ld + e]) * double(dP[i * ld + e]);
      for (int64_t e = 0; e < ld; ++e) dL[i * ld + e] = P[i * ld + e] * (dP[i * ld + e] - S(delta));
      for (int64_t s = 0; s < M; ++s) {
        PE[i * M + s] = P[i * ld + s] * dc.eB[i * M + s];
        LE[i * M + s] = dL[i * ld + s] * dc.eB[i * M + s];
      }
    }
    // (a, c) window: dv[kb:] += pw^T dO;  dqr = scale dlw kr[kb:];  dkr[kb:] += scale dlw^T qr.
    gemm_rm<S>(true, false, c.nk, Dv, nc, S(1), P + M, ld, dO, x.ldv, S(1), gr.dv + c.kb * x.ldv,
               x.ldv);
    gemm_rm<S>(false, false, nc, Dk, c.nk, S(scale), dL + M, ld, x.kr + c.kb * x.ldk, x.ldk, S(0),
               gr.dqr + c0 * x.ldk, x.ldk);
    gemm_rm<S>(true, false, c.nk, Dk, nc, S(scale), dL + M, ld, x.qr + c0 * x.ldk, x.ldk, S(1),
               gr.dkr + c.kb * x.ldk, x.ldk);
    // (d) dA_ij = dlm_i . SD_ij;  dq = scale (dlm ⊙ e^B) Hk_n^T + scale dA K'.
    decay_dots(dA, dL, ld, c, dc, M);
    decay_dots(W, P, ld, c, dc, M);
    S* dq = gr.dq + c0 * x.ldk;
    gemm_rm<S>(false, true, nc, Dk, M, S(scale), LE, M, Hk, M, S(0), dq, x.ldk);
    gemm_rm<S>(false, false, nc, Dk, np, S(scale), dA, np, Kp, x.ldk, S(1), dq, x.ldk);

    // Gradients of the chunk's writes K'_j, V'_j, S'_j (un-shifted (f): rows src0.. of dk, dv, ds)
    // from the rows i >= j of this chunk and from the carried dHk, dHv.
    S *dKp = gr.dk + c.src0 * x.ldk, *dVp = gr.dv + c.src0 * x.ldv;
    gemm_rm<S>(true, false, np, Dv, nc, S(1), W, np, dO, x.ldv, S(1), dVp, x.ldv);
    gemm_rm<S>(true, false, np, Dk, nc, S(scale), dA, np, q, x.ldk, S(1), dKp, x.ldk);
    gemm_rm<S>(false, true, np, Dk, M, S(1), dc.SE.data(), M, dHk, M, S(1), dKp, x.ldk);
    gemm_rm<S>(false, false, np, Dv, M, S(1), dc.SE.data(), M, dHv, Dv, S(1), dVp, x.ldv);
    gemm_rm<S>(false, false, np, M, Dk, S(1), Kp, x.ldk, dHk, M, S(0), KH, M);
    gemm_rm<S>(false, true, np, M, Dv, S(1), Vp, x.ldv, dHv, Dv, S(1), KH, M);
    // dS'_j = sum_{i>=j} (OV_ij pm_i + A_ij dlm_i) ⊙ D_ij + e^{b-B_j} ⊙ (K'_j dHk + V'_j dHv^T);
    // dSp holds it without the i = j term (D_jj = 1), which is added on the way out.
    for (int64_t i = c.j0; i < nc; ++i)
      for (int64_t jj = 0; jj < i - c.j0; ++jj) {
        const S ov = OV[i * np + jj], a = A[i * np + jj];
        const S *pm = P + i * ld, *dlm = dL + i * ld, *Dij = dc.D.data() + (i * np + jj) * M;
        S* dS = dSp + jj * M;
        for (int64_t s = 0; s < M; ++s) dS[s] += (ov * pm[s] + a * dlm[s]) * Dij[s];
      }
    for (int64_t jj = 0; jj < np; ++jj) {
      const int64_t i = c.j0 + jj;
      const S ov = OV[i * np + jj], a = A[i * np + jj], *pm = P + i * ld, *dlm = dL + i * ld;
      S *ds = gr.ds + (c.src0 + jj) * x.ldm, *dS = dSp + jj * M;
      for (int64_t s = 0; s < M; ++s) {
        dS[s] += dc.ebB[jj * M + s] * KH[jj * M + s];
        ds[s] = dS[s] + (ov * pm[s] + a * dlm[s]);
      }
    }

    // (e) gates: dG'_t = sum_{u>=t} [dpm ⊙ pm + dlm ⊙ lm - dS' ⊙ S']_u, then un-shifted. The terms
    // of the pairs i = j = u (D_uu = 1 does not depend on the gates) cancel exactly between the
    // three products and are left out of each: with strong decay they are most of each product,
    // and in f32 their rounding would swamp dg (measured: 8e-4 relative error at f ~ N(-60, 2)).
    for (int64_t i = nc - 1; i >= 0; --i) {
      const int64_t jj = i - c.j0;
      for (int64_t s = 0; s < M; ++s)
        sc.dGsum[s] += double(dPoff[i * M + s]) * double(P[i * ld + s]) +
                       double(dL[i * ld + s]) * double(Loff[i * M + s]) -
                       (jj >= 0 ? double(dSp[jj * M + s]) * double(x.s[(c.src0 + jj) * x.ldm + s])
                                : 0.0);
      if (jj >= 0)
        for (int64_t s = 0; s < M; ++s) gr.dg[(c.src0 + jj) * x.ldm + s] = S(sc.dGsum[s]);
    }

    // Carries to the previous chunk: dHv <- e^{b}[:, None] ⊙ dHv + (pm ⊙ e^B)^T dO,
    //                                dHk <- dHk ⊙ e^{b}[None, :] + scale q^T (dlm ⊙ e^B).
    const S* eb = dc.eb(c, M);
    for (int64_t s = 0; s < M; ++s)
      for (int64_t e = 0; e < Dv; ++e) dHv[s * Dv + e] *= eb[s];
    for (int64_t d = 0; d < Dk; ++d)
      for (int64_t s = 0; s < M; ++s) dHk[d * M + s] *= eb[s];
    gemm_rm<S>(true, false, M, Dv, nc, S(1), PE, M, dO, x.ldv, S(1), dHv, Dv);
    gemm_rm<S>(true, false, Dk, M, nc, S(scale), q, x.ldk, LE, M, S(1), dHk, M);
  }
}

// Multiply-adds of one pass over all heads: thread only when it outweighs starting a parallel
// region (gradient checks call the kernels thousands of times on tiny inputs).
inline bool worth_threading(const NhaDims& d, int64_t w) {
  const int64_t span = kChunk + d.M + std::min(w, d.T);
  return d.B * d.H * d.T * span * (d.Dk + d.Dv) > (int64_t(1) << 16);
}

}  // namespace

void CpuBackend::nha_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& qr, const Tensor& kr, const Tensor& v, const Tensor& s,
                             const Tensor& g, double scale, int64_t window) {
  NHA_PROFILE_SCOPE("nha_forward");
  const NhaDims d = nha_dims(q, k, qr, kr, v, s, g, "nha_forward");
  check_same_shape(out, v, "nha_forward out");
  check_one_dtype(q, {&out}, "nha_forward");
  NHA_CHECK(lse.shape() == (Shape{d.B, d.H, d.T}) && lse.dtype() == q.dtype())
      << "nha_forward: lse must be " << dtype_name(q.dtype()) << shape_str({d.B, d.H, d.T})
      << ", got " << lse.str();
  NHA_CHECK(window >= 0) << "nha_forward: window must be >= 0, got " << window;
  dispatch_floating(q, "nha_forward", [&]<typename S>() {
#pragma omp parallel if (worth_threading(d, window))
    {
      static thread_local Scratch<S> sc;
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < d.B; ++b)
        for (int64_t h = 0; h < d.H; ++h)
          forward_head<S>(out.data<S>() + (b * d.T * d.H + h) * d.Dv,
                          lse.data<S>() + (b * d.H + h) * d.T,
                          head_of<S>(d, q, k, qr, kr, v, s, g, b, h, window), scale, sc);
    }
  });
}

void CpuBackend::nha_backward(Tensor& dq, Tensor& dk, Tensor& dqr, Tensor& dkr, Tensor& dv,
                              Tensor& ds, Tensor& dg, const Tensor& dout, const Tensor& q,
                              const Tensor& k, const Tensor& qr, const Tensor& kr, const Tensor& v,
                              const Tensor& s, const Tensor& g, const Tensor& out,
                              const Tensor& lse, double scale, int64_t window) {
  NHA_PROFILE_SCOPE("nha_backward");
  const NhaDims d = nha_dims(q, k, qr, kr, v, s, g, "nha_backward");
  check_same_shape(dout, v, "nha_backward dout");
  check_same_shape(out, v, "nha_backward out");
  for (const Tensor* t : {&dq, &dk, &dqr, &dkr}) check_same_shape(*t, q, "nha_backward dq/dk");
  check_same_shape(dv, v, "nha_backward dv");
  check_same_shape(ds, s, "nha_backward ds");
  check_same_shape(dg, s, "nha_backward dg");
  check_one_dtype(q, {&dq, &dk, &dqr, &dkr, &dv, &ds, &dg, &dout, &out}, "nha_backward");
  NHA_CHECK(lse.shape() == (Shape{d.B, d.H, d.T}) && lse.dtype() == q.dtype())
      << "nha_backward: lse must be " << dtype_name(q.dtype()) << shape_str({d.B, d.H, d.T})
      << ", got " << lse.str();
  NHA_CHECK(window >= 0) << "nha_backward: window must be >= 0, got " << window;
  // out is not read: the row softmax is rebuilt from the logits and lse, and <p, dp> from it.
  dispatch_floating(q, "nha_backward", [&]<typename S>() {
#pragma omp parallel if (worth_threading(d, window))
    {
      static thread_local Scratch<S> sc;
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < d.B; ++b)
        for (int64_t h = 0; h < d.H; ++h) {
          const int64_t ok = (b * d.T * d.H + h) * d.Dk, ov = (b * d.T * d.H + h) * d.Dv,
                        om = (b * d.T * d.H + h) * d.M;
          const HeadGrads<S> gr{dq.data<S>() + ok,  dk.data<S>() + ok, dqr.data<S>() + ok,
                                dkr.data<S>() + ok, dv.data<S>() + ov, ds.data<S>() + om,
                                dg.data<S>() + om};
          backward_head<S>(gr, dout.data<S>() + ov, lse.data<S>() + (b * d.H + h) * d.T,
                           head_of<S>(d, q, k, qr, kr, v, s, g, b, h, window), scale, sc);
        }
    }
  });
}

// Elementwise ops of at least this many elements run on all threads.
constexpr int64_t kGateThreading = 16384;

// g = logsigmoid(f) / 8 = (min(f, 0) - log1p(e^{-|f|})) / 8 (stable for any f);  s = 1 - e^g.
// Computed in the tensors' dtype (f32: the float functions, a third of the double ones' time).
void CpuBackend::nha_gate_forward(Tensor& g, Tensor& s, const Tensor& f) {
  NHA_PROFILE_SCOPE("nha_gate_forward");
  check_same_shape(g, f, "nha_gate_forward g");
  check_same_shape(s, f, "nha_gate_forward s");
  check_one_dtype(f, {&g, &s}, "nha_gate_forward");
  dispatch_floating(f, "nha_gate_forward", [&]<typename S>() {
    const S* pf = f.data<S>();
    S *pg = g.data<S>(), *ps = s.data<S>();
    const int64_t n = f.numel();
#pragma omp parallel for schedule(static) if (n >= kGateThreading)
    for (int64_t i = 0; i < n; ++i) {
      const S x = pf[i];
      const S gi = (std::min(x, S(0)) - std::log1p(std::exp(-std::abs(x)))) / S(8);
      pg[i] = gi;
      ps[i] = -std::expm1(gi);
    }
  });
}

// df = (dg - e^g ds) * sigmoid(-f) / 8, with e = e^{-|f|}: sigmoid(-f) = (f >= 0 ? e : 1) / (1 + e)
void CpuBackend::nha_gate_backward(Tensor& df, const Tensor& dg, const Tensor& ds,
                                   const Tensor& f) {
  NHA_PROFILE_SCOPE("nha_gate_backward");
  check_same_shape(df, f, "nha_gate_backward df");
  check_same_shape(dg, f, "nha_gate_backward dg");
  check_same_shape(ds, f, "nha_gate_backward ds");
  check_one_dtype(f, {&df, &dg, &ds}, "nha_gate_backward");
  dispatch_floating(f, "nha_gate_backward", [&]<typename S>() {
    const S *pf = f.data<S>(), *pdg = dg.data<S>(), *pds = ds.data<S>();
    S* pdf = df.data<S>();
    const int64_t n = f.numel();
#pragma omp parallel for schedule(static) if (n >= kGateThreading)
    for (int64_t i = 0; i < n; ++i) {
      const S x = pf[i], e = std::exp(-std::abs(x));
      const S g = (std::min(x, S(0)) - std::log1p(e)) / S(8);
      const S sig_neg = (x >= 0 ? e : S(1)) / (S(1) + e);
      pdf[i] = (pdg[i] - std::exp(g) * pds[i]) * sig_neg / S(8);
    }
  });
}

}  // namespace nha
