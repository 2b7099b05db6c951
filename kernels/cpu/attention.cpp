// CPU causal attention with an optional sliding window: forward and backward.
//
// Layout [B, T, H, D]: element (b, t, h, d) sits at ((b*T + t)*H + h)*D + d, so consecutive time
// steps of one head are H*D apart: a block of rows of one head is a strided matrix that OpenBLAS
// reads in place (leading dimension H*D), with no gather. lse is [B, H, T].
//
// Blocked by query rows (kQueryBlock): a block of queries sees one contiguous range of keys, so
// its scores are one GEMM [rows, keys] (entries outside a row's causal window are masked to
// probability 0), its softmax is computed on that small matrix (it stays in cache), and its
// output is one more GEMM. Arithmetic in the tensors' dtype (f32: sgemm and the vectorized exp
// of vec_math.h, f64: dgemm and std::exp); the f64 kernels are the oracle for the CUDA kernels.
//   forward    one OpenMP task per (b, h, query block):  S = scale Q K^T, P = softmax, O = P V
//   backward   one task per (b, h), query blocks in order:
//              dP = dO V^T, dS = P (dP - delta), dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO
// The backward's tasks own whole heads, so dK and dV accumulate over query blocks with no shared
// writes and in a fixed order: deterministic for any thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/profile.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/vec_math.h"

namespace nha {

namespace {

constexpr int64_t kQueryBlock = 64;

// Keys visible from query t: [key_begin(t), t]. window <= 0 (or >= T) is plain causal attention.
inline int64_t key_begin(int64_t t, int64_t window) {
  return window <= 0 ? 0 : std::max<int64_t>(0, t - window + 1);
}

// Multiply-adds of one pass (rows x visible keys x D): thread only when it outweighs the cost of
// starting a parallel region (gradient checks call this kernel thousands of times on tiny inputs).
inline bool worth_threading(int64_t B, int64_t T, int64_t H, int64_t D, int64_t window) {
  const int64_t span = (window <= 0 || window > T) ? T : window;
  return B * H * T * span * D > (int64_t(1) << 16);
}

// Checks the shapes of one attention call and returns {B, T, H, D}.
struct Dims {
  int64_t B, T, H, D;
};
Dims attention_dims(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lse,
                    const char* op) {
  NHA_CHECK(q.dim() == 4) << op << ": q must be [B, T, H, D], got " << q.str();
  check_same_shape(k, q, op);
  check_same_shape(v, q, op);
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  NHA_CHECK(lse.shape() == (Shape{d.B, d.H, d.T}))
      << op << ": lse must be [B, H, T] = " << shape_str({d.B, d.H, d.T}) << ", got " << lse.str();
  NHA_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype() && lse.dtype() == q.dtype())
      << op << ": q, k, v, lse must share one dtype, got " << q.str() << ", " << k.str() << ", "
      << v.str() << ", " << lse.str();
  return d;
}

// The query block [t0, t0 + n) of one head sees keys [kb, t0 + n): nk of them.
struct QueryBlock {
  int64_t t0, n, kb, nk;
  QueryBlock(int64_t block, int64_t T, int64_t window)
      : t0(block * kQueryBlock), n(std::min(kQueryBlock, T - t0)), kb(key_begin(t0, window)),
        nk(t0 + n - kb) {}
  // Columns of query row r's visible keys within the block's key range: [lo(r), hi(r)).
  int64_t lo(int64_t r, int64_t window) const { return key_begin(t0 + r, window) - kb; }
  int64_t hi(int64_t r) const { return t0 + r + 1 - kb; }
};

// Scores of one query block as probabilities, in place: s [n, nk] holds scale q_t . k_j on entry;
// on return P_tj at the visible keys and 0 elsewhere. Forward (lse_in == nullptr): the row's
// softmax, its log-sum-exp written to lse_out[r]. Backward: P_tj = exp(s_tj - lse_in[r]).
template <typename S>
void block_probabilities(S* s, const QueryBlock& qb, int64_t window, const S* lse_in,
                         S* lse_out) {
  for (int64_t r = 0; r < qb.n; ++r) {
    S* row = s + r * qb.nk;
    const int64_t lo = qb.lo(r, window), hi = qb.hi(r);
    std::fill(row, row + lo, S(0));
    std::fill(row + hi, row + qb.nk, S(0));
    if (lse_in) {
      exp_shifted(row + lo, row + lo, lse_in[r], hi - lo);
      continue;
    }
    const auto [mx, sum] = exp_minus_max(row + lo, row + lo, hi - lo);  // hi > lo: t sees itself
    const S inv = S(1 / sum);
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) row[j] *= inv;
    lse_out[r] = S(double(mx) + std::log(sum));
  }
}

}  // namespace

void CpuBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                   const Tensor& v, double scale, int64_t window) {
  NHA_PROFILE_SCOPE("attention_forward");
  const Dims dims = attention_dims(q, k, v, lse, "attention_forward");
  check_same_shape(out, q, "attention_forward out");
  const int64_t B = dims.B, T = dims.T, H = dims.H, D = dims.D;
  const int64_t row = H * D;  // stride between time steps
  const int64_t blocks = (T + kQueryBlock - 1) / kQueryBlock;
  dispatch_floating(q, "attention_forward", [&]<typename S>() {
    const S *pq = q.data<S>(), *pk = k.data<S>(), *pv = v.data<S>();
    S *po = out.data<S>(), *pl = lse.data<S>();
#pragma omp parallel if (worth_threading(B, T, H, D, window))
    {
      // Scores, then probabilities, of one query block [kQueryBlock, keys]; kept per thread
      // across calls so that the step allocates nothing here.
      static thread_local std::vector<S> p;
#pragma omp for collapse(3) schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const QueryBlock qb(blk, T, window);
            const int64_t base = b * T * row + h * D;  // (b, 0, h, 0)
            p.resize(size_t(qb.n * qb.nk));
            gemm_rm<S>(false, true, qb.n, qb.nk, D, S(scale), pq + base + qb.t0 * row, row,
                       pk + base + qb.kb * row, row, S(0), p.data(), qb.nk);
            block_probabilities<S>(p.data(), qb, window, nullptr,
                                   pl + (b * H + h) * T + qb.t0);
            gemm_rm<S>(false, false, qb.n, D, qb.nk, S(1), p.data(), qb.nk,
                       pv + base + qb.kb * row, row, S(0), po + base + qb.t0 * row, row);
          }
    }
  });
}

void CpuBackend::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                    const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& out, const Tensor& lse, double scale,
                                    int64_t window) {
  NHA_PROFILE_SCOPE("attention_backward");
  const Dims dims = attention_dims(q, k, v, lse, "attention_backward");
  check_same_shape(dout, q, "attention_backward dout");
  check_same_shape(out, q, "attention_backward out");
  check_same_shape(dq, q, "attention_backward dq");
  check_same_shape(dk, q, "attention_backward dk");
  check_same_shape(dv, q, "attention_backward dv");
  const int64_t B = dims.B, T = dims.T, H = dims.H, D = dims.D;
  const int64_t row = H * D;
  const int64_t blocks = (T + kQueryBlock - 1) / kQueryBlock;
  // out is not read: delta_t is summed from P and dP (below).
  dispatch_floating(q, "attention_backward", [&]<typename S>() {
    const S *pq = q.data<S>(), *pk = k.data<S>(), *pv = v.data<S>();
    const S *pdo = dout.data<S>(), *pl = lse.data<S>();
    S *pdq = dq.data<S>(), *pdk = dk.data<S>(), *pdv = dv.data<S>();
#pragma omp parallel if (worth_threading(B, T, H, D, window))
    {
      static thread_local std::vector<S> p, dp;  // P and dP, then dS, of one block [n, keys]
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t base = b * T * row + h * D;
          for (int64_t t = 0; t < T; ++t) {  // dK, dV of this head accumulate over the blocks
            std::fill_n(pdk + base + t * row, D, S(0));
            std::fill_n(pdv + base + t * row, D, S(0));
          }
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const QueryBlock qb(blk, T, window);
            const int64_t qo = base + qb.t0 * row, ko = base + qb.kb * row;  // block's first rows
            p.resize(size_t(qb.n * qb.nk));
            dp.resize(p.size());
            gemm_rm<S>(false, true, qb.n, qb.nk, D, S(scale), pq + qo, row, pk + ko, row, S(0),
                       p.data(), qb.nk);
            block_probabilities<S>(p.data(), qb, window, pl + (b * H + h) * T + qb.t0, nullptr);
            gemm_rm<S>(false, true, qb.n, qb.nk, D, S(1), pdo + qo, row, pv + ko, row, S(0),
                       dp.data(), qb.nk);
            // dS_tj = P_tj (dP_tj - delta_t), delta_t = sum_j P_tj dP_tj (= dout_t . out_t, but
            // from the same rounded dP: a row whose P is one-hot, e.g. window 1, gets dS = 0
            // exactly, as in exact arithmetic).
            for (int64_t r = 0; r < qb.n; ++r) {
              S *pr = p.data() + r * qb.nk, *dr = dp.data() + r * qb.nk;
              double sum = 0;
#pragma omp simd reduction(+ : sum)
              for (int64_t j = 0; j < qb.nk; ++j) sum += double(pr[j]) * double(dr[j]);
              const S delta = S(sum);
              for (int64_t j = 0; j < qb.nk; ++j) dr[j] = pr[j] * (dr[j] - delta);
            }
            gemm_rm<S>(false, false, qb.n, D, qb.nk, S(scale), dp.data(), qb.nk, pk + ko, row,
                       S(0), pdq + qo, row);
            gemm_rm<S>(true, false, qb.nk, D, qb.n, S(scale), dp.data(), qb.nk, pq + qo, row,
                       S(1), pdk + ko, row);
            gemm_rm<S>(true, false, qb.nk, D, qb.n, S(1), p.data(), qb.nk, pdo + qo, row, S(1),
                       pdv + ko, row);
          }
        }
    }
  });
}

}  // namespace nha
