// CPU Native Hybrid Attention core (docs/nha.md §2, §4): the chunkwise forward and backward used for
// CPU training and as the oracle of the CUDA kernels, and the gates.
//
// Layout: q, k, qr, kr [B, T, H, Dk]; v, out [B, T, H, Dv]; s, g [B, T, H, M]; lse [B, H, T].
// Row t of one (b, h) slice of a [B, T, H, X] tensor starts at ((b*T + t)*H + h)*X.
//
// Plan. OpenMP runs over (b, h); each task gathers its slice into contiguous double rows
// (HeadData), runs the whole sequence in double, and scatters the results back in the tensor's
// dtype. So the algorithm below is plain double code, written once for f32 and f64.
//
// Per (b, h) the sequence is cut into chunks of C = 64 rows. The memory branch reads the state
// at the chunk start (Hk_n [Dk, M], Hv_n [M, Dv]) plus the chunk's own shifted writes
// (K'_j = k_{j-w}, S'_j = s_{j-w}, G'_j = g_{j-w}, V'_j = v_{j-w}; none for j < w). With
// B_i = inclusive cumsum of G' inside the chunk and D_ij = e^{B_i - B_j} (j <= i):
//   lm_i = scale (q_i Hk_n) ⊙ e^{B_i} + sum_{j<=i} A_ij S'_j ⊙ D_ij,   A_ij = scale q_i . K'_j
// The window branch is direct: lw_ij = scale qr_i . kr_j for i - w < j <= i (any w, across
// chunks). One softmax over [lm_i ; lw_i] gives pm_i, pw_i, and
//   o_i = (pm_i ⊙ e^{B_i}) Hv_n + sum_{j<=i} (pm_i . (S'_j ⊙ D_ij)) V'_j + sum_j pw_ij v_j.
// Every exponent is <= 0 because g <= 0 and j <= i: no e^{-B} is ever formed alone.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

namespace {

constexpr int64_t kChunk = 64;

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

// One (b, h) slice of the inputs as contiguous double rows (time-major).
struct HeadData {
  int64_t T, Dk, Dv, M;
  std::vector<double> q, k, qr, kr;  // [T, Dk] each
  std::vector<double> v;             // [T, Dv]
  std::vector<double> s, g;          // [T, M] each
};

// gather_rows copies rows (b, 0..T-1, h, :) of a [B, T, H, X] tensor into dst [T, X] as double;
// scatter_rows writes such rows back in the tensor's dtype.
template <typename S>
void gather_rows(std::vector<double>& dst, const Tensor& t, int64_t b, int64_t h) {
  const int64_t T = t.size(1), H = t.size(2), X = t.size(3);
  const S* p = t.data<S>() + (b * T * H + h) * X;
  dst.resize(size_t(T * X));
  for (int64_t r = 0; r < T; ++r)
    for (int64_t x = 0; x < X; ++x) dst[size_t(r * X + x)] = double(p[r * H * X + x]);
}
template <typename S>
void scatter_rows(Tensor& t, const std::vector<double>& src, int64_t b, int64_t h) {
  const int64_t T = t.size(1), H = t.size(2), X = t.size(3);
  S* p = t.data<S>() + (b * T * H + h) * X;
  for (int64_t r = 0; r < T; ++r)
    for (int64_t x = 0; x < X; ++x) p[r * H * X + x] = S(src[size_t(r * X + x)]);
}

template <typename S>
HeadData gather_head(const NhaDims& d, const Tensor& q, const Tensor& k, const Tensor& qr,
                     const Tensor& kr, const Tensor& v, const Tensor& s, const Tensor& g, int64_t b,
                     int64_t h) {
  HeadData x{d.T, d.Dk, d.Dv, d.M, {}, {}, {}, {}, {}, {}, {}};
  gather_rows<S>(x.q, q, b, h);
  gather_rows<S>(x.k, k, b, h);
  gather_rows<S>(x.qr, qr, b, h);
  gather_rows<S>(x.kr, kr, b, h);
  gather_rows<S>(x.v, v, b, h);
  gather_rows<S>(x.s, s, b, h);
  gather_rows<S>(x.g, g, b, h);
  return x;
}

// First key of query t's window: t - w < j <= t. w = 0 means no window (empty range).
inline int64_t window_begin(int64_t t, int64_t w) {
  return w <= 0 ? t + 1 : std::max<int64_t>(0, t - w + 1);
}

// The decay factors of chunk rows [c0, c0 + n). Local row j carries a memory write of token
// c0 + j - w exactly when j >= j0; rows before j0 have G' = 0, S' = 0 (nothing written yet).
struct ChunkDecay {
  int64_t c0 = 0, n = 0, j0 = 0, M = 0;
  std::vector<double> eB;   // [n, M]     e^{B_i}, B = inclusive cumsum of G' in the chunk
  std::vector<double> ebB;  // [n, M]     e^{b - B_j}, b = B_{n-1}
  std::vector<double> D;    // [n, n, M]  e^{B_i - B_j}, filled for j0 <= j <= i only

  const double* eb() const { return eB.data() + (n - 1) * M; }  // e^{b} [M]
  const double* Dij(int64_t i, int64_t j) const { return D.data() + (i * n + j) * M; }

  // with_D = false skips the [n, n, M] matrix (the state-only pass of the backward).
  void build(const HeadData& x, int64_t chunk_start, int64_t w, bool with_D) {
    c0 = chunk_start;
    n = std::min(kChunk, x.T - c0);
    j0 = std::clamp<int64_t>(w - c0, 0, n);
    M = x.M;
    std::vector<double> B(size_t(n * M), 0.0);  // [n, M]
    for (int64_t i = j0; i < n; ++i) {
      const double* gi = x.g.data() + (c0 + i - w) * M;  // G'_i = g_{t-w}
      for (int64_t s = 0; s < M; ++s) B[i * M + s] = (i > 0 ? B[(i - 1) * M + s] : 0.0) + gi[s];
    }
    eB.resize(size_t(n * M));
    ebB.resize(size_t(n * M));
    const double* b = B.data() + (n - 1) * M;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t s = 0; s < M; ++s) {
        eB[i * M + s] = std::exp(B[i * M + s]);
        ebB[i * M + s] = std::exp(b[s] - B[i * M + s]);
      }
    if (!with_D) return;
    D.resize(size_t(n * n * M));
    for (int64_t i = j0; i < n; ++i)
      for (int64_t j = j0; j <= i; ++j)
        for (int64_t s = 0; s < M; ++s)
          D[(i * n + j) * M + s] = std::exp(B[i * M + s] - B[j * M + s]);
  }
};

// Pointers to the shifted memory inputs of local row j (valid for j >= c.j0).
struct Primes {
  const HeadData& x;
  const ChunkDecay& c;
  int64_t w;
  int64_t src(int64_t j) const { return c.c0 + j - w; }  // the token written at row c0 + j
  const double* K(int64_t j) const { return x.k.data() + src(j) * x.Dk; }
  const double* V(int64_t j) const { return x.v.data() + src(j) * x.Dv; }
  const double* S(int64_t j) const { return x.s.data() + src(j) * x.M; }
};

// A[i, j] = scale q_i . K'_j for j0 <= j <= i.    A [n, n]
void memory_scores(std::vector<double>& A, const Primes& P, double scale) {
  const ChunkDecay& c = P.c;
  A.assign(size_t(c.n * c.n), 0.0);
  for (int64_t i = c.j0; i < c.n; ++i)
    for (int64_t j = c.j0; j <= i; ++j)
      A[i * c.n + j] = scale * dot_double(P.x.q.data() + (c.c0 + i) * P.x.Dk, P.K(j), P.x.Dk);
}

// lm_i = scale (q_i Hk_n) ⊙ e^{B_i} + sum_{j0<=j<=i} A_ij S'_j ⊙ D_ij.    lm [M], Hk [Dk, M]
void memory_logits(double* lm, const Primes& P, const std::vector<double>& A, const double* Hk,
                   int64_t i, double scale) {
  const HeadData& x = P.x;
  const ChunkDecay& c = P.c;
  const int64_t M = x.M;
  const double* qi = x.q.data() + (c.c0 + i) * x.Dk;
  std::fill(lm, lm + M, 0.0);
  for (int64_t d = 0; d < x.Dk; ++d)
    for (int64_t s = 0; s < M; ++s) lm[s] += qi[d] * Hk[d * M + s];
  for (int64_t s = 0; s < M; ++s) lm[s] *= scale * c.eB[i * M + s];
  for (int64_t j = c.j0; j <= i; ++j) {
    const double *Sj = P.S(j), *Dij = c.Dij(i, j);
    for (int64_t s = 0; s < M; ++s) lm[s] += A[i * c.n + j] * Sj[s] * Dij[s];
  }
}

// Window logits of query t: lw[j - j_begin] = scale qr_t . kr_j.    lw [t - j_begin + 1]
void window_logits(double* lw, const HeadData& x, int64_t t, int64_t w, double scale) {
  const double* qt = x.qr.data() + t * x.Dk;
  for (int64_t j = window_begin(t, w); j <= t; ++j)
    *lw++ = scale * dot_double(qt, x.kr.data() + j * x.Dk, x.Dk);
}

// Hk_{n+1} = Hk_n ⊙ e^{b}[None,:] + sum_j K'_j (S'_j ⊙ e^{b-B_j})^T      Hk [Dk, M]
// Hv_{n+1} = e^{b}[:,None] ⊙ Hv_n + sum_j (S'_j ⊙ e^{b-B_j}) V'_j^T      Hv [M, Dv]
void advance_state(std::vector<double>& Hk, std::vector<double>& Hv, const Primes& P) {
  const ChunkDecay& c = P.c;
  const int64_t Dk = P.x.Dk, Dv = P.x.Dv, M = P.x.M;
  const double* eb = c.eb();
  for (int64_t d = 0; d < Dk; ++d)
    for (int64_t s = 0; s < M; ++s) Hk[d * M + s] *= eb[s];
  for (int64_t s = 0; s < M; ++s)
    for (int64_t e = 0; e < Dv; ++e) Hv[s * Dv + e] *= eb[s];
  for (int64_t j = c.j0; j < c.n; ++j) {
    const double *Kj = P.K(j), *Vj = P.V(j), *Sj = P.S(j), *ebBj = c.ebB.data() + j * M;
    for (int64_t s = 0; s < M; ++s) {
      const double w_s = Sj[s] * ebBj[s];
      for (int64_t d = 0; d < Dk; ++d) Hk[d * M + s] += Kj[d] * w_s;
      for (int64_t e = 0; e < Dv; ++e) Hv[s * Dv + e] += w_s * Vj[e];
    }
  }
}

// Softmax over z [n] in place; returns log sum exp(z).
double softmax_inplace(double* z, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, z[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (z[i] = std::exp(z[i] - mx));
  for (int64_t i = 0; i < n; ++i) z[i] /= sum;
  return mx + std::log(sum);
}

// Forward of one (b, h): out [T, Dv], lse [T].
void forward_head(const HeadData& x, double scale, int64_t w, std::vector<double>& out,
                  std::vector<double>& lse) {
  const int64_t T = x.T, Dv = x.Dv, M = x.M;
  std::vector<double> Hk(size_t(x.Dk * M), 0.0), Hv(size_t(M * Dv), 0.0);  // [Dk, M], [M, Dv]
  std::vector<double> p(size_t(M + std::min(w, T)));  // logits, then probabilities [lm ; lw]
  std::vector<double> A;
  out.assign(size_t(T * Dv), 0.0);
  lse.resize(size_t(T));
  ChunkDecay c;
  for (int64_t c0 = 0; c0 < T; c0 += kChunk) {
    c.build(x, c0, w, true);
    const Primes P{x, c, w};
    memory_scores(A, P, scale);
    for (int64_t i = 0; i < c.n; ++i) {
      const int64_t t = c0 + i, jb = window_begin(t, w), nw = t + 1 - jb;
      memory_logits(p.data(), P, A, Hk.data(), i, scale);
      window_logits(p.data() + M, x, t, w, scale);
      lse[t] = softmax_inplace(p.data(), M + nw);
      // o_i = (pm ⊙ e^{B_i}) Hv_n + sum_j (pm . (S'_j ⊙ D_ij)) V'_j + sum_j pw_j v_j
      double* o = out.data() + t * Dv;
      for (int64_t s = 0; s < M; ++s) {
        const double ps = p[s] * c.eB[i * M + s];
        for (int64_t e = 0; e < Dv; ++e) o[e] += ps * Hv[s * Dv + e];
      }
      for (int64_t j = c.j0; j <= i; ++j) {
        const double *Sj = P.S(j), *Dij = c.Dij(i, j), *Vj = P.V(j);
        double a = 0;
        for (int64_t s = 0; s < M; ++s) a += p[s] * Sj[s] * Dij[s];
        for (int64_t e = 0; e < Dv; ++e) o[e] += a * Vj[e];
      }
      for (int64_t j = jb; j <= t; ++j)
        for (int64_t e = 0; e < Dv; ++e) o[e] += p[M + j - jb] * x.v[j * Dv + e];
    }
    advance_state(Hk, Hv, P);
  }
}

// Gradients of one (b, h), all [T, X] like the inputs.
struct HeadGrads {
  std::vector<double> dq, dk, dqr, dkr, dv, ds, dg;
};

// Backward of one (b, h) (docs/nha.md §4 backward, steps (a)-(f)). dO [T, Dv], lse [T].
// Chunks run in reverse; dHk [Dk, M] and dHv [M, Dv] carry dL/d(state at the next chunk's start),
// dGsum [M] the reverse cumsum of the gate terms (e). The window branch is handled row by row:
// its scatters (dkr_j, dv_j into earlier rows) stay inside this (b, h) task, so no races.
HeadGrads backward_head(const HeadData& x, const std::vector<double>& dO,
                        const std::vector<double>& lse, double scale, int64_t w) {
  const int64_t T = x.T, Dk = x.Dk, Dv = x.Dv, M = x.M;
  const int64_t n_chunks = (T + kChunk - 1) / kChunk;
  HeadGrads gr;
  for (auto* buf : {&gr.dq, &gr.dk, &gr.dqr, &gr.dkr}) buf->assign(size_t(T * Dk), 0.0);
  gr.dv.assign(size_t(T * Dv), 0.0);
  gr.ds.assign(size_t(T * M), 0.0);
  gr.dg.assign(size_t(T * M), 0.0);

  // Chunk-start states Hk_n [Dk, M], Hv_n [M, Dv] for every chunk n (recomputed forward).
  std::vector<double> Hk_all(size_t(n_chunks * Dk * M)), Hv_all(size_t(n_chunks * M * Dv));
  {
    std::vector<double> Hk(size_t(Dk * M), 0.0), Hv(size_t(M * Dv), 0.0);
    ChunkDecay c;
    for (int64_t n = 0; n < n_chunks; ++n) {
      std::copy(Hk.begin(), Hk.end(), Hk_all.begin() + n * Dk * M);
      std::copy(Hv.begin(), Hv.end(), Hv_all.begin() + n * M * Dv);
      c.build(x, n * kChunk, w, false);
      advance_state(Hk, Hv, Primes{x, c, w});
    }
  }

  std::vector<double> dHk(size_t(Dk * M), 0.0), dHv(size_t(M * Dv), 0.0), dGsum(size_t(M), 0.0);
  std::vector<double> A, dA, OV;              // [n, n]: A_ij, dA_ij, dO_i . V'_j
  std::vector<double> lm, pm, dpm, dlm, dSp;  // [n, M]
  std::vector<double> pw(size_t(std::min(w, T))), dpw(pw.size());  // one row's window: p, dO.v
  ChunkDecay c;
  for (int64_t n = n_chunks - 1; n >= 0; --n) {
    c.build(x, n * kChunk, w, true);
    const Primes P{x, c, w};
    const int64_t c0 = c.c0, nc = c.n, j0 = c.j0;
    const double* Hk = Hk_all.data() + n * Dk * M;
    const double* Hv = Hv_all.data() + n * M * Dv;
    memory_scores(A, P, scale);
    for (auto* buf : {&lm, &pm, &dpm, &dlm, &dSp}) buf->assign(size_t(nc * M), 0.0);
    dA.assign(size_t(nc * nc), 0.0);
    OV.assign(size_t(nc * nc), 0.0);

    // Row phase: everything that depends on one query row i only.
    for (int64_t i = 0; i < nc; ++i) {
      const int64_t t = c0 + i, jb = window_begin(t, w), nw = t + 1 - jb;
      const double* dOi = dO.data() + t * Dv;
      double *lmi = lm.data() + i * M, *pmi = pm.data() + i * M;
      double *dpmi = dpm.data() + i * M, *dlmi = dlm.data() + i * M;
      memory_logits(lmi, P, A, Hk, i, scale);
      window_logits(pw.data(), x, t, w, scale);
      // p = exp(logit - lse): the joint softmax of the forward.
      for (int64_t s = 0; s < M; ++s) pmi[s] = std::exp(lmi[s] - lse[t]);
      for (int64_t j = 0; j < nw; ++j) pw[j] = std::exp(pw[j] - lse[t]);
      // (a) dpm_i = (dO_i Hv_n^T) ⊙ e^{B_i} + sum_{j<=i} (dO_i . V'_j)(S'_j ⊙ D_ij)
      for (int64_t s = 0; s < M; ++s) dpmi[s] = c.eB[i * M + s] * dot_double(dOi, Hv + s * Dv, Dv);
      for (int64_t j = j0; j <= i; ++j) {
        const double ov = OV[i * nc + j] = dot_double(dOi, P.V(j), Dv);
        const double *Sj = P.S(j), *Dij = c.Dij(i, j);
        for (int64_t s = 0; s < M; ++s) dpmi[s] += ov * Sj[s] * Dij[s];
      }
      // (b) joint softmax: delta = <p, dp>, with dpw_j = dO_i . v_j.
      double delta = dot_double(pmi, dpmi, M);
      for (int64_t j = 0; j < nw; ++j) {
        dpw[j] = dot_double(dOi, x.v.data() + (jb + j) * Dv, Dv);
        delta += pw[j] * dpw[j];
      }
      for (int64_t s = 0; s < M; ++s) dlmi[s] = pmi[s] * (dpmi[s] - delta);
      // (a, c) window: dv_j += pw_j dO_i; dlw_j = pw_j (dpw_j - delta);
      //        dqr_i = scale sum_j dlw_j kr_j; dkr_j += scale dlw_j qr_i
      const double* qri = x.qr.data() + t * Dk;
      double* dqri = gr.dqr.data() + t * Dk;
      for (int64_t j = 0; j < nw; ++j) {
        const int64_t u = jb + j;
        const double dlw = pw[j] * (dpw[j] - delta);
        for (int64_t e = 0; e < Dv; ++e) gr.dv[u * Dv + e] += pw[j] * dOi[e];
        for (int64_t d = 0; d < Dk; ++d) {
          dqri[d] += scale * dlw * x.kr[u * Dk + d];
          gr.dkr[u * Dk + d] += scale * dlw * qri[d];
        }
      }
      // (d) dA_ij = sum_s dlm_i S'_j D_ij;
      //     dq_i = scale (dlm_i ⊙ e^{B_i}) Hk_n^T + scale sum_j dA_ij K'_j
      double* dqi = gr.dq.data() + t * Dk;
      for (int64_t d = 0; d < Dk; ++d) {
        double acc = 0;
        for (int64_t s = 0; s < M; ++s) acc += dlmi[s] * c.eB[i * M + s] * Hk[d * M + s];
        dqi[d] = scale * acc;
      }
      for (int64_t j = j0; j <= i; ++j) {
        const double *Sj = P.S(j), *Dij = c.Dij(i, j), *Kj = P.K(j);
        double a = 0;
        for (int64_t s = 0; s < M; ++s) a += dlmi[s] * Sj[s] * Dij[s];
        dA[i * nc + j] = a;
        for (int64_t d = 0; d < Dk; ++d) dqi[d] += scale * a * Kj[d];
      }
    }

    // Column phase: gradients of the chunk's memory writes K'_j, V'_j, S'_j (rows j >= j0),
    // from the rows i >= j of this chunk and from the carried dHk, dHv; then un-shifted (f).
    for (int64_t j = j0; j < nc; ++j) {
      const double *Kj = P.K(j), *Vj = P.V(j), *Sj = P.S(j), *ebBj = c.ebB.data() + j * M;
      const int64_t src = P.src(j);
      double *dK = gr.dk.data() + src * Dk, *dV = gr.dv.data() + src * Dv;
      double* dS = dSp.data() + j * M;  // dS'v_j + dS'k_j
      for (int64_t i = j; i < nc; ++i) {
        const double *Dij = c.Dij(i, j), *pmi = pm.data() + i * M, *dlmi = dlm.data() + i * M;
        const double *qi = x.q.data() + (c0 + i) * Dk, *dOi = dO.data() + (c0 + i) * Dv;
        double a = 0;  // pm_i . (S'_j ⊙ D_ij)
        for (int64_t s = 0; s < M; ++s) {
          a += pmi[s] * Sj[s] * Dij[s];
          dS[s] += (OV[i * nc + j] * pmi[s] + A[i * nc + j] * dlmi[s]) * Dij[s];
        }
        for (int64_t e = 0; e < Dv; ++e) dV[e] += a * dOi[e];
        for (int64_t d = 0; d < Dk; ++d) dK[d] += scale * dA[i * nc + j] * qi[d];
      }
      // Carried state gradients: Hk_{n+1}, Hv_{n+1} contain K'_j (S'_j ⊙ e^{b-B_j})^T etc.
      for (int64_t s = 0; s < M; ++s) {
        const double ws = Sj[s] * ebBj[s];
        double kdh = 0, vdh = 0;
        for (int64_t d = 0; d < Dk; ++d) {
          dK[d] += ws * dHk[d * M + s];
          kdh += Kj[d] * dHk[d * M + s];
        }
        for (int64_t e = 0; e < Dv; ++e) {
          dV[e] += ws * dHv[s * Dv + e];
          vdh += Vj[e] * dHv[s * Dv + e];
        }
        dS[s] += ebBj[s] * (kdh + vdh);
      }
      for (int64_t s = 0; s < M; ++s) gr.ds[src * M + s] = dS[s];
    }

    // (e) gates: dG'_t = sum_{u>=t} [dpm ⊙ pm + dlm ⊙ lm - (dS'v + dS'k) ⊙ S']_u, then un-shifted.
    for (int64_t i = nc - 1; i >= 0; --i) {
      const double* Si = i >= j0 ? P.S(i) : nullptr;
      for (int64_t s = 0; s < M; ++s) {
        const int64_t is = i * M + s;
        dGsum[s] += dpm[is] * pm[is] + dlm[is] * lm[is] - (Si ? dSp[is] * Si[s] : 0.0);
      }
      if (Si)
        for (int64_t s = 0; s < M; ++s) gr.dg[P.src(i) * M + s] = dGsum[s];
    }

    // Carries to the previous chunk: dHv <- e^{b}[:,None] ⊙ dHv + (pm ⊙ e^{B})^T dO_chunk,
    //                                dHk <- dHk ⊙ e^{b}[None,:] + scale q_chunk^T (dlm ⊙ e^{B}).
    const double* eb = c.eb();
    for (int64_t s = 0; s < M; ++s) {
      for (int64_t e = 0; e < Dv; ++e) dHv[s * Dv + e] *= eb[s];
      for (int64_t d = 0; d < Dk; ++d) dHk[d * M + s] *= eb[s];
    }
    for (int64_t i = 0; i < nc; ++i) {
      const double *dOi = dO.data() + (c0 + i) * Dv, *qi = x.q.data() + (c0 + i) * Dk;
      for (int64_t s = 0; s < M; ++s) {
        const double eBi = c.eB[i * M + s];
        const double pv = pm[i * M + s] * eBi, lk = scale * dlm[i * M + s] * eBi;
        for (int64_t e = 0; e < Dv; ++e) dHv[s * Dv + e] += pv * dOi[e];
        for (int64_t d = 0; d < Dk; ++d) dHk[d * M + s] += qi[d] * lk;
      }
    }
  }
  return gr;
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
    S* pl = lse.data<S>();
#pragma omp parallel for collapse(2) schedule(dynamic, 1) if (worth_threading(d, window))
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t h = 0; h < d.H; ++h) {
        const HeadData x = gather_head<S>(d, q, k, qr, kr, v, s, g, b, h);
        std::vector<double> o, l;  // [T, Dv], [T]
        forward_head(x, scale, window, o, l);
        scatter_rows<S>(out, o, b, h);
        for (int64_t t = 0; t < d.T; ++t) pl[(b * d.H + h) * d.T + t] = S(l[t]);
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
    const S* pl = lse.data<S>();
#pragma omp parallel for collapse(2) schedule(dynamic, 1) if (worth_threading(d, window))
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t h = 0; h < d.H; ++h) {
        const HeadData x = gather_head<S>(d, q, k, qr, kr, v, s, g, b, h);
        std::vector<double> dO, l(size_t(d.T));  // [T, Dv], [T]
        gather_rows<S>(dO, dout, b, h);
        for (int64_t t = 0; t < d.T; ++t) l[t] = double(pl[(b * d.H + h) * d.T + t]);
        const HeadGrads gr = backward_head(x, dO, l, scale, window);
        scatter_rows<S>(dq, gr.dq, b, h);
        scatter_rows<S>(dk, gr.dk, b, h);
        scatter_rows<S>(dqr, gr.dqr, b, h);
        scatter_rows<S>(dkr, gr.dkr, b, h);
        scatter_rows<S>(dv, gr.dv, b, h);
        scatter_rows<S>(ds, gr.ds, b, h);
        scatter_rows<S>(dg, gr.dg, b, h);
      }
  });
}

// g = logsigmoid(f) / 8 = (min(f, 0) - log1p(e^{-|f|})) / 8 (stable for any f);  s = 1 - e^g.
void CpuBackend::nha_gate_forward(Tensor& g, Tensor& s, const Tensor& f) {
  NHA_PROFILE_SCOPE("nha_gate_forward");
  check_same_shape(g, f, "nha_gate_forward g");
  check_same_shape(s, f, "nha_gate_forward s");
  check_one_dtype(f, {&g, &s}, "nha_gate_forward");
  dispatch_floating(f, "nha_gate_forward", [&]<typename S>() {
    const S* pf = f.data<S>();
    S *pg = g.data<S>(), *ps = s.data<S>();
    const int64_t n = f.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      const double x = double(pf[i]);
      const double gi = (std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x)))) / 8.0;
      pg[i] = S(gi);
      ps[i] = S(-std::expm1(gi));
    }
  });
}

// df = (dg - e^g ds) * sigmoid(-f) / 8
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
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      const double x = double(pf[i]);
      const double g = (std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x)))) / 8.0;
      const double sig_neg = 1.0 / (1.0 + std::exp(x));  // sigmoid(-f)
      pdf[i] = S((double(pdg[i]) - std::exp(g) * double(pds[i])) * sig_neg / 8.0);
    }
  });
}

}  // namespace nha
