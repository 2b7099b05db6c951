// CPU reference causal attention with an optional sliding window: forward and backward.
//
// Layout [B, T, H, D]: element (b, t, h, d) sits at ((b*T + t)*H + h)*D + d, so consecutive time
// steps of one head are H*D apart. lse is [B, H, T].
//
// This is the oracle for the CUDA flash-attention kernel and the NHA layer, so it is written for
// clarity: one query row (or key row) at a time, scores materialized for that row only, every dot
// product and sum accumulated in double (also for f32 tensors). Rows are independent, so OpenMP
// runs over (b, h, row) with no shared writes:
//   forward                 one task per query row t:   lse_t, out_t
//   backward, query pass    one task per query row t:   delta_t = dout_t . out_t, dq_t
//   backward, key pass      one task per key row j:     dk_j, dv_j   (recomputes P_tj and dS_tj)
// The key pass recomputes the scores instead of scattering from query rows (as flash attention's
// backward does), which keeps every output element written by exactly one thread: deterministic.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

namespace {

// Keys visible from query t: [key_begin(t), t].  Queries that see key j: [j, query_end(j)].
// window <= 0 (or >= T) is plain causal attention.
inline int64_t key_begin(int64_t t, int64_t window) {
  return window <= 0 ? 0 : std::max<int64_t>(0, t - window + 1);
}
inline int64_t query_end(int64_t j, int64_t T, int64_t window) {
  return (window <= 0 || window >= T - j) ? T - 1 : j + window - 1;  // no overflow for huge window
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

}  // namespace

void CpuBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                   const Tensor& v, double scale, int64_t window) {
  NHA_PROFILE_SCOPE("attention_forward");
  const Dims dims = attention_dims(q, k, v, lse, "attention_forward");
  check_same_shape(out, q, "attention_forward out");
  const int64_t B = dims.B, T = dims.T, H = dims.H, D = dims.D;
  const int64_t row = H * D;  // stride between time steps
  dispatch_floating(q, "attention_forward", [&]<typename S>() {
    const S *pq = q.data<S>(), *pk = k.data<S>(), *pv = v.data<S>();
    S *po = out.data<S>(), *pl = lse.data<S>();
#pragma omp parallel if (worth_threading(B, T, H, D, window))
    {
      std::vector<double> s(static_cast<size_t>(T));  // scores of one query row (visible j)
      std::vector<double> acc(static_cast<size_t>(D));
#pragma omp for collapse(3) schedule(dynamic, 4)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t t = 0; t < T; ++t) {
            const int64_t base = b * T * row + h * D;  // (b, 0, h, 0)
            const S* qt = pq + base + t * row;
            const int64_t j0 = key_begin(t, window);
            // s_tj = scale * q_t . k_j, and its max for a stable log-sum-exp.
            double mx = -std::numeric_limits<double>::infinity();
            for (int64_t j = j0; j <= t; ++j) {
              s[j] = scale * dot_double(qt, pk + base + j * row, D);
              mx = std::max(mx, s[j]);
            }
            // out_t = sum_j exp(s_tj - mx) v_j / sum_j exp(s_tj - mx);  lse_t = mx + log(sum).
            double denom = 0;
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = j0; j <= t; ++j) {
              const double p = std::exp(s[j] - mx);
              denom += p;
              const S* vj = pv + base + j * row;
              for (int64_t d = 0; d < D; ++d) acc[d] += p * double(vj[d]);
            }
            S* ot = po + base + t * row;
            for (int64_t d = 0; d < D; ++d) ot[d] = S(acc[d] / denom);
            pl[(b * H + h) * T + t] = S(mx + std::log(denom));
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
  // delta_t = dout_t . out_t, [B, H, T], computed by the query pass and read by the key pass.
  std::vector<double> delta(static_cast<size_t>(B * H * T));
  dispatch_floating(q, "attention_backward", [&]<typename S>() {
    const S *pq = q.data<S>(), *pk = k.data<S>(), *pv = v.data<S>();
    const S *pdo = dout.data<S>(), *po = out.data<S>(), *pl = lse.data<S>();
    S *pdq = dq.data<S>(), *pdk = dk.data<S>(), *pdv = dv.data<S>();
    const bool threaded = worth_threading(B, T, H, D, window);

    // Query pass: dS_tj = P_tj (dout_t . v_j - delta_t);  dq_t = scale sum_j dS_tj k_j.
#pragma omp parallel if (threaded)
    {
      std::vector<double> acc(static_cast<size_t>(D));
#pragma omp for collapse(3) schedule(dynamic, 4)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t t = 0; t < T; ++t) {
            const int64_t base = b * T * row + h * D;
            const int64_t off = base + t * row;
            const double lse_t = double(pl[(b * H + h) * T + t]);
            const double delta_t = dot_double(pdo + off, po + off, D);
            delta[size_t((b * H + h) * T + t)] = delta_t;
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = key_begin(t, window); j <= t; ++j) {
              const S* kj = pk + base + j * row;
              const double p = std::exp(scale * dot_double(pq + off, kj, D) - lse_t);
              const double ds = p * (dot_double(pdo + off, pv + base + j * row, D) - delta_t);
              for (int64_t d = 0; d < D; ++d) acc[d] += ds * double(kj[d]);
            }
            for (int64_t d = 0; d < D; ++d) pdq[off + d] = S(scale * acc[d]);
          }
    }

    // Key pass: dv_j = sum_t P_tj dout_t;  dk_j = scale sum_t dS_tj q_t, over t in [j, end(j)].
#pragma omp parallel if (threaded)
    {
      std::vector<double> acc_k(static_cast<size_t>(D)), acc_v(static_cast<size_t>(D));
#pragma omp for collapse(3) schedule(dynamic, 4)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t j = 0; j < T; ++j) {
            const int64_t base = b * T * row + h * D;
            const int64_t off = base + j * row;
            std::fill(acc_k.begin(), acc_k.end(), 0.0);
            std::fill(acc_v.begin(), acc_v.end(), 0.0);
            const int64_t t1 = query_end(j, T, window);
            for (int64_t t = j; t <= t1; ++t) {
              const S* qt = pq + base + t * row;
              const S* do_t = pdo + base + t * row;
              const int64_t stat = (b * H + h) * T + t;
              const double p = std::exp(scale * dot_double(qt, pk + off, D) - double(pl[stat]));
              const double ds = p * (dot_double(do_t, pv + off, D) - delta[size_t(stat)]);
              for (int64_t d = 0; d < D; ++d) {
                acc_v[d] += p * double(do_t[d]);
                acc_k[d] += ds * double(qt[d]);
              }
            }
            for (int64_t d = 0; d < D; ++d) {
              pdk[off + d] = S(scale * acc_k[d]);
              pdv[off + d] = S(acc_v[d]);
            }
          }
    }
  });
}

}  // namespace nha
