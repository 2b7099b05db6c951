// CUDA causal attention with an optional sliding window: our own flash attention (bf16, tensor
// cores through mma.sync m16n8k16) and a simple f32 path (one warp per row) for the f32 debugging
// mode and head dims the flash kernels are not built for.
//
// Math (kernels/backend.h): q, k, v, out, dout [B, T, H, D]; lse, delta [B, H, T] f32.
//   query t sees keys j with t - window < j <= t   (window <= 0 or >= T: every j <= t)
//   s_tj = scale q_t.k_j;  lse_t = log sum_j exp(s_tj);  out_t = sum_j exp(s_tj - lse_t) v_j
//   backward, with P_tj = exp(s_tj - lse_t), delta_t = dout_t.out_t, dS_tj = P_tj (dout_t.v_j - delta_t):
//   dv_j = sum_t P_tj dout_t;  dq_t = scale sum_j dS_tj k_j;  dk_j = scale sum_t dS_tj q_t
//
// Flash forward (FlashAttention-2 schedule): a block owns BM = 16*MT*NW query rows of one (b, h);
// warp w owns 16*MT of them. Key/value tiles of BN rows stream through shared memory (cp.async,
// double-buffered); each warp computes S = Q K^T for its rows in registers, keeps the running max m
// and sum l per row (online softmax, base 2), rescales its output accumulator O, and adds P V with P
// converted to bf16 in registers (the m16n8k16 accumulator layout of two n8 tiles is the A operand
// layout of one k16 step). No T x T matrix exists anywhere. Tiles outside the causal/window band of
// the block are never loaded; tiles outside a warp's band are skipped by that warp; masking is only
// evaluated on tiles that cut the band or run past T. At the end O /= l and lse = (m + log2 l) ln 2.
//
// Flash backward (FlashAttention-2 math, deterministic, no atomics):
//   delta kernel  delta_t = dout_t . out_t (f32)
//   dK/dV kernel  a block owns BN = 16*NW keys (16 per warp) and streams the query tiles that see
//                 them: S^T = K Q^T, P^T = exp2(S^T scale log2e - lse log2e), dV += P^T dO,
//                 dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q -- all in the warp's
//                 registers; each dK/dV row is written once by its owner warp.
//   dQ kernel     a block owns query rows like the forward and streams key tiles: S, P, dP = dO V^T,
//                 dS, dQ += dS K. Recomputing S and dP here (instead of FA2's atomicAdd of dQ)
//                 costs two extra T x T x D products but makes dQ deterministic.
//   For D = 256 the dK and dV accumulators do not fit the registers together: the dK/dV kernel
//   runs twice, once for each.
//
// Any T works: rows past T are zero-filled in shared memory, masked, and never written.
#include <cuda_bf16.h>

#include <cstdlib>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/mma.cuh"

namespace nha {

using namespace cuda;

namespace {

// ---- shared-memory tiles: [rows][D + 8] bf16 (the 16-byte pad makes ldmatrix conflict-free) -----
template <int D>
constexpr int kLds = D + 8;

// A fragment (16x16) at (row0, col0) of a row-major tile.
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16_t* tile, int row0, int col0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * kLds<D> + col0 + (lane >> 4) * 8);
}
// B fragments of two n8 tiles (n0, n0+8) x k16 (k0) from a tile stored [n][k] (e.g. K for Q K^T):
// b[0], b[1] for n0; b[2], b[3] for n0 + 8.
template <int D>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const bf16_t* tile, int n0, int k0) {
  const int lane = threadIdx.x & 31, mat = lane >> 3;
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + (mat >> 1) * 8) * kLds<D> + k0 + (mat & 1) * 8);
}
// The same from a tile stored [k][n] (e.g. V for P V), through the transposing ldmatrix.
template <int D>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const bf16_t* tile, int k0, int n0) {
  const int lane = threadIdx.x & 31, mat = lane >> 3;
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + (mat & 1) * 8) * kLds<D> + n0 + (mat >> 1) * 8);
}

// Copies rows [0, ROWS) of a [*, D] bf16 matrix with row stride `stride` (elements) into a tile;
// rows >= valid are zero-filled. All NT threads of the block call it.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(bf16_t* tile, const bf16_t* g, int64_t stride,
                                          int valid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += NT) {
    const int r = c / kChunks, cc = (c % kChunks) * 8;
    bf16_t* dst = tile + r * kLds<D> + cc;
    if (r < valid)
      cp_async16(dst, g + r * stride + cc);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
}
// Copies n floats (lse or delta of rows t0..) into shared memory; entries past T are 0.
template <int NT>
__device__ __forceinline__ void load_vec(float* s, const float* g, int n, int valid) {
  for (int i = threadIdx.x; i < n; i += NT) {
    if (i < valid)
      cp_async4(s + i, g + i);
    else
      s[i] = 0.f;
  }
}

struct AttnParams {
  const bf16_t *q, *k, *v, *o, *dout;
  bf16_t *out, *dq, *dk, *dv;
  float* lse;          // [B, H, T]
  const float* delta;  // [B, H, T]
  int T, H;
  int window;          // in [1, T]: keys t - window < j <= t
  float scale;         // softmax scale
  float scale_log2;    // scale * log2(e)
  float sinks;         // extra keys of logit 0 and value 0 in every row's softmax (0: none)
};

// ==== forward ======================================================================================
// Block: NW warps, each owning MT m16 row tiles (16*MT consecutive query rows); BN keys per tile.
template <int D, int NW, int MT, int BN, bool Q_REGS>
__global__ void __launch_bounds__(NW * 32)
    flash_forward_kernel(const AttnParams p) {
  constexpr int BM = 16 * MT * NW, NT = NW * 32, LDS = kLds<D>;
  constexpr int KD = D / 16, NB = BN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16_t* sQ = reinterpret_cast<bf16_t*>(smem);  // [BM][LDS]
  bf16_t* sK = sQ + BM * LDS;                    // [2][BN][LDS]
  bf16_t* sV = sK + 2 * BN * LDS;                // [2][BN][LDS]

  const int T = p.T, H = p.H, window = p.window;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest rows first (causal tail balance)
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t stride = int64_t(H) * D;
  const int64_t base = int64_t(b) * T * stride + int64_t(h) * D;  // (b, 0, h, 0)
  const int m_last = min(T, m0 + BM) - 1;
  const int n_first = max(0, m0 - window + 1) / BN, n_last = m_last / BN;

  load_tile<BM, D, NT>(sQ, p.q + base + int64_t(m0) * stride, stride, T - m0);
  load_tile<BN, D, NT>(sK, p.k + base + int64_t(n_first) * BN * stride, stride, T - n_first * BN);
  load_tile<BN, D, NT>(sV, p.v + base + int64_t(n_first) * BN * stride, stride, T - n_first * BN);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int wrow = warp * 16 * MT;  // first row of this warp inside the block
  const int r0 = m0 + wrow, r1 = r0 + 16 * MT - 1;

  float o[MT][D / 8][4];
  float row_m[MT][2], row_l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    row_m[mt][0] = row_m[mt][1] = -INFINITY;
    row_l[mt][0] = row_l[mt][1] = 0.f;
  }
  uint32_t qf[Q_REGS ? MT : 1][Q_REGS ? KD : 1][4];

  for (int nb = n_first; nb <= n_last; ++nb) {
    const int stage = (nb - n_first) & 1;
    if (nb < n_last) {
      const int64_t next = int64_t(nb + 1) * BN;
      load_tile<BN, D, NT>(sK + (stage ^ 1) * BN * LDS, p.k + base + next * stride, stride,
                           T - int(next));
      load_tile<BN, D, NT>(sV + (stage ^ 1) * BN * LDS, p.v + base + next * stride, stride,
                           T - int(next));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (Q_REGS) {
      if (nb == n_first) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kk = 0; kk < KD; ++kk) load_a<D>(qf[mt][kk], sQ, wrow + mt * 16, kk * 16);
      }
    }
    const int n0 = nb * BN;
    const bf16_t* tK = sK + stage * BN * LDS;
    const bf16_t* tV = sV + stage * BN * LDS;
    // Some (row, key) of this warp visible in this tile?
    const bool active = r0 < T && n0 <= r1 && n0 + BN - 1 > r0 - window;
    if (active) {
      // S = Q K^T for the warp's rows: s[mt][nt] is the 16x8 tile of keys n0 + 8 nt.
      float s[MT][NB][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NB; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (Q_REGS) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[mt][i] = qf[mt][kk][i];
          } else {
            load_a<D>(a[mt], sQ, wrow + mt * 16, kk * 16);
          }
        }
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          uint32_t bk[4];
          load_b_nk<D>(bk, tK, nn * 16, kk * 16);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816(s[mt][2 * nn], a[mt], bk[0], bk[1]);
            mma16816(s[mt][2 * nn + 1], a[mt], bk[2], bk[3]);
          }
        }
      }
      // Mask only tiles that cut the band (diagonal, window edge) or run past T.
      const bool need_mask = n0 + BN - 1 > r0 || n0 + BN > T || n0 <= r1 - window;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NB; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][nt][e] * p.scale_log2;
            if (need_mask) {
              const int row = r0 + mt * 16 + g + (e >> 1) * 8;
              const int col = n0 + nt * 8 + 2 * tq + (e & 1);
              if (!(col <= row && col > row - window && col < T)) x = -INFINITY;
            }
            s[mt][nt][e] = x;
          }
        // Online softmax for the two rows this thread holds (i = 0: row g, i = 1: row g + 8).
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < NB; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * i], s[mt][nt][2 * i + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(row_m[mt][i], mx);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;  // row fully masked so far
          const float alpha = exp2f(row_m[mt][i] - m_use);
          row_m[mt][i] = m_new;
          float rs = 0.f;
#pragma unroll
          for (int nt = 0; nt < NB; ++nt) {
            const float p0 = exp2f(s[mt][nt][2 * i] - m_use), p1 = exp2f(s[mt][nt][2 * i + 1] - m_use);
            s[mt][nt][2 * i] = p0;
            s[mt][nt][2 * i + 1] = p1;
            rs += p0 + p1;
          }
          row_l[mt][i] = row_l[mt][i] * alpha + rs;  // per-thread partial; quad-summed at the end
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            o[mt][dt][2 * i] *= alpha;
            o[mt][dt][2 * i + 1] *= alpha;
          }
        }
      }
      // O += P V
#pragma unroll
      for (int kc = 0; kc < BN / 16; ++kc) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt][0] = pack_bf16(s[mt][2 * kc][0], s[mt][2 * kc][1]);
          a[mt][1] = pack_bf16(s[mt][2 * kc][2], s[mt][2 * kc][3]);
          a[mt][2] = pack_bf16(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
          a[mt][3] = pack_bf16(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
          uint32_t bv[4];
          load_b_kn<D>(bv, tV, kc * 16, dn * 16);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816(o[mt][2 * dn], a[mt], bv[0], bv[1]);
            mma16816(o[mt][2 * dn + 1], a[mt], bv[2], bv[3]);
          }
        }
      }
    }
    __syncthreads();  // the stage read here is refilled by the next iteration's prefetch
  }

  // out = O / l;  lse = (m + log2 l) ln 2   (with sinks: l += sinks 2^{0 - m} at a common max)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = row_l[mt][i], m = row_m[mt][i], rescale = 1.f;
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      if (p.sinks > 0.f) {
        const float mx = fmaxf(m, 0.f);
        rescale = exp2f(m - mx);
        l = l * rescale + p.sinks * exp2f(-mx);
        m = mx;
      }
      const int row = r0 + mt * 16 + g + i * 8;
      if (row < T) {
        const float inv = rescale / l;
        bf16_t* orow = p.out + base + int64_t(row) * stride;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * tq) =
              pack_bf16(o[mt][dt][2 * i] * inv, o[mt][dt][2 * i + 1] * inv);
        if (tq == 0) p.lse[int64_t(bh) * T + row] = (m + log2f(l)) * kLn2;
      }
    }
}

// ==== backward: delta_t = dout_t . out_t =============================================================
// One warp per (b, t, h) row; delta [B, H, T] f32.
template <typename T>
__global__ void attention_delta_kernel(float* __restrict__ delta, const T* __restrict__ dout,
                                       const T* __restrict__ out, int64_t rows, int T_, int H,
                                       int D) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= rows) return;
  const int64_t off = warp * D;  // row (b, t, h) of [B, T, H, D]
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_f32(dout[off + d]) * to_f32(out[off + d]);
  acc = warp_sum(acc);
  if (lane == 0) {
    const int64_t h = warp % H, t = (warp / H) % T_, b = warp / (int64_t(H) * T_);
    delta[(b * H + h) * T_ + t] = acc;
  }
}

// ==== backward: dK, dV =================================================================================
// Block: NW warps x 16 keys = BN keys of one (b, h); query tiles of BM rows stream through.
template <int D, int NW, int BM, bool DO_DK, bool DO_DV, bool KV_REGS>
__global__ void __launch_bounds__(NW * 32)
    flash_backward_dkdv_kernel(const AttnParams p) {
  constexpr int BN = 16 * NW, NT = NW * 32, LDS = kLds<D>;
  constexpr int KD = D / 16, NB = BM / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16_t* sK = reinterpret_cast<bf16_t*>(smem);  // [BN][LDS]
  bf16_t* sV = sK + BN * LDS;                    // [BN][LDS]
  bf16_t* sQ = sV + BN * LDS;                    // [2][BM][LDS]
  bf16_t* sO = sQ + 2 * BM * LDS;                // [2][BM][LDS] dout
  float* sL = reinterpret_cast<float*>(sO + 2 * BM * LDS);  // [2][BM] lse
  float* sD = sL + 2 * BM;                                  // [2][BM] delta

  const int T = p.T, H = p.H, window = p.window;
  const int n0 = blockIdx.x * BN;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t stride = int64_t(H) * D;
  const int64_t base = int64_t(b) * T * stride + int64_t(h) * D;
  const float* lse = p.lse + int64_t(bh) * T;
  const float* delta = p.delta + int64_t(bh) * T;
  // Queries that see keys [n0, n0 + BN): t in [n0, n0 + BN - 1 + window - 1].
  const int t_last = int(min(int64_t(T) - 1, int64_t(n0) + BN - 1 + window - 1));
  const int m_first = n0 / BM, m_last = t_last / BM;

  load_tile<BN, D, NT>(sK, p.k + base + int64_t(n0) * stride, stride, T - n0);
  load_tile<BN, D, NT>(sV, p.v + base + int64_t(n0) * stride, stride, T - n0);
  {
    const int t0 = m_first * BM;
    load_tile<BM, D, NT>(sQ, p.q + base + int64_t(t0) * stride, stride, T - t0);
    if constexpr (DO_DV || DO_DK) load_tile<BM, D, NT>(sO, p.dout + base + int64_t(t0) * stride, stride, T - t0);
    load_vec<NT>(sL, lse + t0, BM, T - t0);
    if constexpr (DO_DK) load_vec<NT>(sD, delta + t0, BM, T - t0);
  }
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int k0 = n0 + warp * 16;  // first key of this warp

  float dk[DO_DK ? D / 8 : 1][4], dv[DO_DV ? D / 8 : 1][4];
#pragma unroll
  for (int dt = 0; dt < (DO_DK ? D / 8 : 1); ++dt) dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.f;
#pragma unroll
  for (int dt = 0; dt < (DO_DV ? D / 8 : 1); ++dt) dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.f;
  uint32_t kf[KV_REGS ? KD : 1][4], vf[KV_REGS && DO_DK ? KD : 1][4];

  for (int mb = m_first; mb <= m_last; ++mb) {
    const int stage = (mb - m_first) & 1;
    if (mb < m_last) {
      const int t0 = (mb + 1) * BM, st = stage ^ 1;
      load_tile<BM, D, NT>(sQ + st * BM * LDS, p.q + base + int64_t(t0) * stride, stride, T - t0);
      load_tile<BM, D, NT>(sO + st * BM * LDS, p.dout + base + int64_t(t0) * stride, stride, T - t0);
      load_vec<NT>(sL + st * BM, lse + t0, BM, T - t0);
      if constexpr (DO_DK) load_vec<NT>(sD + st * BM, delta + t0, BM, T - t0);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (KV_REGS) {
      if (mb == m_first) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
          load_a<D>(kf[kk], sK, warp * 16, kk * 16);
          if constexpr (DO_DK) load_a<D>(vf[kk], sV, warp * 16, kk * 16);
        }
      }
    }
    const int t0 = mb * BM;
    const bf16_t* tQ = sQ + stage * BM * LDS;
    const bf16_t* tO = sO + stage * BM * LDS;
    const float* tL = sL + stage * BM;
    const float* tD = sD + stage * BM;
    // Some (key, query) pair of this warp visible in this tile?
    const bool active = k0 < T && k0 <= t0 + BM - 1 && k0 + 15 > t0 - window;
    if (active) {
      // S^T = K Q^T: st[nt] holds keys (g, g+8) x queries t0 + 8 nt + (2 tq, 2 tq + 1).
      float st[NB][4];
#pragma unroll
      for (int nt = 0; nt < NB; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t a[4];
        if constexpr (KV_REGS) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = kf[kk][i];
        } else {
          load_a<D>(a, sK, warp * 16, kk * 16);
        }
#pragma unroll
        for (int nn = 0; nn < BM / 16; ++nn) {
          uint32_t bq[4];
          load_b_nk<D>(bq, tQ, nn * 16, kk * 16);
          mma16816(st[2 * nn], a, bq[0], bq[1]);
          mma16816(st[2 * nn + 1], a, bq[2], bq[3]);
        }
      }
      // P^T = exp2(S^T scale log2e - lse log2e), 0 where masked.
#pragma unroll
      for (int nt = 0; nt < NB; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = k0 + g + (e >> 1) * 8;
          const int tl = nt * 8 + 2 * tq + (e & 1), t = t0 + tl;
          const bool valid = t < T && j <= t && j > t - window;
          st[nt][e] = valid ? exp2f(fmaf(st[nt][e], p.scale_log2, -tL[tl] * kLog2e)) : 0.f;
        }
      if constexpr (DO_DV) {
        // dV += P^T dO
#pragma unroll
        for (int kc = 0; kc < BM / 16; ++kc) {
          uint32_t a[4] = {pack_bf16(st[2 * kc][0], st[2 * kc][1]),
                           pack_bf16(st[2 * kc][2], st[2 * kc][3]),
                           pack_bf16(st[2 * kc + 1][0], st[2 * kc + 1][1]),
                           pack_bf16(st[2 * kc + 1][2], st[2 * kc + 1][3])};
#pragma unroll
          for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t bo[4];
            load_b_kn<D>(bo, tO, kc * 16, dn * 16);
            mma16816(dv[2 * dn], a, bo[0], bo[1]);
            mma16816(dv[2 * dn + 1], a, bo[2], bo[3]);
          }
        }
      }
      if constexpr (DO_DK) {
        // dP^T = V dO^T
        float dpt[NB][4];
#pragma unroll
        for (int nt = 0; nt < NB; ++nt) dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
          uint32_t a[4];
          if constexpr (KV_REGS) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = vf[kk][i];
          } else {
            load_a<D>(a, sV, warp * 16, kk * 16);
          }
#pragma unroll
          for (int nn = 0; nn < BM / 16; ++nn) {
            uint32_t bo[4];
            load_b_nk<D>(bo, tO, nn * 16, kk * 16);
            mma16816(dpt[2 * nn], a, bo[0], bo[1]);
            mma16816(dpt[2 * nn + 1], a, bo[2], bo[3]);
          }
        }
        // dS^T = P^T (dP^T - delta_t)   (in st)
#pragma unroll
        for (int nt = 0; nt < NB; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) st[nt][e] *= dpt[nt][e] - tD[nt * 8 + 2 * tq + (e & 1)];
        // dK += dS^T Q
#pragma unroll
        for (int kc = 0; kc < BM / 16; ++kc) {
          uint32_t a[4] = {pack_bf16(st[2 * kc][0], st[2 * kc][1]),
                           pack_bf16(st[2 * kc][2], st[2 * kc][3]),
                           pack_bf16(st[2 * kc + 1][0], st[2 * kc + 1][1]),
                           pack_bf16(st[2 * kc + 1][2], st[2 * kc + 1][3])};
#pragma unroll
          for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t bq[4];
            load_b_kn<D>(bq, tQ, kc * 16, dn * 16);
            mma16816(dk[2 * dn], a, bq[0], bq[1]);
            mma16816(dk[2 * dn + 1], a, bq[2], bq[3]);
          }
        }
      }
    }
    __syncthreads();
  }

  // Each warp writes its 16 rows of dK (times scale) and dV.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int j = k0 + g + i * 8;
    if (j < T) {
      if constexpr (DO_DK) {
        bf16_t* row = p.dk + base + int64_t(j) * stride;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * tq) =
              pack_bf16(dk[dt][2 * i] * p.scale, dk[dt][2 * i + 1] * p.scale);
      }
      if constexpr (DO_DV) {
        bf16_t* row = p.dv + base + int64_t(j) * stride;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * tq) =
              pack_bf16(dv[dt][2 * i], dv[dt][2 * i + 1]);
      }
    }
  }
}

// ==== backward: dQ =====================================================================================
// Block: NW warps x 16 query rows = BM rows of one (b, h); key tiles of BN rows stream through.
template <int D, int NW, int BN, bool QO_REGS>
__global__ void __launch_bounds__(NW * 32)
    flash_backward_dq_kernel(const AttnParams p) {
  constexpr int BM = 16 * NW, NT = NW * 32, LDS = kLds<D>;
  constexpr int KD = D / 16, NB = BN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16_t* sQ = reinterpret_cast<bf16_t*>(smem);  // [BM][LDS]
  bf16_t* sO = sQ + BM * LDS;                    // [BM][LDS] dout
  bf16_t* sK = sO + BM * LDS;                    // [2][BN][LDS]
  bf16_t* sV = sK + 2 * BN * LDS;                // [2][BN][LDS]

  const int T = p.T, H = p.H, window = p.window;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t stride = int64_t(H) * D;
  const int64_t base = int64_t(b) * T * stride + int64_t(h) * D;
  const int m_last = min(T, m0 + BM) - 1;
  const int n_first = max(0, m0 - window + 1) / BN, n_last = m_last / BN;

  load_tile<BM, D, NT>(sQ, p.q + base + int64_t(m0) * stride, stride, T - m0);
  load_tile<BM, D, NT>(sO, p.dout + base + int64_t(m0) * stride, stride, T - m0);
  load_tile<BN, D, NT>(sK, p.k + base + int64_t(n_first) * BN * stride, stride, T - n_first * BN);
  load_tile<BN, D, NT>(sV, p.v + base + int64_t(n_first) * BN * stride, stride, T - n_first * BN);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int r0 = m0 + warp * 16;
  // lse (scaled to base 2) and delta of the thread's two rows.
  float lse2[2], dlt[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = r0 + g + i * 8;
    lse2[i] = row < T ? p.lse[int64_t(bh) * T + row] * kLog2e : 0.f;
    dlt[i] = row < T ? p.delta[int64_t(bh) * T + row] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;
  uint32_t qf[QO_REGS ? KD : 1][4], of[QO_REGS ? KD : 1][4];

  for (int nb = n_first; nb <= n_last; ++nb) {
    const int stage = (nb - n_first) & 1;
    if (nb < n_last) {
      const int64_t next = int64_t(nb + 1) * BN;
      load_tile<BN, D, NT>(sK + (stage ^ 1) * BN * LDS, p.k + base + next * stride, stride,
                           T - int(next));
      load_tile<BN, D, NT>(sV + (stage ^ 1) * BN * LDS, p.v + base + next * stride, stride,
                           T - int(next));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (QO_REGS) {
      if (nb == n_first) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
          load_a<D>(qf[kk], sQ, warp * 16, kk * 16);
          load_a<D>(of[kk], sO, warp * 16, kk * 16);
        }
      }
    }
    const int n0 = nb * BN;
    const bf16_t* tK = sK + stage * BN * LDS;
    const bf16_t* tV = sV + stage * BN * LDS;
    const bool active = r0 < T && n0 <= r0 + 15 && n0 + BN - 1 > r0 - window;
    if (active) {
      float s[NB][4], dp[NB][4];
#pragma unroll
      for (int nt = 0; nt < NB; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
      // S = Q K^T and dP = dO V^T
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t aq[4], ao[4];
        if constexpr (QO_REGS) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            aq[i] = qf[kk][i];
            ao[i] = of[kk][i];
          }
        } else {
          load_a<D>(aq, sQ, warp * 16, kk * 16);
          load_a<D>(ao, sO, warp * 16, kk * 16);
        }
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          uint32_t bk[4], bv[4];
          load_b_nk<D>(bk, tK, nn * 16, kk * 16);
          load_b_nk<D>(bv, tV, nn * 16, kk * 16);
          mma16816(s[2 * nn], aq, bk[0], bk[1]);
          mma16816(s[2 * nn + 1], aq, bk[2], bk[3]);
          mma16816(dp[2 * nn], ao, bv[0], bv[1]);
          mma16816(dp[2 * nn + 1], ao, bv[2], bv[3]);
        }
      }
      // dS = P (dP - delta), P = exp2(S scale log2e - lse log2e), 0 where masked
#pragma unroll
      for (int nt = 0; nt < NB; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          const int row = r0 + g + i * 8, col = n0 + nt * 8 + 2 * tq + (e & 1);
          const bool valid = row < T && col <= row && col > row - window;
          const float pv = valid ? exp2f(fmaf(s[nt][e], p.scale_log2, -lse2[i])) : 0.f;
          s[nt][e] = pv * (dp[nt][e] - dlt[i]);
        }
      // dQ += dS K
#pragma unroll
      for (int kc = 0; kc < BN / 16; ++kc) {
        uint32_t a[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                         pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                         pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
          uint32_t bk[4];
          load_b_kn<D>(bk, tK, kc * 16, dn * 16);
          mma16816(dq[2 * dn], a, bk[0], bk[1]);
          mma16816(dq[2 * dn + 1], a, bk[2], bk[3]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = r0 + g + i * 8;
    if (row < T) {
      bf16_t* out = p.dq + base + int64_t(row) * stride;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * tq) =
            pack_bf16(dq[dt][2 * i] * p.scale, dq[dt][2 * i + 1] * p.scale);
    }
  }
}

// ==== launch configurations ==========================================================================
// Forward: (NW, MT, BN, Q_REGS); dK/dV: (NW, BM, split, KV_REGS); dQ: (NW, BN, QO_REGS).
template <int D>
struct FlashConfig;
template <>
struct FlashConfig<64> {
  static constexpr int kFwdNW = 4, kFwdMT = 2, kFwdBN = 64;
  static constexpr bool kFwdQRegs = true;
  static constexpr int kKvNW = 4, kKvBM = 64;
  static constexpr bool kKvSplit = false, kKvRegs = true;
  static constexpr int kDqNW = 4, kDqBN = 64;
  static constexpr bool kDqRegs = true;
};
template <>
struct FlashConfig<128> {
  static constexpr int kFwdNW = 4, kFwdMT = 1, kFwdBN = 64;
  static constexpr bool kFwdQRegs = true;
  static constexpr int kKvNW = 4, kKvBM = 32;
  static constexpr bool kKvSplit = false, kKvRegs = false;
  static constexpr int kDqNW = 4, kDqBN = 32;
  static constexpr bool kDqRegs = true;
};
template <>
struct FlashConfig<256> {
  static constexpr int kFwdNW = 4, kFwdMT = 1, kFwdBN = 32;
  static constexpr bool kFwdQRegs = false;
  static constexpr int kKvNW = 4, kKvBM = 32;
  static constexpr bool kKvSplit = true, kKvRegs = false;
  static constexpr int kDqNW = 4, kDqBN = 16;
  static constexpr bool kDqRegs = false;
};

// Alternative tile shapes with 8 warps per block (each K/V or Q/dO tile in shared memory serves
// twice the rows), selected at run time with NHA_FLASH_VARIANT=1 so both can be timed in one run.
template <int D>
struct FlashConfigAlt : FlashConfig<D> {};
template <>
struct FlashConfigAlt<64> {
  static constexpr int kFwdNW = 8, kFwdMT = 2, kFwdBN = 64;
  static constexpr bool kFwdQRegs = true;
  static constexpr int kKvNW = 8, kKvBM = 64;
  static constexpr bool kKvSplit = false, kKvRegs = true;
  static constexpr int kDqNW = 8, kDqBN = 64;
  static constexpr bool kDqRegs = true;
};
template <>
struct FlashConfigAlt<128> {
  static constexpr int kFwdNW = 8, kFwdMT = 1, kFwdBN = 64;
  static constexpr bool kFwdQRegs = true;
  static constexpr int kKvNW = 8, kKvBM = 32;
  static constexpr bool kKvSplit = false, kKvRegs = false;
  static constexpr int kDqNW = 8, kDqBN = 32;
  static constexpr bool kDqRegs = true;
};

bool flash_variant() {
  static const bool v = [] {
    const char* e = std::getenv("NHA_FLASH_VARIANT");
    return e != nullptr && e[0] == '1';
  }();
  return v;
}

template <typename Kernel>
void launch_with_smem(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t st,
                      const AttnParams& p) {
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)));
  kernel<<<grid, threads, smem, st>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <int D, typename C>
void flash_forward_with(const AttnParams& p, int B, cudaStream_t st) {
  constexpr int BM = 16 * C::kFwdMT * C::kFwdNW;
  const size_t smem = size_t(BM + 4 * C::kFwdBN) * kLds<D> * sizeof(bf16_t);
  const dim3 grid(unsigned((p.T + BM - 1) / BM), unsigned(B * p.H));
  launch_with_smem(flash_forward_kernel<D, C::kFwdNW, C::kFwdMT, C::kFwdBN, C::kFwdQRegs>, grid,
                   C::kFwdNW * 32, smem, st, p);
}

template <int D, typename C>
void flash_backward_with(const AttnParams& p, int B, cudaStream_t st) {
  {
    constexpr int BN = 16 * C::kKvNW, BM = C::kKvBM;
    const size_t smem = size_t(2 * BN + 4 * BM) * kLds<D> * sizeof(bf16_t) + 4 * BM * sizeof(float);
    const dim3 grid(unsigned((p.T + BN - 1) / BN), unsigned(B * p.H));
    if constexpr (C::kKvSplit) {
      launch_with_smem(flash_backward_dkdv_kernel<D, C::kKvNW, BM, false, true, C::kKvRegs>, grid,
                       C::kKvNW * 32, smem, st, p);
      launch_with_smem(flash_backward_dkdv_kernel<D, C::kKvNW, BM, true, false, C::kKvRegs>, grid,
                       C::kKvNW * 32, smem, st, p);
    } else {
      launch_with_smem(flash_backward_dkdv_kernel<D, C::kKvNW, BM, true, true, C::kKvRegs>, grid,
                       C::kKvNW * 32, smem, st, p);
    }
  }
  {
    constexpr int BM = 16 * C::kDqNW, BN = C::kDqBN;
    const size_t smem = size_t(2 * BM + 4 * BN) * kLds<D> * sizeof(bf16_t);
    const dim3 grid(unsigned((p.T + BM - 1) / BM), unsigned(B * p.H));
    launch_with_smem(flash_backward_dq_kernel<D, C::kDqNW, BN, C::kDqRegs>, grid, C::kDqNW * 32,
                     smem, st, p);
  }
}

template <int D>
void flash_forward(const AttnParams& p, int B, cudaStream_t st) {
  if (flash_variant())
    flash_forward_with<D, FlashConfigAlt<D>>(p, B, st);
  else
    flash_forward_with<D, FlashConfig<D>>(p, B, st);
}

template <int D>
void flash_backward(const AttnParams& p, int B, cudaStream_t st) {
  if (flash_variant())
    flash_backward_with<D, FlashConfigAlt<D>>(p, B, st);
  else
    flash_backward_with<D, FlashConfig<D>>(p, B, st);
}

// ==== simple path: one warp per row, f32 math, any D <= 32 * NE ======================================
// Lane l holds elements d = l + 32 e (e < NE) of a row.

// out_t = sum_j softmax_j(s_tj) v_j by the online recurrence; lse_t.
template <typename T, int NE>
__global__ void simple_forward_kernel(T* __restrict__ out, float* __restrict__ lse,
                                      const T* __restrict__ q, const T* __restrict__ k,
                                      const T* __restrict__ v, int B, int T_, int H, int D,
                                      float scale, int window, float sinks) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;  // (b, h, t)
  const int lane = threadIdx.x & 31;
  if (row >= int64_t(B) * H * T_) return;
  const int t = int(row % T_), h = int((row / T_) % H), b = int(row / (int64_t(T_) * H));
  const int64_t stride = int64_t(H) * D, base = int64_t(b) * T_ * stride + int64_t(h) * D;
  float qv[NE], acc[NE];
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    const int d = lane + 32 * e;
    qv[e] = d < D ? to_f32(q[base + t * stride + d]) : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = max(0, t - window + 1); j <= t; ++j) {
    const T* kj = k + base + j * stride;
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      if (d < D) dot += qv[e] * to_f32(kj[d]);
    }
    const float s = warp_sum(dot) * scale;
    const float m_new = fmaxf(m, s), c = expf(m - m_new), pj = expf(s - m_new);
    l = l * c + pj;
    const T* vj = v + base + j * stride;
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      acc[e] = acc[e] * c + (d < D ? pj * to_f32(vj[d]) : 0.f);
    }
    m = m_new;
  }
  if (sinks > 0.f) {  // sinks keys of logit 0, value 0
    const float m_new = fmaxf(m, 0.f), c = expf(m - m_new);
    l = l * c + sinks * expf(-m_new);
#pragma unroll
    for (int e = 0; e < NE; ++e) acc[e] *= c;
    m = m_new;
  }
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    const int d = lane + 32 * e;
    if (d < D) out[base + t * stride + d] = from_f32<T>(acc[e] / l);
  }
  if (lane == 0) lse[row] = m + logf(l);
}

// dq_t = scale sum_j P_tj (dout_t.v_j - delta_t) k_j
template <typename T, int NE>
__global__ void simple_backward_dq_kernel(T* __restrict__ dq, const T* __restrict__ dout,
                                          const T* __restrict__ q, const T* __restrict__ k,
                                          const T* __restrict__ v, const float* __restrict__ lse,
                                          const float* __restrict__ delta, int B, int T_, int H,
                                          int D, float scale, int window) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;  // (b, h, t)
  const int lane = threadIdx.x & 31;
  if (row >= int64_t(B) * H * T_) return;
  const int t = int(row % T_), h = int((row / T_) % H), b = int(row / (int64_t(T_) * H));
  const int64_t stride = int64_t(H) * D, base = int64_t(b) * T_ * stride + int64_t(h) * D;
  float qv[NE], gv[NE], acc[NE];
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    const int d = lane + 32 * e;
    qv[e] = d < D ? to_f32(q[base + t * stride + d]) : 0.f;
    gv[e] = d < D ? to_f32(dout[base + t * stride + d]) : 0.f;
    acc[e] = 0.f;
  }
  const float lse_t = lse[row], delta_t = delta[row];
  for (int j = max(0, t - window + 1); j <= t; ++j) {
    const T *kj = k + base + j * stride, *vj = v + base + j * stride;
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      if (d < D) {
        s += qv[e] * to_f32(kj[d]);
        dp += gv[e] * to_f32(vj[d]);
      }
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    const float ds = expf(s * scale - lse_t) * (dp - delta_t);
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      if (d < D) acc[e] += ds * to_f32(kj[d]);
    }
  }
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    const int d = lane + 32 * e;
    if (d < D) dq[base + t * stride + d] = from_f32<T>(acc[e] * scale);
  }
}

// One warp per key j: dv_j = sum_t P_tj dout_t;  dk_j = scale sum_t dS_tj q_t, t in [j, j+window)
template <typename T, int NE>
__global__ void simple_backward_dkdv_kernel(T* __restrict__ dk, T* __restrict__ dv,
                                            const T* __restrict__ dout, const T* __restrict__ q,
                                            const T* __restrict__ k, const T* __restrict__ v,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ delta, int B, int T_, int H,
                                            int D, float scale, int window) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;  // (b, h, j)
  const int lane = threadIdx.x & 31;
  if (row >= int64_t(B) * H * T_) return;
  const int j = int(row % T_), h = int((row / T_) % H), b = int(row / (int64_t(T_) * H));
  const int64_t stride = int64_t(H) * D, base = int64_t(b) * T_ * stride + int64_t(h) * D;
  const int64_t stats = row - j;  // (b, h, 0) of [B, H, T]
  float kv[NE], vv[NE], ak[NE], av[NE];
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    const int d = lane + 32 * e;
    kv[e] = d < D ? to_f32(k[base + j * stride + d]) : 0.f;
    vv[e] = d < D ? to_f32(v[base + j * stride + d]) : 0.f;
    ak[e] = av[e] = 0.f;
  }
  const int t_end = int(min(int64_t(T_) - 1, int64_t(j) + window - 1));
  for (int t = j; t <= t_end; ++t) {
    const T *qt = q + base + t * stride, *gt = dout + base + t * stride;
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      if (d < D) {
        s += to_f32(qt[d]) * kv[e];
        dp += to_f32(gt[d]) * vv[e];
      }
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    const float pt = expf(s * scale - lse[stats + t]);
    const float ds = pt * (dp - delta[stats + t]);
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      if (d < D) {
        av[e] += pt * to_f32(gt[d]);
        ak[e] += ds * to_f32(qt[d]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    const int d = lane + 32 * e;
    if (d < D) {
      dk[base + j * stride + d] = from_f32<T>(ak[e] * scale);
      dv[base + j * stride + d] = from_f32<T>(av[e]);
    }
  }
}

// Calls fn.template operator()<NE>() with NE = ceil(D / 32) rounded up to 1, 2, 4 or 8.
template <typename F>
void dispatch_ne(int D, F&& fn) {
  if (D <= 32)
    fn.template operator()<1>();
  else if (D <= 64)
    fn.template operator()<2>();
  else if (D <= 128)
    fn.template operator()<4>();
  else
    fn.template operator()<8>();
}

struct Dims {
  int B, T, H, D;
};

Dims check_attention(const char* op, int dev, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& lse) {
  NHA_CHECK(q.dim() == 4) << op << ": q must be [B, T, H, D], got " << q.str();
  check_same_shape(k, q, op);
  check_same_shape(v, q, op);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &lse}) check_cuda_tensor(*t, dev, op, "argument");
  NHA_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype())
      << op << ": q, k, v must share one dtype, got " << q.str() << ", " << k.str() << ", "
      << v.str();
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  NHA_CHECK(lse.shape() == (Shape{B, H, T}))
      << op << ": lse must be [B, H, T] = " << shape_str({B, H, T}) << ", got " << lse.str();
  check_dtype_is(lse, DType::F32, op, "lse");
  NHA_CHECK(T < (1LL << 30) && B * H <= 65535 && D <= 256 && D > 0)
      << op << ": unsupported shape " << q.str()
      << " (needs T < 2^30, B*H <= 65535, 0 < head dim <= 256)";
  return {int(B), int(T), int(H), int(D)};
}

bool use_flash(const Dims& d, std::initializer_list<const Tensor*> ts) {
  if (ts.begin()[0]->dtype() != DType::BF16) return false;
  if (d.D != 64 && d.D != 128 && d.D != 256) return false;
  for (const Tensor* t : ts)
    if (!aligned16(t->data_ptr())) return false;
  return true;
}

int clamp_window(int64_t window, int T) { return (window <= 0 || window > T) ? T : int(window); }

}  // namespace

void CudaBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                    const Tensor& v, double scale, int64_t window) {
  attention_forward_sinks(out, lse, q, k, v, scale, window, 0);
}

void CudaBackend::attention_forward_sinks(Tensor& out, Tensor& lse, const Tensor& q,
                                          const Tensor& k, const Tensor& v, double scale,
                                          int64_t window, int64_t sinks) {
  const int dev = q.device().index;
  const Dims d = check_attention("attention_forward", dev, q, k, v, lse);
  check_cuda_tensor(out, dev, "attention_forward", "out");
  check_same_shape(out, q, "attention_forward out");
  NHA_CHECK(out.dtype() == q.dtype()) << "attention_forward: out " << out.str() << " vs q "
                                      << q.str();
  if (q.numel() == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  const int win = clamp_window(window, d.T);
  if (use_flash(d, {&q, &k, &v, &out})) {
    AttnParams p{};
    p.q = static_cast<const bf16_t*>(q.data_ptr());
    p.k = static_cast<const bf16_t*>(k.data_ptr());
    p.v = static_cast<const bf16_t*>(v.data_ptr());
    p.out = static_cast<bf16_t*>(out.data_ptr());
    p.lse = static_cast<float*>(lse.data_ptr());
    p.T = d.T;
    p.H = d.H;
    p.window = win;
    p.scale = float(scale);
    p.scale_log2 = float(scale * 1.4426950408889634);
    p.sinks = float(sinks);
    switch (d.D) {
      case 64: flash_forward<64>(p, d.B, st); break;
      case 128: flash_forward<128>(p, d.B, st); break;
      default: flash_forward<256>(p, d.B, st); break;
    }
    return;
  }
  const int64_t rows = int64_t(d.B) * d.H * d.T;
  dispatch_f32_bf16(q, "attention_forward", [&]<typename T>() {
    dispatch_ne(d.D, [&]<int NE>() {
      simple_forward_kernel<T, NE><<<grid_for(rows * 32, 256, 1LL << 30), 256, 0, st>>>(
          static_cast<T*>(out.data_ptr()), static_cast<float*>(lse.data_ptr()),
          static_cast<const T*>(q.data_ptr()), static_cast<const T*>(k.data_ptr()),
          static_cast<const T*>(v.data_ptr()), d.B, d.T, d.H, d.D, float(scale), win,
          float(sinks));
      CUDA_CHECK_LAUNCH();
    });
  });
}

void CudaBackend::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                     const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, double scale,
                                     int64_t window) {
  const int dev = q.device().index;
  const Dims d = check_attention("attention_backward", dev, q, k, v, lse);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dq, &dk, &dv, &dout, &out}) {
    check_cuda_tensor(*t, dev, "attention_backward", "argument");
    check_same_shape(*t, q, "attention_backward");
    NHA_CHECK(t->dtype() == q.dtype())
        << "attention_backward: " << t->str() << " must have q's dtype " << dtype_name(q.dtype());
  }
  if (q.numel() == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  const int win = clamp_window(window, d.T);
  const int64_t rows = int64_t(d.B) * d.H * d.T;
  Scratch delta(size_t(rows) * sizeof(float), dev);  // [B, H, T]
  dispatch_f32_bf16(q, "attention_backward", [&]<typename T>() {
    attention_delta_kernel<T><<<grid_for(rows * 32, 256, 1LL << 30), 256, 0, st>>>(
        delta.as<float>(), static_cast<const T*>(dout.data_ptr()),
        static_cast<const T*>(out.data_ptr()), rows, d.T, d.H, d.D);
    CUDA_CHECK_LAUNCH();
  });
  if (use_flash(d, {&q, &k, &v, &out, &dout, &dq, &dk, &dv})) {
    AttnParams p{};
    p.q = static_cast<const bf16_t*>(q.data_ptr());
    p.k = static_cast<const bf16_t*>(k.data_ptr());
    p.v = static_cast<const bf16_t*>(v.data_ptr());
    p.o = static_cast<const bf16_t*>(out.data_ptr());
    p.dout = static_cast<const bf16_t*>(dout.data_ptr());
    p.dq = static_cast<bf16_t*>(dq.data_ptr());
    p.dk = static_cast<bf16_t*>(dk.data_ptr());
    p.dv = static_cast<bf16_t*>(dv.data_ptr());
    p.lse = static_cast<float*>(const_cast<void*>(lse.data_ptr()));
    p.delta = delta.as<float>();
    p.T = d.T;
    p.H = d.H;
    p.window = win;
    p.scale = float(scale);
    p.scale_log2 = float(scale * 1.4426950408889634);
    switch (d.D) {
      case 64: flash_backward<64>(p, d.B, st); break;
      case 128: flash_backward<128>(p, d.B, st); break;
      default: flash_backward<256>(p, d.B, st); break;
    }
    return;
  }
  dispatch_f32_bf16(q, "attention_backward", [&]<typename T>() {
    dispatch_ne(d.D, [&]<int NE>() {
      const unsigned grid = grid_for(rows * 32, 256, 1LL << 30);
      simple_backward_dq_kernel<T, NE><<<grid, 256, 0, st>>>(
          static_cast<T*>(dq.data_ptr()), static_cast<const T*>(dout.data_ptr()),
          static_cast<const T*>(q.data_ptr()), static_cast<const T*>(k.data_ptr()),
          static_cast<const T*>(v.data_ptr()), static_cast<const float*>(lse.data_ptr()),
          delta.as<float>(), d.B, d.T, d.H, d.D, float(scale), win);
      CUDA_CHECK_LAUNCH();
      simple_backward_dkdv_kernel<T, NE><<<grid, 256, 0, st>>>(
          static_cast<T*>(dk.data_ptr()), static_cast<T*>(dv.data_ptr()),
          static_cast<const T*>(dout.data_ptr()), static_cast<const T*>(q.data_ptr()),
          static_cast<const T*>(k.data_ptr()), static_cast<const T*>(v.data_ptr()),
          static_cast<const float*>(lse.data_ptr()), delta.as<float>(), d.B, d.T, d.H, d.D,
          float(scale), win);
      CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace nha
