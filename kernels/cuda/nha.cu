// CUDA Native Hybrid Attention core (docs/nha.md §2, §4 route 2) and the NHA gates.
//
// Math (kernels/backend.h, nha_forward): per (b, h), memory Hk [D, M], Hv [M, D] start at 0; at
// step t first write token j = t - w (if j >= 0), then read:
//   Hk = Hk * e^{g_j}[None,:] + k_j s_j^T;  Hv = Hv * e^{g_j}[:,None] + s_j v_j^T
//   lm_t = scale q_t Hk;  lw_tj = scale qr_t . kr_j (t - w < j <= t);  p_t = softmax([lm_t ; lw_t])
//   out_t = p_t[:M] Hv + sum_j p_t[M + j] v_j
//
// Route 2 (log-sum-exp merge). The window branch is the project's flash attention
// (attention.cu: attention_forward returns (o_w, lse_w)); window 0 = no window branch. The memory
// branch is a chunked gated-slot attention with a softmax over the M slots only, returning
// (o_m, lse_m); then
//   o = (e^{lse_w} o_w + e^{lse_m} o_m) / (e^{lse_w} + e^{lse_m}),  lse = logaddexp(lse_w, lse_m).
// Backward: the window branch is attention_backward with the MERGED o and the GLOBAL lse (its
// delta = dO.o is the joint softmax's <p, dp>, its P = e^{s - lse} is the joint pw); the memory
// branch gets dO' = r dO with r_t = e^{lse_m,t - lse_t}, and its slot-logit gradient is
//   dlm_t = pm_t ⊙ (dpm'_t - r_t (dO_t . o_t))          (pm = memory-local softmax, dpm' with dO')
// which equals the local softmax backward plus docs/nha.md §4's (sum dO r (o_m - o)) pm term.
//
// Memory branch, chunked (C rows per chunk, C = 64 unless shared memory forces 32 or 16). Primes
// are the shifted inputs K'_t = k_{t-w}, S'_t = s_{t-w}, G'_t = g_{t-w}, V'_t = v_{t-w} (0 for
// t < w and t >= T). Inside chunk n (rows i, j; time t = nC + i):
//   B_i = log2(e) * inclusive cumsum of G' (m-vector, log2 units so that every exp is an exp2)
//   b = B_{C-1};  D_ij = 2^{B_i - B_j} (j <= i, <= 1: no 2^{-B} is ever formed alone; the
//   tensor-core path forms bounded factors >= 1 inside a 16-row sub-chunk, see "sub-chunks")
//   A_ij = scale q_i . K'_j (j <= i)
//   lm_i = scale (q_i Hk_n) ⊙ 2^{B_i} + sum_{j<=i} A_ij S'_j ⊙ D_ij
//   pm_i = softmax(lm_i), lse_m,i = logsumexp(lm_i)
//   W_ij = sum_s pm_i[s] S'_j[s] D_ij[s]                 (j <= i)
//   o_m,i = (pm_i ⊙ 2^{B_i}) Hv_n + sum_{j<=i} W_ij V'_j
//   Hk_{n+1} = Hk_n ⊙ 2^{b}[None,:] + K'^T S~,  Hv_{n+1} = 2^{b}[:,None] ⊙ Hv_n + S~^T V',
//   S~ = S' ⊙ 2^{b - B}
// Chunk-parallel schedule: (1) every chunk's state contribution (K'^T S~, S~^T V', b) in
// parallel; (2) a scan over chunks per state element gives every Hk_n, Hv_n; (3) every chunk's
// outputs in parallel. Backward (docs/nha.md §4 (a)-(f) for the memory branch) the same way: recompute
// (1)-(2); (4) per chunk dpm, dlm, the gate terms and the chunk's contributions to the carried
// state gradients; (5) a reverse scan gives the carried dHk, dHv of every chunk; (6) per chunk
// dq, dK', dV', dS'; (7) a reverse scan of the gate terms' chunk totals and the un-shift of dg.
//   dpm_i  = (dO'_i Hv_n^T) ⊙ 2^{B_i} + sum_{j<=i} E_ij S'_j ⊙ D_ij,    E_ij = dO'_i . V'_j
//   dlm_i  = pm_i ⊙ (dpm_i - r_i dO_i . o_i)
//   dS'v_j = sum_{i>=j} E_ij pm_i ⊙ D_ij + 2^{b-B_j} ⊙ (V'_j dHv^T)
//   dS'k_j = sum_{i>=j} A_ij dlm_i ⊙ D_ij + 2^{b-B_j} ⊙ (K'_j dHk)
//   dV'_j  = sum_{i>=j} W_ij dO'_i + S~_j dHv
//   dK'_j  = scale sum_{i>=j} dA_ij q_i + S~_j dHk^T,   dA_ij = sum_s dlm_i[s] S'_j[s] D_ij[s]
//   dq_i   = scale (dlm_i ⊙ 2^{B_i}) Hk_n^T + scale sum_{j<=i} dA_ij K'_j
//   dHk   <- dHk ⊙ 2^{b}[None,:] + scale q^T (dlm ⊙ 2^{B});  dHv <- 2^{b}[:,None] ⊙ dHv + (pm ⊙ 2^B)^T dO'
//   dG'_t  = sum_{u>=t} [dpm_u ⊙ pm_u + dlm_u ⊙ lm_u - (dS'v_u + dS'k_u) ⊙ S'_u]   (whole sequence)
//   un-shift: dk_j = dK'_{j+w}, ds_j = dS'v_{j+w} + dS'k_{j+w}, dg_j = dG'_{j+w}, dv_j += dV'_{j+w}
// (the exponent base change is exact: 2^{log2(e) x} = e^x.)
//
// Schedule (one launch per step; grid (N chunks, B*H); C = 64, D = 128, M = 64 in brackets):
//   step  kernel                  block              shared memory (tensor-core path)
//   (1)   nha_contrib_kernel      512 thr (TC) / 256 K', V' bf16 rows, S', B f32 rows      [66 KB]
//   (2)   nha_scan_kernel         256 thr per 256 state elements of one b*h, serial over chunks
//   (3)   nha_forward_kernel      512 / 256          q, K'->V', S', B, pm, A->W, + one staged
//                                                    state (Hk, then Hv) as split bf16  [137 KB]
//   (4)   nha_dlogits_kernel      512 / 256          + dO, lm, dpm                      [187 KB]
//   (5)   nha_scan_kernel (reverse, carried dHk, dHv)
//   (6)   nha_grads_kernel        512 / 256          q, K', V', dO, S', B, pm, dlm, X, A, E,
//                                                    one staged state at a time         [220 KB]
//   (7)   nha_scan_kernel (gate-term chunk totals) + nha_dg_kernel (elementwise)
// Inside a chunk kernel: the chunk's rows are loaded once (16-byte global loads), B = the gate
// cumsum (a warp-shuffle scan per column), then a sequence of block-wide products separated by
// barriers. Each product runs on one of two engines behind one interface (for_tiles_of + mm_acc,
// the epilogue written once): f32 FMA register tiles (4x4 per thread, 256 threads; the f32 path,
// exact to f32 roundoff) or mma.sync m16n8k16 tensor-core strips (bf16 path, 16 warps): a warp
// owns 16 rows x 32 columns of the result, its accumulators in registers, operand fragments
// read from shared memory (bf16 inputs as bf16 pairs, staged states as split bf16 pairs, other f32
// operands split when the fragment is built); "block matrix products on tensor cores" below says
// how the f32 operands keep their precision, "sub-chunks" how the exp-weighted sums lm, W, dpm,
// dS', dA become products (on the f32 path they take one exp2 per term). Global memory: the inputs
// once per kernel, the states [B*H][N][2 D M] f32 written by (1)/(2) and read by (3), (4), (6);
// pm, dlm, gate terms [B*H][T][M] f32 from (4) to (6). States, their gradients, logits, softmax
// statistics and gate cumsums are f32 throughout; no float atomics anywhere (deterministic).
// window >= T: memory is never written; the flash kernel runs with the M slots as zero-logit,
// zero-value sinks (attention_forward_sinks).
//
// Supported: q, k, qr, kr, v, out, dout f32 or bf16 (one dtype), s, g (ds, dg) that dtype or f32;
// head dim D a multiple of 8 in [8, 256]; slots M in [1, 128]; any T >= 1; B*H <= 65535.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/mma.cuh"

namespace nha {

using namespace cuda;

namespace {

// Threads of a chunk kernel. The tensor-core kernels are latency-bound at one block per SM (their
// shared memory): 16 warps hide twice what 8 did (ncu, H200: 8 warps issued 0.19 instructions per
// scheduler cycle, 80% of cycles with no eligible warp, mostly waiting on shared-memory loads).
template <bool kTc>
constexpr int kThreads = kTc ? 512 : 256;
constexpr int kTM = 4, kTN = 4;  // register tile of the block matrix products
constexpr int kMaxM = 128, kMaxD = 256;
constexpr int kMaxChunk = 64;  // chunk rows: 64, or 32 / 16 where shared memory needs it

// ---- parameters shared by the chunk kernels --------------------------------------------------------
struct NhaParams {
  int B, T, H, D, M;  // sizes; the memory shift w is `w`
  int C, N, Tp;       // chunk rows, chunks per sequence, N * C (padded length)
  int w;              // 0 <= w < T on the chunked path
  int has_window;     // window > 0: out / lse hold (o_w, lse_w) when the forward kernel starts
  float scale;
  int E;              // 2 D M: floats of one chunk's (Hk, Hv) pair
  float* states;      // [BH][N][E]: Hk_n [D][M] at 0, Hv_n [M][D] at D*M (state at chunk start)
  float* dstates;     // [BH][N][E]: the same layout, dHk / dHv carried INTO chunk n from later ones
  float* bl;          // [BH][N][M]: b of chunk n (log2 units)
  float* pm;          // [BH][Tp][M]: memory-local softmax (backward)
  float* dlm;         // [BH][Tp][M]: slot-logit gradient (backward)
  float* xp;          // [BH][Tp][M]: dpm pm + dlm lm, then the in-chunk reverse cumsum of dG' terms
  float* r;           // [BH][Tp]:    e^{lse_m - lse} (0 on padded rows)
  float* xtot;        // [BH][N][M]:  chunk totals of the dG' terms, then their reverse exclusive scan
};

__host__ __device__ constexpr size_t up16(size_t n) { return (n + 15) & ~size_t(15); }
// Row stride (elements) of a state staged as bf16 with rows of X: a multiple of 16 plus 8, so bf16
// pairs stay 4-byte aligned for any X and a warp's fragment loads (8 rows x 4 pairs; the row
// stride is 4 words mod 32 for X = 64 or 128, 28 for X = 40) fall on 32 different banks.
__host__ __device__ constexpr int stage_ld(int X) { return ((X + 15) & ~15) + 8; }

// Shared-memory layout of one chunk (host and device compute the same numbers).
//   T-buffers [C][ldt] of the input dtype: ldt = D+1 (f32) or D+2 (bf16): an odd word stride, so
//     row-strided and column-strided accesses of a warp hit 32 different banks (D % 8 == 0);
//   M-buffers [C][lm1] f32, lm1 = M+1 for even M (odd stride);  C-buffers [C][C+1] f32;
//   row vectors [C] f32.
//   tensor-core path only: one state [D][M] or [M][D] staged as split bf16, hi and lo halves of
//     st_elems each (rows of stage_ld elements, the pad zero), after everything else (sb bytes).
struct Layout {
  int C, D, M, ldt, lm1, lc1, st_elems;
  size_t tb, mb, cb, rb, sb;
  __host__ __device__ Layout(int C_, int D_, int M_, int tsize, bool tc) : C(C_), D(D_), M(M_) {
    ldt = D + 4 / tsize;
    lm1 = (M % 2 == 0) ? M + 1 : M;
    lc1 = C + 1;
    tb = up16(size_t(C) * ldt * tsize);
    mb = up16(size_t(C) * lm1 * 4);
    cb = up16(size_t(C) * lc1 * 4);
    rb = up16(size_t(C) * 4);
    const int dm = D * stage_ld(M), md = M * stage_ld(D);
    st_elems = int(up16(size_t(dm > md ? dm : md)));
    sb = tc ? 2 * size_t(st_elems) * 2 : 0;
  }
  __host__ __device__ size_t contrib_bytes() const { return 2 * tb + 2 * mb; }
  __host__ __device__ size_t forward_bytes() const { return 2 * tb + 3 * mb + cb + 3 * rb + sb; }
  __host__ __device__ size_t dlogits_bytes() const { return 3 * tb + 5 * mb + cb + 3 * rb + sb; }
  __host__ __device__ size_t grads_bytes() const { return 4 * tb + 5 * mb + 2 * cb + rb + sb; }
  __host__ __device__ size_t max_bytes() const {
    size_t a = contrib_bytes() > forward_bytes() ? contrib_bytes() : forward_bytes();
    size_t b = dlogits_bytes() > grads_bytes() ? dlogits_bytes() : grads_bytes();
    return a > b ? a : b;
  }
};

// ---- block matrix products ---------------------------------------------------------------------------
// A thread owns tiles of kTM rows x kTN columns of an R x Cc result: rows r0 .. r0+3, columns
// c0 + ncg*u (strided, so neighbouring lanes take neighbouring columns: conflict-free shared-memory
// reads of the column operand). r[] / c[] are clamped into range for reading; rv / cv say which are
// real (write only those).
struct Tile {
  static constexpr int kR = kTM, kC = kTN;
  int r[kTM], c[kTN];
  bool rv[kTM], cv[kTN];
};
template <class Body>
__device__ __forceinline__ void for_tiles(int R, int Cc, Body&& body) {
  const int ncg = (Cc + kTN - 1) / kTN, nrg = (R + kTM - 1) / kTM;
  for (int t = threadIdx.x; t < nrg * ncg; t += blockDim.x) {
    const int tr = t / ncg, tc = t - tr * ncg;
    Tile tl;
#pragma unroll
    for (int v = 0; v < kTM; ++v) {
      const int r = tr * kTM + v;
      tl.rv[v] = r < R;
      tl.r[v] = r < R ? r : R - 1;
    }
#pragma unroll
    for (int u = 0; u < kTN; ++u) {
      const int c = tc + ncg * u;
      tl.cv[u] = c < Cc;
      tl.c[u] = c < Cc ? c : Cc - 1;
    }
    body(tl);
  }
}
// acc[v][u] += sum_{k < K} a(r[v], k) * b(k, c[u])   (the split flags are the tensor-core
// version's; f32 FMAs are exact enough as they are)
template <bool kSplitA = false, bool kSplitB = false, class FA, class FB>
__device__ __forceinline__ void mm_acc(float (&acc)[kTM][kTN], const Tile& tl, int K, FA&& a,
                                       FB&& b) {
#pragma unroll 2
  for (int k = 0; k < K; ++k) {
    float av[kTM], bv[kTN];
#pragma unroll
    for (int v = 0; v < kTM; ++v) av[v] = a(tl.r[v], k);
#pragma unroll
    for (int u = 0; u < kTN; ++u) bv[u] = b(k, tl.c[u]);
#pragma unroll
    for (int v = 0; v < kTM; ++v)
#pragma unroll
      for (int u = 0; u < kTN; ++u) acc[v][u] = fmaf(av[v], bv[u], acc[v][u]);
  }
}

// ---- block matrix products on tensor cores (the bf16 path) ---------------------------------------
// The same contract as for_tiles / mm_acc, on mma.sync m16n8k16 (bf16 operands, f32 accumulators).
// A warp owns a strip of 16 rows x 32 columns (four n8 tiles); the thread's accumulators are rows
// r[v] = r0 + g + 8v (g = lane/4) x columns c[u] = c0 + 8(u/2) + 2(lane%4) + u%2, so an epilogue
// written for for_tiles (loops over kR x kC, rv/cv checks) serves both. bc[n] = c0 + 8n + g are the
// columns whose B fragments the thread loads; nt = the n8 tiles with any column inside.
//
// Precision. Operands read from the bf16 inputs (q, k, v, dO) are exact in bf16. Every other operand
// (states, gates, softmax weights, logit gradients, decay-weighted gates) is f32 and is split into
// two bf16 values, x = hi + lo + O(2^-17 |x|), and the product is taken as hi*hi + hi*lo + lo*hi
// (two or three mma.sync): ~16 significant bits instead of bf16's 8. Measured on an H200 with
// plain bf16 operands instead (2026-12-02, tests/gpu/test_cuda_nha.cpp): lse 1e-4 relative error
// (split: 2e-7), dg 1.7e-2 with ordinary gates and 0.11 / 0.17 with strong / extreme decay (split:
// 2e-3, 3e-4), against a bf16 limit of 2e-2. dg is the reverse cumsum over the whole sequence of
// dpm pm + dlm lm - dS' S', terms that mostly cancel, so their relative errors add up.
struct TcTile {
  static constexpr int kR = 2, kC = 8;
  int r0, c0, nt;
  int r[kR], c[kC], bc[4];
  bool rv[kR], cv[kC];
};
template <class Body>
__device__ __forceinline__ void for_tc_tiles(int R, int Cc, Body&& body) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, q2 = (lane & 3) * 2;
  const int ncs = (Cc + 31) / 32, nrs = (R + 15) / 16;
  for (int task = warp; task < nrs * ncs; task += nwarps) {
    TcTile tl;
    tl.r0 = (task / ncs) * 16;
    tl.c0 = (task % ncs) * 32;
    tl.nt = min(4, (Cc - tl.c0 + 7) / 8);
#pragma unroll
    for (int v = 0; v < TcTile::kR; ++v) {
      const int r = tl.r0 + g + 8 * v;
      tl.rv[v] = r < R;
      tl.r[v] = r < R ? r : R - 1;
    }
#pragma unroll
    for (int u = 0; u < TcTile::kC; ++u) {
      const int c = tl.c0 + 8 * (u >> 1) + q2 + (u & 1);
      tl.cv[u] = c < Cc;
      tl.c[u] = c < Cc ? c : Cc - 1;
    }
#pragma unroll
    for (int n = 0; n < 4; ++n) tl.bc[n] = min(tl.c0 + 8 * n + g, Cc - 1);
    body(tl);
  }
}
// for_tiles on CUDA cores or tensor cores (kTc: the bf16 path unless NHA_CUDA_NHA_FMA=1).
template <bool kTc, class Body>
__device__ __forceinline__ void for_tiles_of(int R, int Cc, Body&& body) {
  if constexpr (kTc)
    for_tc_tiles(R, Cc, body);
  else
    for_tiles(R, Cc, body);
}
// An operand matrix of the chunk's bf16 (or f32) inputs in shared memory: element (x, y) =
// p[x s0 + y s1], where (x, y) = (row, k) for an A operand and (k, column) for a B operand. On the
// tensor-core path its k-pairs are loaded as one bf16x2 word (k-contiguous) or two 16-bit loads,
// with no f32 round trip; elsewhere it is an ordinary element functor.
template <typename T>
struct SmemMat {
  const T* p;
  int s0, s1;
  __device__ __forceinline__ float operator()(int x, int y) const { return to_f32(p[x * s0 + y * s1]); }
};
template <class F>
constexpr bool kIsBf16Mat = std::is_same_v<std::decay_t<F>, SmemMat<bf16_t>>;
// The elements (x, y) and (x, y + 1) (kAlongY) or (x, y), (x + 1, y) of a bf16 SmemMat as bf16x2;
// k is the coordinate that steps (y or x), elements at k >= kend are 0.
template <bool kAlongY>
__device__ __forceinline__ uint32_t bf16_pair(const SmemMat<bf16_t>& m, int x, int y, int k,
                                              int kend) {
  const bf16_t* e = m.p + x * m.s0 + y * m.s1;
  const int step = kAlongY ? m.s1 : m.s0;
  if (k + 1 < kend && step == 1) return *reinterpret_cast<const uint32_t*>(e);
  const uint32_t lo = k < kend ? *reinterpret_cast<const uint16_t*>(e) : 0u;
  const uint32_t hi = k + 1 < kend ? *reinterpret_cast<const uint16_t*>(e + step) : 0u;
  return lo | (hi << 16);
}
// A state operand [R][X] f32 in global memory, element (x, y) = p[x X + y] (the CUDA-core path).
struct GlobalMat {
  const float* p;
  int X;
  __device__ __forceinline__ float operator()(int x, int y) const { return __ldg(p + x * X + y); }
};
// The same state staged in shared memory as split bf16 (the tensor-core path): hi + lo = x, the
// split done once per block instead of once per fragment, the fragments read as bf16 pairs.
struct SplitMat {
  SmemMat<bf16_t> hi, lo;
};
template <class F>
constexpr bool kIsSplitMat = std::is_same_v<std::decay_t<F>, SplitMat>;
// Two f32 values as a bf16x2 register (low half = x0) and, when split, the rounding remainders.
template <bool kSplit>
__device__ __forceinline__ void to_bf16x2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = pack_bf16(x0, x1);
  if constexpr (kSplit) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&hi));
    lo = pack_bf16(x0 - f.x, x1 - f.y);
  }
}
// hi, lo [R][stage_ld(X)] bf16 (the pad columns zero) = split(src [R][X] f32). All threads call it,
// between barriers.
__device__ __forceinline__ SplitMat stage_state(bf16_t* hi, bf16_t* lo, const float* __restrict__ src,
                                                int R, int X) {
  const int ld = stage_ld(X);
  if (X % 4 == 0) {  // 16-byte loads, 8-byte stores (states are allocation-aligned rows of X floats)
    const int per_row = ld / 4;
    for (int e = threadIdx.x; e < R * per_row; e += blockDim.x) {
      const int x = e / per_row, y = (e - x * per_row) * 4;
      Pack<float, 4> v{};
      if (y < X) v = load_pack<float, 4>(src + x * X + y);
      uint32_t h[2], l[2];
      to_bf16x2<true>(v.v[0], v.v[1], h[0], l[0]);
      to_bf16x2<true>(v.v[2], v.v[3], h[1], l[1]);
      *reinterpret_cast<uint2*>(hi + x * ld + y) = make_uint2(h[0], h[1]);
      *reinterpret_cast<uint2*>(lo + x * ld + y) = make_uint2(l[0], l[1]);
    }
  } else {
    for (int e = threadIdx.x; e < R * ld; e += blockDim.x) {
      const int x = e / ld, y = e - x * ld;
      const float v = y < X ? __ldg(src + x * X + y) : 0.f;
      const bf16_t h = __float2bfloat16_rn(v);
      hi[e] = h;
      lo[e] = __float2bfloat16_rn(v - __bfloat162float(h));
    }
  }
  return SplitMat{{hi, ld, 1}, {lo, ld, 1}};
}
// A state [R][X] (global, f32) as a product operand: staged as split bf16 in `stage` (hi, then lo
// at + st_elems) on the tensor-core path, read from global memory on the CUDA-core path. All
// threads call it; on the tensor-core path it waits for the stage's earlier readers first.
template <bool kTc>
__device__ __forceinline__ auto state_operand(bf16_t* stage, int st_elems, const float* g, int R,
                                              int X) {
  if constexpr (kTc) {
    __syncthreads();
    const SplitMat m = stage_state(stage, stage + st_elems, g, R, X);
    __syncthreads();
    return m;
  } else {
    return GlobalMat{g, X};
  }
}
// acc[v][u] += sum_{kbeg <= k < kend} a(r[v], k) * b(k, c[u]); kbeg a multiple of 16 past which the
// strip's k range starts (the sub-chunk forms), k >= kend read as 0. All lanes of the warp call it.
template <bool kSplitA, bool kSplitB, class FA, class FB>
__device__ __forceinline__ void mm_acc_range(float (&acc)[2][8], const TcTile& tl, int kbeg,
                                             int kend, FA&& a, FB&& b) {
  const int q2 = (threadIdx.x & 3) * 2;
  // Operands in shared memory as bf16 (inputs, staged states) give their pairs directly.
  auto a_pair = [&](int v, int k, uint32_t& hi, uint32_t& lo) {
    if constexpr (kIsBf16Mat<FA>) {
      static_assert(!kSplitA, "a bf16 input operand is exact: no split product");
      hi = bf16_pair<true>(a, tl.r[v], k, k, kend);
    } else if constexpr (kIsSplitMat<FA>) {
      static_assert(kSplitA, "a split operand needs the split product");
      hi = bf16_pair<true>(a.hi, tl.r[v], k, k, kend);
      lo = bf16_pair<true>(a.lo, tl.r[v], k, k, kend);
    } else {
      to_bf16x2<kSplitA>(k < kend ? a(tl.r[v], k) : 0.f, k + 1 < kend ? a(tl.r[v], k + 1) : 0.f,
                         hi, lo);
    }
  };
  auto b_pair = [&](int c, int k, uint32_t& hi, uint32_t& lo) {
    if constexpr (kIsBf16Mat<FB>) {
      static_assert(!kSplitB, "a bf16 input operand is exact: no split product");
      hi = bf16_pair<false>(b, k, c, k, kend);
    } else if constexpr (kIsSplitMat<FB>) {
      static_assert(kSplitB, "a split operand needs the split product");
      hi = bf16_pair<false>(b.hi, k, c, k, kend);
      lo = bf16_pair<false>(b.lo, k, c, k, kend);
    } else {
      to_bf16x2<kSplitB>(k < kend ? b(k, c) : 0.f, k + 1 < kend ? b(k + 1, c) : 0.f, hi, lo);
    }
  };
  for (int k0 = kbeg; k0 < kend; k0 += 16) {
    uint32_t ah[4], al[4];
    a_pair(0, k0 + q2, ah[0], al[0]);
    a_pair(1, k0 + q2, ah[1], al[1]);
    a_pair(0, k0 + q2 + 8, ah[2], al[2]);
    a_pair(1, k0 + q2 + 8, ah[3], al[3]);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      if (n >= tl.nt) break;
      uint32_t bh0, bl0, bh1, bl1;
      b_pair(tl.bc[n], k0 + q2, bh0, bl0);
      b_pair(tl.bc[n], k0 + q2 + 8, bh1, bl1);
      float d[4] = {acc[0][2 * n], acc[0][2 * n + 1], acc[1][2 * n], acc[1][2 * n + 1]};
      mma16816(d, ah, bh0, bh1);
      if constexpr (kSplitB) mma16816(d, ah, bl0, bl1);
      if constexpr (kSplitA) mma16816(d, al, bh0, bh1);
      acc[0][2 * n] = d[0];
      acc[0][2 * n + 1] = d[1];
      acc[1][2 * n] = d[2];
      acc[1][2 * n + 1] = d[3];
    }
  }
}
template <bool kSplitA = false, bool kSplitB = false, class FA, class FB>
__device__ __forceinline__ void mm_acc(float (&acc)[2][8], const TcTile& tl, int K, FA&& a,
                                       FB&& b) {
  mm_acc_range<kSplitA, kSplitB>(acc, tl, 0, K, a, b);
}

// ---- chunk loading -------------------------------------------------------------------------------------
// dst[i][c] (row stride ld) = x[b, t0 + i - shift, h, c] for c < X, i < C; 0 where the source row
// is before 0 or the row t0 + i is at or past T.   x [B, T, H, X]
// Rows are read in 16-byte packs where X and x allow it (each thread issues one load per pack
// instead of one per element: the loads were a large share of the chunk kernels' instructions).
template <typename Td, typename Tx>
__device__ __forceinline__ void load_rows(Td* dst, int ld, const Tx* __restrict__ x, int b, int h,
                                          int T, int H, int X, int t0, int shift, int C) {
  constexpr int kV = kVec16<Tx>;
  const bool packed = X % kV == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  const int per_row = packed ? X / kV : X, width = packed ? kV : 1;
  for (int e = threadIdx.x; e < C * per_row; e += blockDim.x) {
    const int i = e / per_row, c = (e - i * per_row) * width, t = t0 + i, src = t - shift;
    const bool inside = t < T && src >= 0;
    const Tx* row = x + ((int64_t(b) * T + src) * H + h) * X + c;
    Td* out = dst + i * ld + c;
    if (packed) {
      Pack<Tx, kV> v{};
      if (inside) v = load_pack<Tx, kV>(row);
#pragma unroll
      for (int u = 0; u < kV; ++u) out[u] = from_f32<Td>(to_f32(v.v[u]));
    } else {
      out[0] = from_f32<Td>(inside ? to_f32(row[0]) : 0.f);
    }
  }
}
// Per-(b,h) f32 rows [Tp][M] of a scratch array into sdst [C][ld].
__device__ __forceinline__ void load_scratch_rows(float* sdst, int ld, const float* __restrict__ src,
                                                  int C, int M) {
  if (M % 4 == 0) {  // scratch arrays are allocation-aligned and M % 4 == 0 keeps rows 16-byte aligned
    const int per_row = M / 4;
    for (int e = threadIdx.x; e < C * per_row; e += blockDim.x) {
      const int i = e / per_row, s = (e - i * per_row) * 4;
      const Pack<float, 4> v = load_pack<float, 4>(src + int64_t(i) * M + s);
#pragma unroll
      for (int u = 0; u < 4; ++u) sdst[i * ld + s + u] = v.v[u];
    }
    return;
  }
  for (int e = threadIdx.x; e < C * M; e += blockDim.x) {
    const int i = e / M, s = e - i * M;
    sdst[i * ld + s] = src[int64_t(i) * M + s];
  }
}
// x [C][ld]: each column c < M becomes its inclusive scan over the rows times `mult`, forward
// (x_i = sum_{j <= i}) or reverse (x_i = sum_{j >= i}). One warp per column, 32 rows per step with
// a shuffle scan (a thread per column walking 64 rows was one long dependent chain per kernel).
__device__ __forceinline__ void column_scan(float* x, int ld, int C, int M, float mult,
                                            bool reverse) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int c = warp; c < M; c += nwarps) {
    float carry = 0.f;
    for (int r0 = 0; r0 < C; r0 += 32) {
      const int i = reverse ? C - 1 - (r0 + lane) : r0 + lane;
      const bool in = r0 + lane < C;
      float v = in ? x[i * ld + c] * mult : 0.f;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
      }
      v += carry;
      if (in) x[i * ld + c] = v;
      carry = __shfl_sync(0xffffffffu, v, 31);
    }
  }
}
// sB [C][ld] holds G' on entry: becomes B_i = log2(e) * inclusive cumsum over rows, per column.
__device__ __forceinline__ void gate_cumsum(float* sB, int ld, int C, int M) {
  column_scan(sB, ld, C, M, kLog2e, false);
}

// The lower-triangle pair (i, j <= i) of linear index p = i (i + 1) / 2 + j.
__device__ __forceinline__ void tri_pair(int p, int& i, int& j) {
  int r = int((sqrtf(8.f * float(p) + 1.f) - 1.f) * 0.5f);
  while (r * (r + 1) / 2 > p) --r;
  while ((r + 1) * (r + 2) / 2 <= p) ++r;
  i = r;
  j = p - r * (r + 1) / 2;
}
// ---- sub-chunks (tensor-core path) ----------------------------------------------------------------
// The chunk is cut into 16-row sub-chunks, the warp strips. For rows i, j of sub-chunks I >= J a
// decay product factors through a reference row r of the strip:
//   D_ij = 2^{B_i - B_j} = 2^{B_i - B_r} 2^{B_r - B_j}
// so an exp-weighted sum over j (or i, or s) is one tensor-core product of decay-weighted operands.
// For J < I with r = the first row of I both factors are <= 1 for any gates. Inside the strip's own
// sub-chunk one factor is >= 1, bounded by 2^{B_r0 - B_r0+15}, the sub-chunk's decay range: it is
// taken on tensor cores too while that range stays <= kMaxSubchunkDecay (log2 units; 2^64 leaves f32
// and bf16 far from overflow, and any realistic gate stays under it: g = logsigmoid(f)/8 with f ~
// N(-12, 2) loses ~35 per sub-chunk), and directly (one exp2 per term) where a sub-chunk's range
// is larger. `direct` [C/16] holds that flag per sub-chunk.
constexpr float kMaxSubchunkDecay = 64.f;
constexpr size_t kStaticSmem = 64;  // at least the kernels' static shared memory (sub-chunk flags)

// direct[I] = 1 where sub-chunk I's decay range over any slot exceeds kMaxSubchunkDecay.
// sB [C][lm1] holds B. All threads call it; ends with a barrier.
__device__ __forceinline__ void subchunk_flags(int* direct, const float* sB, const Layout& L) {
  if (threadIdx.x < L.C / 16) direct[threadIdx.x] = 0;
  __syncthreads();
  for (int e = threadIdx.x; e < (L.C / 16) * L.M; e += blockDim.x) {
    const int I = e / L.M, s = e - I * L.M;
    if (sB[16 * I * L.lm1 + s] - sB[(16 * I + 15) * L.lm1 + s] > kMaxSubchunkDecay)
      atomicOr(direct + I, 1);
  }
  __syncthreads();
}

// sOut[i][j] = sum_s X_i[s] S'_j[s] D_ij[s] for j <= i, 0 for j > i.   X, S', B [C][lm1]; out [C][lc1]
// (W with X = pm, dA with X = dlm). rowscale (optional, [C]) multiplies row i.
// Tensor-core path: for the strip of i with first row r0, one product over s of X_i 2^{B_i - B_r0}
// and S'_j 2^{B_r0 - B_j} for j < r0 + 16 (j < r0 where the sub-chunk is `direct`, whose own pairs
// then take one exp2 per term).
template <bool kTc>
__device__ __forceinline__ void pair_weights(float* sOut, const float* sX, const float* sS,
                                             const float* sB, const float* rowscale,
                                             const int* direct, const Layout& L) {
  const int C = L.C, M = L.M, lm1 = L.lm1, lc1 = L.lc1;
  if constexpr (kTc) {
    for_tc_tiles(C, C, [&](const TcTile& tl) {
      const int r0 = tl.r0, jend = direct[r0 >> 4] ? r0 : r0 + 16;
      const float* br = sB + r0 * lm1;
      float acc[2][8] = {};
      if (tl.c0 < jend)
        mm_acc_range<true, true>(
            acc, tl, 0, M,
            [&](int i, int s) { return sX[i * lm1 + s] * exp2f(sB[i * lm1 + s] - br[s]); },
            [&](int s, int j) {
              return j < jend ? sS[j * lm1 + s] * exp2f(br[s] - sB[j * lm1 + s]) : 0.f;
            });
#pragma unroll
      for (int v = 0; v < TcTile::kR; ++v)
#pragma unroll
        for (int u = 0; u < TcTile::kC; ++u) {
          const int i = tl.r[v], j = tl.c[u];
          if (!tl.rv[v] || !tl.cv[u] || (j >= jend && j <= i)) continue;  // left to the direct pass
          const float w = j <= i ? acc[v][u] : 0.f;
          sOut[i * lc1 + j] = rowscale ? w * rowscale[i] : w;
        }
    });
    for (int e = threadIdx.x; e < C * 16; e += blockDim.x) {  // the direct sub-chunks' own pairs
      const int i = e >> 4, j = (i & ~15) + (e & 15);
      if (!direct[i >> 4] || j > i) continue;
      float acc = 0.f;
      for (int s = 0; s < M; ++s)
        acc += sX[i * lm1 + s] * sS[j * lm1 + s] * exp2f(sB[i * lm1 + s] - sB[j * lm1 + s]);
      sOut[i * lc1 + j] = rowscale ? acc * rowscale[i] : acc;
    }
  } else {
    for (int p = threadIdx.x; p < C * (C + 1) / 2; p += blockDim.x) {
      int i, j;
      tri_pair(p, i, j);
      const float* xi = sX + i * L.lm1;
      const float* bi = sB + i * L.lm1;
      const float* sj = sS + j * L.lm1;
      const float* bj = sB + j * L.lm1;
      float acc = 0.f;
      for (int s = 0; s < M; ++s) acc += xi[s] * sj[s] * exp2f(bi[s] - bj[s]);
      sOut[i * L.lc1 + j] = rowscale ? acc * rowscale[i] : acc;
    }
    for (int e = threadIdx.x; e < C * C; e += blockDim.x) {
      const int i = e / C, j = e - i * C;
      if (j > i) sOut[i * L.lc1 + j] = 0.f;
    }
  }
}

// dst[i][s] += sum_{j <= i} coef_ij S'_j[s] D_ij[s]   (the in-chunk part of lm with coef = A, of
// dpm with coef = E; coef is 0 above the diagonal).   coef [C][lc1]; S', B, dst [C][lm1].
// Starts after a barrier, ends with one. Tensor-core path: one product over j < r0 + 16 of coef and
// S'_j 2^{B_r0 - B_j}, times 2^{B_i - B_r0} (j < r0 and direct terms for `direct` sub-chunks).
template <bool kTc>
__device__ void add_decayed_rows(float* dst, const float* coef, const float* sS, const float* sB,
                                 const int* direct, const Layout& L) {
  const int C = L.C, M = L.M, lm1 = L.lm1, lc1 = L.lc1;
  if constexpr (kTc) {
    for_tc_tiles(C, M, [&](const TcTile& tl) {
      const int r0 = tl.r0, jend = direct[r0 >> 4] ? r0 : r0 + 16;
      if (jend == 0) return;
      const float* br = sB + r0 * lm1;
      float acc[2][8] = {};
      mm_acc_range<true, true>(
          acc, tl, 0, jend, [&](int i, int j) { return coef[i * lc1 + j]; },
          [&](int j, int s) { return sS[j * lm1 + s] * exp2f(br[s] - sB[j * lm1 + s]); });
#pragma unroll
      for (int v = 0; v < TcTile::kR; ++v)
#pragma unroll
        for (int u = 0; u < TcTile::kC; ++u)
          if (tl.rv[v] && tl.cv[u]) {
            const int i = tl.r[v], s = tl.c[u];
            dst[i * lm1 + s] += acc[v][u] * exp2f(sB[i * lm1 + s] - br[s]);
          }
    });
    __syncthreads();
  }
  for (int e = threadIdx.x; e < C * M; e += blockDim.x) {
    const int i = e / M, s = e - i * M;
    if (kTc && !direct[i >> 4]) continue;  // tensor-core path: only the direct sub-chunks
    const float bi = sB[i * lm1 + s];
    float acc = dst[i * lm1 + s];
    for (int j = kTc ? (i & ~15) : 0; j <= i; ++j)
      acc += coef[i * lc1 + j] * sS[j * lm1 + s] * exp2f(bi - sB[j * lm1 + s]);
    dst[i * lm1 + s] = acc;
  }
  __syncthreads();
}

// Memory-branch logits and softmax of one chunk (shared by the forward and the backward):
//   sA [C][lc1] = A = scale Q K'^T (j <= i; 0 above the diagonal)
//   sP [C][lm1] = pm = softmax_s(lm),  lm_i = scale (q_i Hk) ⊙ 2^{B_i} + sum_{j<=i} A_ij S'_j ⊙ D_ij
//   sLM (optional) = lm;  sLse [C] = logsumexp_s(lm_i)
// Inputs: sQ, sK [C][ldt]; sS, sB [C][lm1]; Hk [D][M] (state_operand: the state at the chunk start).
// Starts with the block's inputs loaded (after a barrier) and ends with a barrier.
template <bool kTc, typename Tv, class HkOp>
__device__ void memory_logits(const NhaParams& p, const Layout& L, const Tv* sQ, const Tv* sK,
                              const float* sS, const float* sB, float* sP, float* sA, float* sLM,
                              float* sLse, const int* direct, const HkOp& Hk) {
  const int C = L.C, D = L.D, M = L.M, ldt = L.ldt, lm1 = L.lm1, lc1 = L.lc1;
  const float scale = p.scale;
  for_tiles_of<kTc>(C, C, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;
    float acc[TL::kR][TL::kC] = {};
    mm_acc(acc, tl, D, SmemMat<Tv>{sQ, ldt, 1},
           SmemMat<Tv>{sK, 1, ldt});
#pragma unroll
    for (int v = 0; v < TL::kR; ++v)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[v] && tl.cv[u]) {
          const int i = tl.r[v], j = tl.c[u];
          sA[i * lc1 + j] = j <= i ? scale * acc[v][u] : 0.f;
        }
  });
  for_tiles_of<kTc>(C, M, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;
    float acc[TL::kR][TL::kC] = {};
    mm_acc<false, true>(acc, tl, D, SmemMat<Tv>{sQ, ldt, 1},
           Hk);
#pragma unroll
    for (int v = 0; v < TL::kR; ++v)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[v] && tl.cv[u]) {
          const int i = tl.r[v], s = tl.c[u];
          sP[i * lm1 + s] = scale * acc[v][u] * exp2f(sB[i * lm1 + s]);
        }
  });
  __syncthreads();
  add_decayed_rows<kTc>(sP, sA, sS, sB, direct, L);  // + the in-chunk part
  // softmax over the slots, one warp per row
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int i = warp; i < C; i += nwarps) {
    float* row = sP + i * lm1;
    float mx = -INFINITY;
    for (int s = lane; s < M; s += 32) mx = fmaxf(mx, row[s]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int s = lane; s < M; s += 32) sum += expf(row[s] - mx);
    sum = warp_sum(sum);
    const float inv = 1.f / sum;
    for (int s = lane; s < M; s += 32) {
      const float x = row[s];
      if (sLM) sLM[i * lm1 + s] = x;
      row[s] = expf(x - mx) * inv;
    }
    if (lane == 0) sLse[i] = mx + logf(sum);
  }
  __syncthreads();
}

// ==== (1) chunk state contributions ===================================================================
// states[bh][n] = (K'^T S~ [D][M], S~^T V' [M][D]);  bl[bh][n] = b.   Grid (N, B*H).
template <typename Tv, typename Ts, bool kTc>
__global__ void __launch_bounds__(kThreads<kTc>)
    nha_contrib_kernel(const NhaParams p, const Tv* __restrict__ k, const Tv* __restrict__ v,
                       const Ts* __restrict__ s, const Ts* __restrict__ g) {
  const int n = blockIdx.x, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Layout L(p.C, p.D, p.M, sizeof(Tv), kTc);
  const int C = p.C, D = p.D, M = p.M, t0 = n * C;
  extern __shared__ __align__(16) unsigned char smem[];
  Tv* sK = reinterpret_cast<Tv*>(smem);                             // [C][ldt] K'
  Tv* sV = reinterpret_cast<Tv*>(smem + L.tb);                      // [C][ldt] V'
  float* sS = reinterpret_cast<float*>(smem + 2 * L.tb);            // [C][lm1] S', then S~
  float* sB = reinterpret_cast<float*>(smem + 2 * L.tb + L.mb);     // [C][lm1] G', then B
  load_rows(sK, L.ldt, k, b, h, p.T, p.H, D, t0, p.w, C);
  load_rows(sV, L.ldt, v, b, h, p.T, p.H, D, t0, p.w, C);
  load_rows(sS, L.lm1, s, b, h, p.T, p.H, M, t0, p.w, C);
  load_rows(sB, L.lm1, g, b, h, p.T, p.H, M, t0, p.w, C);
  __syncthreads();
  gate_cumsum(sB, L.lm1, C, M);
  __syncthreads();
  const float* blast = sB + (C - 1) * L.lm1;
  for (int e = threadIdx.x; e < C * M; e += blockDim.x) {
    const int i = e / M, c = e - i * M;
    sS[i * L.lm1 + c] *= exp2f(blast[c] - sB[i * L.lm1 + c]);
  }
  for (int c = threadIdx.x; c < M; c += blockDim.x)
    p.bl[(int64_t(bh) * p.N + n) * M + c] = blast[c];
  __syncthreads();
  float* dst = p.states + (int64_t(bh) * p.N + n) * p.E;
  const int ldt = L.ldt, lm1 = L.lm1;
  for_tiles_of<kTc>(D, M, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // K'^T S~
    float acc[TL::kR][TL::kC] = {};
    mm_acc<false, true>(acc, tl, C, SmemMat<Tv>{sK, 1, ldt},
           [&](int j, int c) { return sS[j * lm1 + c]; });
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) dst[tl.r[vv] * M + tl.c[u]] = acc[vv][u];
  });
  for_tiles_of<kTc>(M, D, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // S~^T V'
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, false>(acc, tl, C, [&](int c, int j) { return sS[j * lm1 + c]; },
           SmemMat<Tv>{sV, ldt, 1});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) dst[D * M + tl.r[vv] * D + tl.c[u]] = acc[vv][u];
  });
}

// ==== (2) scan over chunks ===========================================================================
// buf [BH][N][E] holds per-chunk contributions X_n; afterwards slot n holds the exclusive scan
//   forward:  H_0 = 0,  H_{n+1} = H_n ⊙ 2^{b_n} + X_n       (states at the chunk starts)
//   reverse:  G_{N-1} = 0,  G_{n-1} = G_n ⊙ 2^{b_n} + X_n   (gradients carried into chunk n)
// The decay of element e: with_decay = 1: Hk part (e < D M) column e % M, Hv part row (e - DM) / D;
// with_decay = 0: none. One thread per (element, b*h); 8 chunks are loaded ahead.
__global__ void __launch_bounds__(256)
    nha_scan_kernel(float* __restrict__ buf, const float* __restrict__ bl, int N, int E, int D,
                    int M, int with_decay, int reverse) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x, bh = blockIdx.y;
  if (e >= E) return;
  const int c = with_decay ? (e < D * M ? e % M : (e - D * M) / D) : 0;
  float* x = buf + int64_t(bh) * N * E + e;
  const float* f = bl + int64_t(bh) * N * M + c;
  float hcur = 0.f;
  for (int it = 0; it < N; it += 8) {
    float xv[8], fv[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int idx = it + u, n = reverse ? N - 1 - idx : idx;
      xv[u] = idx < N ? x[int64_t(n) * E] : 0.f;
      fv[u] = (idx < N && with_decay) ? exp2f(f[int64_t(n) * M]) : 1.f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int idx = it + u, n = reverse ? N - 1 - idx : idx;
      if (idx < N) {
        x[int64_t(n) * E] = hcur;
        hcur = hcur * fv[u] + xv[u];
      }
    }
  }
}

// ==== (3) forward outputs and the merge ================================================================
// out, lse: on entry (o_w, lse_w) of the window branch when p.has_window; on exit the merged
// output and lse (out [B, T, H, D], lse [B, H, T] f32). Grid (N, B*H).
template <typename Tv, typename Ts, bool kTc>
__global__ void __launch_bounds__(kThreads<kTc>)
    nha_forward_kernel(const NhaParams p, Tv* __restrict__ out, float* __restrict__ lse,
                       const Tv* __restrict__ q, const Tv* __restrict__ k,
                       const Tv* __restrict__ v, const Ts* __restrict__ s,
                       const Ts* __restrict__ g) {
  const int n = blockIdx.x, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Layout L(p.C, p.D, p.M, sizeof(Tv), kTc);
  const int C = p.C, D = p.D, M = p.M, T = p.T, t0 = n * C;
  const int ldt = L.ldt, lm1 = L.lm1, lc1 = L.lc1;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* ptr = smem;
  Tv* sQ = reinterpret_cast<Tv*>(ptr);     ptr += L.tb;  // [C][ldt] q
  Tv* sKV = reinterpret_cast<Tv*>(ptr);    ptr += L.tb;  // [C][ldt] K', then V'
  float* sS = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] S'
  float* sB = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] B
  float* sP = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] lm -> pm -> pm 2^B
  float* sA = reinterpret_cast<float*>(ptr);  ptr += L.cb;  // [C][lc1] A, then W
  float* sLse = reinterpret_cast<float*>(ptr); ptr += L.rb;  // [C] lse_m
  float* sWw = reinterpret_cast<float*>(ptr);  ptr += L.rb;  // [C] weight of o_w
  float* sWm = reinterpret_cast<float*>(ptr);                // [C] weight of o_m
  bf16_t* sSt = reinterpret_cast<bf16_t*>(smem + L.forward_bytes() - L.sb);  // staged state (tc)
  load_rows(sQ, ldt, q, b, h, T, p.H, D, t0, 0, C);
  load_rows(sKV, ldt, k, b, h, T, p.H, D, t0, p.w, C);
  load_rows(sS, lm1, s, b, h, T, p.H, M, t0, p.w, C);
  load_rows(sB, lm1, g, b, h, T, p.H, M, t0, p.w, C);
  __syncthreads();
  gate_cumsum(sB, lm1, C, M);
  __syncthreads();
  __shared__ int sDirect[kMaxChunk / 16];  // sub-chunks summed directly (tensor-core path)
  if constexpr (kTc) subchunk_flags(sDirect, sB, L);
  const float* Hk = p.states + (int64_t(bh) * p.N + n) * p.E;
  const float* Hv = Hk + D * M;
  memory_logits<kTc>(p, L, sQ, sKV, sS, sB, sP, sA, nullptr, sLse, sDirect,
                    state_operand<kTc>(sSt, L.st_elems, Hk, D, M));
  load_rows(sKV, ldt, v, b, h, T, p.H, D, t0, p.w, C);
  pair_weights<kTc>(sA, sP, sS, sB, nullptr, sDirect, L);
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const int t = t0 + i;
    float ww = 0.f, wm = 1.f;
    if (t < T) {
      const float lm = sLse[i];
      float tot = lm;
      if (p.has_window) {
        const float lw = lse[int64_t(bh) * T + t];
        const float mx = fmaxf(lw, lm);
        tot = mx + log1pf(expf(-fabsf(lw - lm)));
        ww = expf(lw - tot);
        wm = expf(lm - tot);
      }
      lse[int64_t(bh) * T + t] = tot;
    }
    sWw[i] = ww;
    sWm[i] = wm;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < C * M; e += blockDim.x) {
    const int i = e / M, c = e - i * M;
    sP[i * lm1 + c] *= exp2f(sB[i * lm1 + c]);
  }
  __syncthreads();
  const auto hv = state_operand<kTc>(sSt, L.st_elems, Hv, M, D);
  for_tiles_of<kTc>(C, D, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // o_m = (pm 2^B) Hv + W V'
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, true>(acc, tl, M, [&](int i, int c) { return sP[i * lm1 + c]; }, hv);
    mm_acc<true, false>(acc, tl, C, [&](int i, int j) { return sA[i * lc1 + j]; },
           SmemMat<Tv>{sKV, ldt, 1});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv) {
      const int i = tl.r[vv], t = t0 + i;
      if (!tl.rv[vv] || t >= T) continue;
      Tv* orow = out + ((int64_t(b) * T + t) * p.H + h) * D;
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.cv[u]) {
          const int d = tl.c[u];
          float o = sWm[i] * acc[vv][u];
          if (p.has_window) o += sWw[i] * to_f32(orow[d]);
          orow[d] = from_f32<Tv>(o);
        }
    }
  });
}

// ==== (4) backward: dpm, dlm, gate terms, chunk contributions to the carried state gradients =======
// Writes pm, dlm, xp = dpm pm + dlm lm, r (rows of chunk n) and
// dstates[bh][n] = (scale q^T (dlm 2^B) [D][M], (r pm 2^B)^T dO [M][D]). Grid (N, B*H).
template <typename Tv, typename Ts, bool kTc>
__global__ void __launch_bounds__(kThreads<kTc>)
    nha_dlogits_kernel(const NhaParams p, const Tv* __restrict__ dout,
                       const Tv* __restrict__ out, const float* __restrict__ lse,
                       const Tv* __restrict__ q, const Tv* __restrict__ k,
                       const Tv* __restrict__ v, const Ts* __restrict__ s,
                       const Ts* __restrict__ g) {
  const int n = blockIdx.x, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Layout L(p.C, p.D, p.M, sizeof(Tv), kTc);
  const int C = p.C, D = p.D, M = p.M, T = p.T, t0 = n * C;
  const int ldt = L.ldt, lm1 = L.lm1, lc1 = L.lc1;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* ptr = smem;
  Tv* sQ = reinterpret_cast<Tv*>(ptr);     ptr += L.tb;  // [C][ldt] q
  Tv* sKV = reinterpret_cast<Tv*>(ptr);    ptr += L.tb;  // [C][ldt] K', then V'
  Tv* sdO = reinterpret_cast<Tv*>(ptr);    ptr += L.tb;  // [C][ldt] dO (unscaled)
  float* sS = reinterpret_cast<float*>(ptr);   ptr += L.mb;  // [C][lm1] S'
  float* sB = reinterpret_cast<float*>(ptr);   ptr += L.mb;  // [C][lm1] B
  float* sP = reinterpret_cast<float*>(ptr);   ptr += L.mb;  // [C][lm1] pm, then r pm 2^B
  float* sLM = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] lm
  float* sDP = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] dpm, then dlm 2^B
  float* sA = reinterpret_cast<float*>(ptr);   ptr += L.cb;  // [C][lc1] A, then E
  float* sLse = reinterpret_cast<float*>(ptr); ptr += L.rb;  // [C] lse_m
  float* sR = reinterpret_cast<float*>(ptr);   ptr += L.rb;  // [C] r
  float* sCc = reinterpret_cast<float*>(ptr);               // [C] r dO.o
  bf16_t* sSt = reinterpret_cast<bf16_t*>(smem + L.dlogits_bytes() - L.sb);  // staged state (tc)
  load_rows(sQ, ldt, q, b, h, T, p.H, D, t0, 0, C);
  load_rows(sKV, ldt, k, b, h, T, p.H, D, t0, p.w, C);
  load_rows(sdO, ldt, dout, b, h, T, p.H, D, t0, 0, C);
  load_rows(sS, lm1, s, b, h, T, p.H, M, t0, p.w, C);
  load_rows(sB, lm1, g, b, h, T, p.H, M, t0, p.w, C);
  __syncthreads();
  gate_cumsum(sB, lm1, C, M);
  __syncthreads();
  __shared__ int sDirect[kMaxChunk / 16];  // sub-chunks summed directly (tensor-core path)
  if constexpr (kTc) subchunk_flags(sDirect, sB, L);
  const float* Hk = p.states + (int64_t(bh) * p.N + n) * p.E;
  const float* Hv = Hk + D * M;
  memory_logits<kTc>(p, L, sQ, sKV, sS, sB, sP, sA, sLM, sLse, sDirect,
                    state_operand<kTc>(sSt, L.st_elems, Hk, D, M));
  load_rows(sKV, ldt, v, b, h, T, p.H, D, t0, p.w, C);
  {  // r_i = e^{lse_m - lse}, c_i = r_i dO_i . o_i (= <p_i, dp_i>); one warp per row
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int i = warp; i < C; i += nwarps) {
      const int t = t0 + i;
      float r = 0.f, dot = 0.f;
      if (t < T) {
        const int64_t row = ((int64_t(b) * T + t) * p.H + h) * D;
        for (int d = lane; d < D; d += 32) dot += to_f32(dout[row + d]) * to_f32(out[row + d]);
        r = expf(sLse[i] - lse[int64_t(bh) * T + t]);
      }
      dot = warp_sum(dot);
      if (lane == 0) {
        sR[i] = r;
        sCc[i] = r * dot;
        p.r[int64_t(bh) * p.Tp + t0 + i] = r;
      }
    }
  }
  __syncthreads();
  for_tiles_of<kTc>(C, C, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // E = r_i dO_i . V'_j  (j <= i)
    float acc[TL::kR][TL::kC] = {};
    mm_acc(acc, tl, D, SmemMat<Tv>{sdO, ldt, 1},
           SmemMat<Tv>{sKV, 1, ldt});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) {
          const int i = tl.r[vv], j = tl.c[u];
          sA[i * lc1 + j] = j <= i ? sR[i] * acc[vv][u] : 0.f;
        }
  });
  const auto hv = state_operand<kTc>(sSt, L.st_elems, Hv, M, D);
  for_tiles_of<kTc>(M, C, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // dpm inter, transposed: [s][i] = Hv_s . dO_i
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, false>(acc, tl, D, hv, SmemMat<Tv>{sdO, 1, ldt});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) {
          const int c = tl.r[vv], i = tl.c[u];
          sDP[i * lm1 + c] = sR[i] * acc[vv][u] * exp2f(sB[i * lm1 + c]);
        }
  });
  __syncthreads();
  add_decayed_rows<kTc>(sDP, sA, sS, sB, sDirect, L);  // dpm: + the in-chunk part
  if (!p.has_window) {
    // No window: the joint softmax is the memory softmax (r = 1), so <p, dp> = sum_s pm dpm
    // exactly. Taking it from dO . out instead brings in out's rounding to bf16, which the two
    // cancellations behind dq and dk (see "Precision") amplify: with strong decay that alone
    // made dq and dk 0.1 relative RMS off on the bf16 path, with any kernel arithmetic.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int i = warp; i < C; i += nwarps) {
      float dot = 0.f;
      for (int c = lane; c < M; c += 32) dot += sP[i * lm1 + c] * sDP[i * lm1 + c];
      dot = warp_sum(dot);
      if (lane == 0) sCc[i] = dot;
    }
    __syncthreads();
  }
  const int64_t rowbase = int64_t(bh) * p.Tp + t0;
  for (int e = threadIdx.x; e < C * M; e += blockDim.x) {
    const int i = e / M, c = e - i * M;
    const float bi = sB[i * lm1 + c];
    const float dpm = sDP[i * lm1 + c];
    const float pm = sP[i * lm1 + c];
    const float dlm = pm * (dpm - sCc[i]);
    const int64_t o = (rowbase + i) * M + c;
    p.pm[o] = pm;
    p.dlm[o] = dlm;
    p.xp[o] = dpm * pm + dlm * sLM[i * lm1 + c];
    const float eb = exp2f(bi);
    sDP[i * lm1 + c] = dlm * eb;
    sP[i * lm1 + c] = pm * sR[i] * eb;
  }
  __syncthreads();
  float* dst = p.dstates + (int64_t(bh) * p.N + n) * p.E;
  for_tiles_of<kTc>(M, D, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // (r pm 2^B)^T dO
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, false>(acc, tl, C, [&](int c, int i) { return sP[i * lm1 + c]; },
           SmemMat<Tv>{sdO, ldt, 1});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) dst[D * M + tl.r[vv] * D + tl.c[u]] = acc[vv][u];
  });
  for_tiles_of<kTc>(D, M, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // scale q^T (dlm 2^B)
    float acc[TL::kR][TL::kC] = {};
    mm_acc<false, true>(acc, tl, C, SmemMat<Tv>{sQ, 1, ldt},
           [&](int i, int c) { return sDP[i * lm1 + c]; });
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) dst[tl.r[vv] * M + tl.c[u]] = p.scale * acc[vv][u];
  });
}

// ==== (6) backward: dq, dk, dv (+=), ds, and the gate terms' in-chunk reverse cumsum ===============
// dq [B,T,H,D] rows of chunk n; dk, dv, ds rows t - w (t >= w); xp rows of chunk n become the
// in-chunk reverse cumsum of X = xp - S' ⊙ dS'; xtot[bh][n] = its row-0 value. Grid (N, B*H).
template <typename Tv, typename Ts, bool kTc>
__global__ void __launch_bounds__(kThreads<kTc>)
    nha_grads_kernel(const NhaParams p, Tv* __restrict__ dq, Tv* __restrict__ dk,
                     Tv* __restrict__ dv, Ts* __restrict__ ds, const Tv* __restrict__ dout,
                     const Tv* __restrict__ q, const Tv* __restrict__ k,
                     const Tv* __restrict__ v, const Ts* __restrict__ s,
                     const Ts* __restrict__ g) {
  const int n = blockIdx.x, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Layout L(p.C, p.D, p.M, sizeof(Tv), kTc);
  const int C = p.C, D = p.D, M = p.M, T = p.T, H = p.H, w = p.w, t0 = n * C;
  const int ldt = L.ldt, lm1 = L.lm1, lc1 = L.lc1;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* ptr = smem;
  Tv* sQ = reinterpret_cast<Tv*>(ptr);    ptr += L.tb;  // [C][ldt] q
  Tv* sK = reinterpret_cast<Tv*>(ptr);    ptr += L.tb;  // [C][ldt] K'
  Tv* sV = reinterpret_cast<Tv*>(ptr);    ptr += L.tb;  // [C][ldt] V'   } later one f32
  Tv* sdO = reinterpret_cast<Tv*>(ptr);   ptr += L.tb;  // [C][ldt] dO   } scratch [C][D+1]
  float* sS = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] S', then S~
  float* sB = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] B
  float* sP = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] pm
  float* sDL = reinterpret_cast<float*>(ptr); ptr += L.mb;  // [C][lm1] dlm, then dlm 2^B
  float* sX = reinterpret_cast<float*>(ptr);  ptr += L.mb;  // [C][lm1] state terms, then X
  float* sA = reinterpret_cast<float*>(ptr);  ptr += L.cb;  // [C][lc1] A, then dA
  float* sE = reinterpret_cast<float*>(ptr);  ptr += L.cb;  // [C][lc1] E, then r_i W
  float* sR = reinterpret_cast<float*>(ptr);                // [C] r
  bf16_t* sSt = reinterpret_cast<bf16_t*>(smem + L.grads_bytes() - L.sb);  // staged state (tc)
  float* scr = reinterpret_cast<float*>(sV);                // [C][D+1] f32 (after dV')
  const int lds = D + 1;
  load_rows(sQ, ldt, q, b, h, T, H, D, t0, 0, C);
  load_rows(sK, ldt, k, b, h, T, H, D, t0, w, C);
  load_rows(sV, ldt, v, b, h, T, H, D, t0, w, C);
  load_rows(sdO, ldt, dout, b, h, T, H, D, t0, 0, C);
  load_rows(sS, lm1, s, b, h, T, H, M, t0, w, C);
  load_rows(sB, lm1, g, b, h, T, H, M, t0, w, C);
  const int64_t rowbase = int64_t(bh) * p.Tp + t0;
  load_scratch_rows(sP, lm1, p.pm + rowbase * M, C, M);
  load_scratch_rows(sDL, lm1, p.dlm + rowbase * M, C, M);
  for (int i = threadIdx.x; i < C; i += blockDim.x) sR[i] = p.r[rowbase + i];
  __syncthreads();
  gate_cumsum(sB, lm1, C, M);
  __syncthreads();
  __shared__ int sDirect[kMaxChunk / 16];  // sub-chunks summed directly (tensor-core path)
  if constexpr (kTc) subchunk_flags(sDirect, sB, L);
  const float* Hk = p.states + (int64_t(bh) * p.N + n) * p.E;
  const float* dHk = p.dstates + (int64_t(bh) * p.N + n) * p.E;
  const float* dHv = dHk + D * M;
  const float scale = p.scale;
  for_tiles_of<kTc>(C, C, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // A = scale q_i . K'_j, E = r_i dO_i . V'_j (j <= i)
    float acc[TL::kR][TL::kC] = {}, acc2[TL::kR][TL::kC] = {};
    mm_acc(acc, tl, D, SmemMat<Tv>{sQ, ldt, 1},
           SmemMat<Tv>{sK, 1, ldt});
    mm_acc(acc2, tl, D, SmemMat<Tv>{sdO, ldt, 1},
           SmemMat<Tv>{sV, 1, ldt});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) {
          const int i = tl.r[vv], j = tl.c[u];
          sA[i * lc1 + j] = j <= i ? scale * acc[vv][u] : 0.f;
          sE[i * lc1 + j] = j <= i ? sR[i] * acc2[vv][u] : 0.f;
        }
  });
  const auto dhk = state_operand<kTc>(sSt, L.st_elems, dHk, D, M);
  for_tiles_of<kTc>(C, M, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // state terms, part 1: K' dHk
    float acc[TL::kR][TL::kC] = {};
    mm_acc<false, true>(acc, tl, D, SmemMat<Tv>{sK, ldt, 1},
           dhk);
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) sX[tl.r[vv] * lm1 + tl.c[u]] = acc[vv][u];
  });
  __syncthreads();
  const auto dhv = state_operand<kTc>(sSt, L.st_elems, dHv, M, D);
  for_tiles_of<kTc>(M, C, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // part 2, transposed: [s][j] += dHv_s . V'_j
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, false>(acc, tl, D, dhv, SmemMat<Tv>{sV, 1, ldt});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) sX[tl.c[u] * lm1 + tl.r[vv]] += acc[vv][u];
  });
  __syncthreads();
  // dS'_j = sum_{i>=j} (A_ij dlm_i + E_ij pm_i) ⊙ D_ij + 2^{b - B_j} ⊙ (state terms)
  const float* blast = sB + (C - 1) * lm1;
  if constexpr (kTc) {
    // Tensor-core path (see "sub-chunks"): rows i of j's sub-chunk and later ones through the
    // reference row r1 = the last row of j's sub-chunk, D_ij = 2^{B_i - B_r1} 2^{B_r1 - B_j} (A and
    // E are 0 for i < j), folded into sX together with the decayed state terms; a `direct`
    // sub-chunk's own rows take one exp2 per term below.
    for_tc_tiles(C, M, [&](const TcTile& tl) {
      const float* br = sB + (tl.r0 + 15) * lm1;
      const int ibeg = sDirect[tl.r0 >> 4] ? tl.r0 + 16 : tl.r0;
      auto later = [&](const float* x) {
        return [=](int i, int c) { return x[i * lm1 + c] * exp2f(sB[i * lm1 + c] - br[c]); };
      };
      float acc[2][8] = {};
      mm_acc_range<true, true>(acc, tl, ibeg, C, [&](int j, int i) { return sA[i * lc1 + j]; },
                               later(sDL));
      mm_acc_range<true, true>(acc, tl, ibeg, C, [&](int j, int i) { return sE[i * lc1 + j]; },
                               later(sP));
#pragma unroll
      for (int v = 0; v < TcTile::kR; ++v)
#pragma unroll
        for (int u = 0; u < TcTile::kC; ++u)
          if (tl.rv[v] && tl.cv[u]) {
            const int j = tl.r[v], c = tl.c[u];
            const float bj = sB[j * lm1 + c];
            sX[j * lm1 + c] = exp2f(blast[c] - bj) * sX[j * lm1 + c] + acc[v][u] * exp2f(br[c] - bj);
          }
    });
    __syncthreads();
  }
  for (int e = threadIdx.x; e < C * M; e += blockDim.x) {
    const int j = e / M, c = e - j * M, t = t0 + j;
    const float bj = sB[j * lm1 + c];
    float acc = 0.f;
    // f32: every i >= j; tensor-core path: i in j's sub-chunk where it is direct, else none
    const int ilast = !kTc ? C - 1 : sDirect[j >> 4] ? (j | 15) : j - 1;
    for (int i = j; i <= ilast; ++i)
      acc += (sA[i * lc1 + j] * sDL[i * lm1 + c] + sE[i * lc1 + j] * sP[i * lm1 + c]) *
             exp2f(sB[i * lm1 + c] - bj);
    const float dS = kTc ? acc + sX[j * lm1 + c] : acc + exp2f(blast[c] - bj) * sX[j * lm1 + c];
    if (t >= w && t < T) ds[((int64_t(b) * T + (t - w)) * H + h) * M + c] = from_f32<Ts>(dS);
    sX[j * lm1 + c] = p.xp[(rowbase + j) * M + c] - sS[j * lm1 + c] * dS;
  }
  __syncthreads();
  column_scan(sX, lm1, C, M, 1.f, true);  // in-chunk reverse cumsum of X
  __syncthreads();
  for (int e = threadIdx.x; e < C * M; e += blockDim.x) {
    const int i = e / M, c = e - i * M;
    p.xp[(rowbase + i) * M + c] = sX[i * lm1 + c];
    if (i == 0) p.xtot[(int64_t(bh) * p.N + n) * M + c] = sX[c];
  }
  pair_weights<kTc>(sE, sP, sS, sB, sR, sDirect, L);     // r_i W_ij
  pair_weights<kTc>(sA, sDL, sS, sB, nullptr, sDirect, L);  // dA_ij
  __syncthreads();
  for (int e = threadIdx.x; e < C * M; e += blockDim.x) {
    const int i = e / M, c = e - i * M;
    const float bi = sB[i * lm1 + c];
    sS[i * lm1 + c] *= exp2f(blast[c] - bi);
    sDL[i * lm1 + c] *= exp2f(bi);
  }
  __syncthreads();
  for_tiles_of<kTc>(C, D, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // dV' = (r W)^T dO + S~ dHv;  dv[t - w] +=
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, false>(acc, tl, C, [&](int j, int i) { return sE[i * lc1 + j]; },
           SmemMat<Tv>{sdO, ldt, 1});
    mm_acc<true, true>(acc, tl, M, [&](int j, int c) { return sS[j * lm1 + c]; },
           dhv);
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv) {
      const int t = t0 + tl.r[vv];
      if (!tl.rv[vv] || t < w || t >= T) continue;
      Tv* row = dv + ((int64_t(b) * T + (t - w)) * H + h) * D;
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.cv[u]) row[tl.c[u]] = from_f32<Tv>(to_f32(row[tl.c[u]]) + acc[vv][u]);
    }
  });
  __syncthreads();
  const auto dhk_again = state_operand<kTc>(sSt, L.st_elems, dHk, D, M);
  for_tiles_of<kTc>(D, C, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // scr[j][d] = (S~ dHk^T)[j][d]
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, true>(acc, tl, M, dhk_again,
           [&](int c, int j) { return sS[j * lm1 + c]; });
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) scr[tl.c[u] * lds + tl.r[vv]] = acc[vv][u];
  });
  __syncthreads();
  for_tiles_of<kTc>(C, D, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // dK' = scale dA^T q + scr;  dk[t - w]
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, false>(acc, tl, C, [&](int j, int i) { return sA[i * lc1 + j]; },
           SmemMat<Tv>{sQ, ldt, 1});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv) {
      const int j = tl.r[vv], t = t0 + j;
      if (!tl.rv[vv] || t < w || t >= T) continue;
      Tv* row = dk + ((int64_t(b) * T + (t - w)) * H + h) * D;
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.cv[u]) row[tl.c[u]] = from_f32<Tv>(scale * acc[vv][u] + scr[j * lds + tl.c[u]]);
    }
  });
  __syncthreads();
  const auto hk = state_operand<kTc>(sSt, L.st_elems, Hk, D, M);
  for_tiles_of<kTc>(D, C, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // scr[i][d] = ((dlm 2^B) Hk^T)[i][d]
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, true>(acc, tl, M, hk,
           [&](int c, int i) { return sDL[i * lm1 + c]; });
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv)
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.rv[vv] && tl.cv[u]) scr[tl.c[u] * lds + tl.r[vv]] = acc[vv][u];
  });
  __syncthreads();
  for_tiles_of<kTc>(C, D, [&](const auto& tl) {
    using TL = std::decay_t<decltype(tl)>;  // dq = scale (scr + dA K')
    float acc[TL::kR][TL::kC] = {};
    mm_acc<true, false>(acc, tl, C, [&](int i, int j) { return sA[i * lc1 + j]; },
           SmemMat<Tv>{sK, ldt, 1});
#pragma unroll
    for (int vv = 0; vv < TL::kR; ++vv) {
      const int i = tl.r[vv], t = t0 + i;
      if (!tl.rv[vv] || t >= T) continue;
      Tv* row = dq + ((int64_t(b) * T + t) * H + h) * D;
#pragma unroll
      for (int u = 0; u < TL::kC; ++u)
        if (tl.cv[u]) row[tl.c[u]] = from_f32<Tv>(scale * (acc[vv][u] + scr[i * lds + tl.c[u]]));
    }
  });
}

// ==== (7) dg: carry + in-chunk reverse cumsum, un-shifted =====================================
// dg[b, j, h, s] = xp[bh][j + w][s] + xtot[bh][(j + w) / C][s] for j + w < T, else 0.
template <typename Ts>
__global__ void nha_dg_kernel(const NhaParams p, Ts* __restrict__ dg) {
  const int64_t total = int64_t(p.B) * p.T * p.H * p.M;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(e % p.M);
    int64_t rest = e / p.M;
    const int h = int(rest % p.H);
    rest /= p.H;
    const int j = int(rest % p.T), b = int(rest / p.T);
    const int t = j + p.w;
    float val = 0.f;
    if (t < p.T) {
      const int64_t bh = int64_t(b) * p.H + h;
      val = p.xp[(bh * p.Tp + t) * p.M + c] + p.xtot[(bh * p.N + t / p.C) * p.M + c];
    }
    dg[e] = from_f32<Ts>(val);
  }
}

// ==== gates ===========================================================================================
// g = logsigmoid(f) / 8 = (min(f, 0) - log1p(e^{-|f|})) / 8;  s = 1 - e^g = -expm1(g)
template <typename Tf, typename Tg>
__global__ void nha_gate_forward_kernel(Tg* __restrict__ g, Tg* __restrict__ s,
                                        const Tf* __restrict__ f, int64_t n) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const float x = to_f32(f[e]);
    const float gi = (fminf(x, 0.f) - log1pf(expf(-fabsf(x)))) * 0.125f;
    g[e] = from_f32<Tg>(gi);
    s[e] = from_f32<Tg>(-expm1f(gi));
  }
}
// df = (dg - e^g ds) sigmoid(-f) / 8
template <typename Tf, typename Tg>
__global__ void nha_gate_backward_kernel(Tf* __restrict__ df, const Tg* __restrict__ dg,
                                         const Tg* __restrict__ ds, const Tf* __restrict__ f,
                                         int64_t n) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const float x = to_f32(f[e]);
    const float gi = (fminf(x, 0.f) - log1pf(expf(-fabsf(x)))) * 0.125f;
    const float sig_neg = 1.f / (1.f + expf(x));
    df[e] = from_f32<Tf>((to_f32(dg[e]) - expf(gi) * to_f32(ds[e])) * sig_neg * 0.125f);
  }
}

// ==== host side ========================================================================================
struct NhaDims {
  int B, T, H, D, M;
};

NhaDims check_nha(const char* op, int dev, const Tensor& q, const Tensor& k, const Tensor& qr,
                  const Tensor& kr, const Tensor& v, const Tensor& s, const Tensor& g,
                  const Tensor& lse, int64_t window) {
  NHA_CHECK(q.dim() == 4 && s.dim() == 4)
      << op << ": q must be [B, T, H, D] and s [B, T, H, M], got " << q.str() << ", " << s.str();
  for (const Tensor* t : std::initializer_list<const Tensor*>{&k, &qr, &kr, &v}) check_same_shape(*t, q, op);
  check_same_shape(g, s, op);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &qr, &kr, &v, &s, &g, &lse}) check_cuda_tensor(*t, dev, op, "argument");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&k, &qr, &kr, &v})
    NHA_CHECK(t->dtype() == q.dtype())
        << op << ": q, k, qr, kr, v must share one dtype, got " << q.str() << " and " << t->str();
  NHA_CHECK(q.dtype() == DType::F32 || q.dtype() == DType::BF16)
      << op << " on CUDA needs f32 or bf16 tensors, got " << q.str()
      << ". HINT: f64 is CPU-only; convert with .to(DType::F32)";
  NHA_CHECK(g.dtype() == s.dtype() && (s.dtype() == q.dtype() || s.dtype() == DType::F32))
      << op << ": s and g must share one dtype, q's or f32, got s " << s.str() << ", g " << g.str()
      << " with q " << q.str();
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), M = s.size(3);
  NHA_CHECK(s.size(0) == B && s.size(1) == T && s.size(2) == H)
      << op << ": s " << s.str() << " must share [B, T, H] with q " << q.str();
  NHA_CHECK(lse.shape() == (Shape{B, H, T}))
      << op << ": lse must be [B, H, T] = " << shape_str({B, H, T}) << ", got " << lse.str();
  check_dtype_is(lse, DType::F32, op, "lse");
  NHA_CHECK(window >= 0) << op << ": window must be >= 0, got " << window;
  NHA_CHECK(D % 8 == 0 && D >= 8 && D <= kMaxD)
      << op << ": head dim " << D << " is not supported on CUDA (needs a multiple of 8 in [8, "
      << kMaxD << "])";
  NHA_CHECK(M >= 1 && M <= kMaxM)
      << op << ": " << M << " memory slots are not supported on CUDA (needs 1 <= M <= " << kMaxM
      << ")";
  NHA_CHECK(T < (1LL << 30) && B * H <= 65535)
      << op << ": unsupported shape " << q.str() << " (needs T < 2^30, B*H <= 65535)";
  return {int(B), int(T), int(H), int(D), int(M)};
}

// The chunk size: 64 rows unless the largest chunk kernel's shared memory does not fit, then 32,
// then 16. NHA_CUDA_NHA_CHUNK=16|32|64 forces a smaller one (tests).
int choose_chunk(int dev, int D, int M, int tsize, bool tc) {
  const size_t limit = device_properties(dev).sharedMemPerBlockOptin;
  int forced = 0;
  if (const char* e = std::getenv("NHA_CUDA_NHA_CHUNK")) forced = std::atoi(e);
  for (int C : {kMaxChunk, kMaxChunk / 2, kMaxChunk / 4}) {
    if (forced > 0 && C > forced) continue;
    if (Layout(C, D, M, tsize, tc).max_bytes() + kStaticSmem <= limit) return C;
  }
  NHA_FAIL() << "nha: no chunk size fits shared memory for head dim " << D << " and " << M
             << " slots";
  return 0;
}

template <typename Kernel, typename... Args>
void launch_chunks(Kernel kernel, int threads, const NhaParams& p, size_t smem, cudaStream_t st,
                   Args... args) {
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)));
  kernel<<<dim3(unsigned(p.N), unsigned(p.B * p.H)), threads, smem, st>>>(p, args...);
  CUDA_CHECK_LAUNCH();
}

void launch_scan(float* buf, const float* bl, const NhaParams& p, int E, bool with_decay,
                 bool reverse, cudaStream_t st) {
  nha_scan_kernel<<<dim3(unsigned((E + 255) / 256), unsigned(p.B * p.H)), 256, 0, st>>>(
      buf, bl, p.N, E, p.D, p.M, with_decay ? 1 : 0, reverse ? 1 : 0);
  CUDA_CHECK_LAUNCH();
}

NhaParams make_params(const NhaDims& d, int C, int64_t window, bool has_window, double scale) {
  NhaParams p{};
  p.B = d.B;
  p.T = d.T;
  p.H = d.H;
  p.D = d.D;
  p.M = d.M;
  p.C = C;
  p.N = (d.T + C - 1) / C;
  p.Tp = p.N * C;
  p.w = int(window);
  p.has_window = has_window ? 1 : 0;
  p.scale = float(scale);
  p.E = 2 * d.D * d.M;
  return p;
}

// The chunk products on tensor cores: for bf16 unless NHA_CUDA_NHA_FMA=1 asks for the CUDA-core
// kernels (kept to compare against; f32 always uses them).
bool tensor_cores(const Tensor& q) {
  if (q.dtype() != DType::BF16) return false;
  const char* fma = std::getenv("NHA_CUDA_NHA_FMA");
  return !(fma && std::string(fma) == "1");
}

// Calls fn.template operator()<Tv, Ts, kTc>() for (q dtype, s dtype) in {(f32, f32), (bf16, bf16),
// (bf16, f32)} (checked by check_nha); kTc = tensor_cores(q).
template <typename F>
void dispatch_nha(const Tensor& q, const Tensor& s, F&& fn) {
  if (q.dtype() == DType::F32) {
    fn.template operator()<float, float, false>();
    return;
  }
  const bool tc = tensor_cores(q);
  auto with_gates = [&]<typename Ts>() {
    if (tc)
      fn.template operator()<bf16_t, Ts, true>();
    else
      fn.template operator()<bf16_t, Ts, false>();
  };
  if (s.dtype() == DType::BF16)
    with_gates.template operator()<bf16_t>();
  else
    with_gates.template operator()<float>();
}

void zero(Tensor& x, cudaStream_t st) {
  if (x.numel() > 0) CUDA_CHECK(cudaMemsetAsync(x.data_ptr(), 0, x.nbytes(), st));
}

}  // namespace

void CudaBackend::nha_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                              const Tensor& qr, const Tensor& kr, const Tensor& v,
                              const Tensor& s, const Tensor& g, double scale, int64_t window) {
  const char* op = "nha_forward";
  const int dev = q.device().index;
  const NhaDims d = check_nha(op, dev, q, k, qr, kr, v, s, g, lse, window);
  check_cuda_tensor(out, dev, op, "out");
  check_same_shape(out, q, "nha_forward out");
  NHA_CHECK(out.dtype() == q.dtype()) << op << ": out " << out.str() << " vs q " << q.str();
  if (q.numel() == 0 || s.numel() == 0) {
    NHA_CHECK(q.numel() == 0) << op << ": M = 0 slots is not supported";
    return;
  }
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  if (window >= d.T) {
    // Memory never written: causal attention with the M empty slots as zero-logit, zero-value
    // keys inside the flash kernel's softmax (no pass over out afterwards).
    attention_forward_sinks(out, lse, qr, kr, v, scale, 0, d.M);
    return;
  }
  // Window branch: (o_w, lse_w) straight into out, lse; the memory branch merges into them.
  if (window > 0) attention_forward(out, lse, qr, kr, v, scale, window);
  const int tsize = int(dtype_size(q.dtype()));
  const bool tc = tensor_cores(q);
  const int C = choose_chunk(dev, d.D, d.M, tsize, tc);
  NhaParams p = make_params(d, C, window, window > 0, scale);
  const Layout L(C, d.D, d.M, tsize, tc);
  const int64_t BH = int64_t(d.B) * d.H;
  Scratch states(size_t(BH) * p.N * p.E * sizeof(float), dev);
  Scratch bl(size_t(BH) * p.N * d.M * sizeof(float), dev);
  p.states = states.as<float>();
  p.bl = bl.as<float>();
  dispatch_nha(q, s, [&]<typename Tv, typename Ts, bool kTc>() {
    launch_chunks(nha_contrib_kernel<Tv, Ts, kTc>, kThreads<kTc>, p, L.contrib_bytes(), st,
                  static_cast<const Tv*>(k.data_ptr()), static_cast<const Tv*>(v.data_ptr()),
                  static_cast<const Ts*>(s.data_ptr()), static_cast<const Ts*>(g.data_ptr()));
    launch_scan(p.states, p.bl, p, p.E, true, false, st);
    launch_chunks(nha_forward_kernel<Tv, Ts, kTc>, kThreads<kTc>, p, L.forward_bytes(), st,
                  static_cast<Tv*>(out.data_ptr()), static_cast<float*>(lse.data_ptr()),
                  static_cast<const Tv*>(q.data_ptr()), static_cast<const Tv*>(k.data_ptr()),
                  static_cast<const Tv*>(v.data_ptr()), static_cast<const Ts*>(s.data_ptr()),
                  static_cast<const Ts*>(g.data_ptr()));
  });
}

void CudaBackend::nha_backward(Tensor& dq, Tensor& dk, Tensor& dqr, Tensor& dkr, Tensor& dv,
                               Tensor& ds, Tensor& dg, const Tensor& dout, const Tensor& q,
                               const Tensor& k, const Tensor& qr, const Tensor& kr,
                               const Tensor& v, const Tensor& s, const Tensor& g,
                               const Tensor& out, const Tensor& lse, double scale,
                               int64_t window) {
  const char* op = "nha_backward";
  const int dev = q.device().index;
  const NhaDims d = check_nha(op, dev, q, k, qr, kr, v, s, g, lse, window);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dq, &dk, &dqr, &dkr, &dv, &dout, &out}) {
    check_cuda_tensor(*t, dev, op, "argument");
    check_same_shape(*t, q, op);
    NHA_CHECK(t->dtype() == q.dtype())
        << op << ": " << t->str() << " must have q's dtype " << dtype_name(q.dtype());
  }
  for (const Tensor* t : std::initializer_list<const Tensor*>{&ds, &dg}) {
    check_cuda_tensor(*t, dev, op, "argument");
    check_same_shape(*t, s, op);
    NHA_CHECK(t->dtype() == s.dtype())
        << op << ": " << t->str() << " must have s's dtype " << dtype_name(s.dtype());
  }
  if (q.numel() == 0 || s.numel() == 0) {
    NHA_CHECK(q.numel() == 0) << op << ": M = 0 slots is not supported";
    return;
  }
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  // Window branch: flash backward with the merged out and the global lse.
  if (window > 0) {
    attention_backward(dqr, dkr, dv, dout, qr, kr, v, out, lse, scale,
                       window >= d.T ? 0 : window);
  } else {
    zero(dqr, st);
    zero(dkr, st);
    zero(dv, st);
  }
  if (window >= d.T) {  // memory never written: no memory gradients
    zero(dq, st);
    zero(dk, st);
    zero(ds, st);
    zero(dg, st);
    return;
  }
  // Rows [T - w, T) of dk and ds receive no shifted write (their tokens never reach the memory).
  zero(dk, st);
  zero(ds, st);
  const int tsize = int(dtype_size(q.dtype()));
  const bool tc = tensor_cores(q);
  const int C = choose_chunk(dev, d.D, d.M, tsize, tc);
  NhaParams p = make_params(d, C, window, window > 0, scale);
  const Layout L(C, d.D, d.M, tsize, tc);
  const int64_t BH = int64_t(d.B) * d.H;
  Scratch states(size_t(BH) * p.N * p.E * sizeof(float), dev);
  Scratch dstates(size_t(BH) * p.N * p.E * sizeof(float), dev);
  Scratch bl(size_t(BH) * p.N * d.M * sizeof(float), dev);
  Scratch xtot(size_t(BH) * p.N * d.M * sizeof(float), dev);
  Scratch pm(size_t(BH) * p.Tp * d.M * sizeof(float), dev);
  Scratch dlm(size_t(BH) * p.Tp * d.M * sizeof(float), dev);
  Scratch xp(size_t(BH) * p.Tp * d.M * sizeof(float), dev);
  Scratch r(size_t(BH) * p.Tp * sizeof(float), dev);
  p.states = states.as<float>();
  p.dstates = dstates.as<float>();
  p.bl = bl.as<float>();
  p.xtot = xtot.as<float>();
  p.pm = pm.as<float>();
  p.dlm = dlm.as<float>();
  p.xp = xp.as<float>();
  p.r = r.as<float>();
  dispatch_nha(q, s, [&]<typename Tv, typename Ts, bool kTc>() {
    const Tv *pq = static_cast<const Tv*>(q.data_ptr()), *pk = static_cast<const Tv*>(k.data_ptr()),
             *pv = static_cast<const Tv*>(v.data_ptr());
    const Ts *ps = static_cast<const Ts*>(s.data_ptr()), *pg = static_cast<const Ts*>(g.data_ptr());
    launch_chunks(nha_contrib_kernel<Tv, Ts, kTc>, kThreads<kTc>, p, L.contrib_bytes(), st, pk, pv, ps, pg);
    launch_scan(p.states, p.bl, p, p.E, true, false, st);
    launch_chunks(nha_dlogits_kernel<Tv, Ts, kTc>, kThreads<kTc>, p, L.dlogits_bytes(), st,
                  static_cast<const Tv*>(dout.data_ptr()), static_cast<const Tv*>(out.data_ptr()),
                  static_cast<const float*>(lse.data_ptr()), pq, pk, pv, ps, pg);
    launch_scan(p.dstates, p.bl, p, p.E, true, true, st);
    launch_chunks(nha_grads_kernel<Tv, Ts, kTc>, kThreads<kTc>, p, L.grads_bytes(), st,
                  static_cast<Tv*>(dq.data_ptr()), static_cast<Tv*>(dk.data_ptr()),
                  static_cast<Tv*>(dv.data_ptr()), static_cast<Ts*>(ds.data_ptr()),
                  static_cast<const Tv*>(dout.data_ptr()), pq, pk, pv, ps, pg);
    launch_scan(p.xtot, p.bl, p, d.M, false, true, st);
    nha_dg_kernel<Ts><<<grid_for(dg.numel(), 256), 256, 0, st>>>(p, static_cast<Ts*>(dg.data_ptr()));
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::nha_gate_forward(Tensor& g, Tensor& s, const Tensor& f) {
  const char* op = "nha_gate_forward";
  const int dev = f.device().index;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&g, &s, &f}) check_cuda_tensor(*t, dev, op, "argument");
  check_same_shape(g, f, "nha_gate_forward g");
  check_same_shape(s, f, "nha_gate_forward s");
  NHA_CHECK(g.dtype() == s.dtype() && (g.dtype() == f.dtype() || g.dtype() == DType::F32))
      << op << ": g and s must share one dtype, f's or f32, got " << g.str() << ", " << s.str()
      << " for f " << f.str();
  if (f.numel() == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  dispatch_f32_bf16(f, op, [&]<typename Tf>() {
    auto go = [&]<typename Tg>() {
      nha_gate_forward_kernel<Tf, Tg><<<grid_for(f.numel(), 256), 256, 0, st>>>(
          static_cast<Tg*>(g.data_ptr()), static_cast<Tg*>(s.data_ptr()),
          static_cast<const Tf*>(f.data_ptr()), f.numel());
      CUDA_CHECK_LAUNCH();
    };
    if (g.dtype() == DType::F32)
      go.template operator()<float>();
    else
      go.template operator()<Tf>();
  });
}

void CudaBackend::nha_gate_backward(Tensor& df, const Tensor& dg, const Tensor& ds,
                                    const Tensor& f) {
  const char* op = "nha_gate_backward";
  const int dev = f.device().index;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&df, &dg, &ds, &f}) check_cuda_tensor(*t, dev, op, "argument");
  check_same_shape(df, f, "nha_gate_backward df");
  check_same_shape(dg, f, "nha_gate_backward dg");
  check_same_shape(ds, f, "nha_gate_backward ds");
  NHA_CHECK(df.dtype() == f.dtype()) << op << ": df " << df.str() << " must have f's dtype";
  NHA_CHECK(dg.dtype() == ds.dtype() && (dg.dtype() == f.dtype() || dg.dtype() == DType::F32))
      << op << ": dg and ds must share one dtype, f's or f32, got " << dg.str() << ", "
      << ds.str() << " for f " << f.str();
  if (f.numel() == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  dispatch_f32_bf16(f, op, [&]<typename Tf>() {
    auto go = [&]<typename Tg>() {
      nha_gate_backward_kernel<Tf, Tg><<<grid_for(f.numel(), 256), 256, 0, st>>>(
          static_cast<Tf*>(df.data_ptr()), static_cast<const Tg*>(dg.data_ptr()),
          static_cast<const Tg*>(ds.data_ptr()), static_cast<const Tf*>(f.data_ptr()), f.numel());
      CUDA_CHECK_LAUNCH();
    };
    if (dg.dtype() == DType::F32)
      go.template operator()<float>();
    else
      go.template operator()<Tf>();
  });
}

}  // namespace nha
