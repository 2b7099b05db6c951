// CUDA backend ops vs the CPU reference (float64 on the exact values the GPU sees), f32 and bf16,
// odd sizes, outputs poisoned with NaN before every run.
#include <limits>

#include "autograd/autocast.h"
#include "gpu/cuda_testing.h"
#include "train/flat_grads.h"
#include "train/optim.h"

namespace nha {
namespace {

using namespace cudatest;

const DType kTypes[] = {DType::F32, DType::BF16};

// Uniform values in [lo, hi) made on the CPU, rounded to dtype, on the GPU.
Tensor gpu_rand(const Shape& shape, uint64_t seed, DType dtype, double lo, double hi) {
  Generator gen(seed);
  return Tensor::rand(shape, gen, lo, hi, DType::F64).to(dtype).to(gpu());
}

// ---- elementwise ---------------------------------------------------------------------------------

TEST(CudaElementwise, AddMulScaleMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes)
    for (int64_t n : {1, 7, 4099, 100003}) {
      Tensor a = gpu_randn({n}, 1 + n, t), b = gpu_randn({n}, 2 + n, t);
      Tensor ra = ref(a), rb = ref(b), r = cpu_empty({n});
      Tensor out = poisoned({n}, t);
      cuda_be().add(out, a, b, 0.7, -1.3);
      cpu_be().add(r, ra, rb, 0.7, -1.3);
      EXPECT_LE(err(out, r), tol(t)) << "add " << name(t) << " n=" << n;
      out = poisoned({n}, t);
      cuda_be().mul(out, a, b);
      cpu_be().mul(r, ra, rb);
      EXPECT_LE(err(out, r), tol(t)) << "mul " << name(t) << " n=" << n;
      out = poisoned({n}, t);
      cuda_be().scale(out, a, -2.5);
      cpu_be().scale(r, ra, -2.5);
      EXPECT_LE(err(out, r), tol(t)) << "scale " << name(t) << " n=" << n;
    }
}

TEST(CudaElementwise, UnalignedViewsAndInPlace) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes) {
    // Offset-1 views are not 16-byte aligned: the kernels take the element-wise path.
    Tensor a = gpu_randn({1001}, 3, t).slice(0, 1, 1001), b = gpu_randn({1001}, 4, t).slice(0, 0, 1000);
    Tensor r = cpu_empty({1000});
    cpu_be().add(r, ref(a), ref(b), 1.0, 2.0);
    Tensor out = poisoned({1001}, t).slice(0, 1, 1001);
    cuda_be().add(out, a, b, 1.0, 2.0);
    EXPECT_LE(err(out, r), tol(t)) << name(t);
    // In place: a = a + 2 b
    Tensor c = a.clone();
    cuda_be().add(c, c, b, 1.0, 2.0);
    EXPECT_LE(err(c, r), tol(t)) << name(t);
  }
}

TEST(CudaActivations, SiluSwigluForwardBackward) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes)
    for (int64_t n : {37 * 129, 8 * 1024 + 3}) {
      Tensor x = gpu_randn({n}, 10 + n, t, 3.0), up = gpu_randn({n}, 11 + n, t), g = gpu_randn({n}, 12 + n, t);
      Tensor rx = ref(x), rup = ref(up), rg = ref(g), r = cpu_empty({n}), r2 = cpu_empty({n});
      Tensor out = poisoned({n}, t), out2 = poisoned({n}, t);
      cuda_be().silu_forward(out, x);
      cpu_be().silu_forward(r, rx);
      EXPECT_LE(err(out, r), tol(t)) << "silu " << name(t);
      out = poisoned({n}, t);
      cuda_be().silu_backward(out, g, x);
      cpu_be().silu_backward(r, rg, rx);
      EXPECT_LE(err(out, r), tol(t)) << "silu backward " << name(t);
      out = poisoned({n}, t);
      cuda_be().swiglu_forward(out, x, up);
      cpu_be().swiglu_forward(r, rx, rup);
      EXPECT_LE(err(out, r), tol(t)) << "swiglu " << name(t);
      out = poisoned({n}, t);
      cuda_be().swiglu_backward(out, out2, g, x, up);
      cpu_be().swiglu_backward(r, r2, rg, rx, rup);
      EXPECT_LE(err(out, r), tol(t)) << "swiglu backward dgate " << name(t);
      EXPECT_LE(err(out2, r2), tol(t)) << "swiglu backward dup " << name(t);
    }
}

// ---- reductions ----------------------------------------------------------------------------------

TEST(CudaReduce, SumDimMatchesCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  struct Case {
    int64_t outer, n, inner;
  };
  const Case cases[] = {{1, 100003, 1}, {37, 129, 1}, {37, 129, 5}, {3, 70001, 33},
                        {1, 65536, 77}, {5000, 3, 1}, {2, 1, 129},  {70000, 2, 1}};
  for (DType t : kTypes)
    for (const Case& c : cases)
      for (DType out_t : {t, DType::F32}) {
        // Positive values: the sums are large, so the relative error measures the summation.
        Tensor x = gpu_rand({c.outer * c.n * c.inner}, 20 + c.n, t, 0.5, 1.5);
        Tensor out = poisoned({c.outer, c.inner}, out_t);
        cuda_be().sum_dim(out, x, c.outer, c.n, c.inner);
        Tensor r = cpu_empty({c.outer, c.inner});
        cpu_be().sum_dim(r, ref(x), c.outer, c.n, c.inner);
        EXPECT_LE(err(out, r), tol(out_t)) << name(t) << " -> " << name(out_t) << " [" << c.outer
                                           << ", " << c.n << ", " << c.inner << "]";
      }
}

TEST(CudaReduce, BroadcastDimAndSumSquares) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes) {
    Tensor x = gpu_randn({3, 37}, 30, t);
    Tensor out = poisoned({3, 5, 37}, t);
    cuda_be().broadcast_dim(out, x, 3, 5, 37);
    Tensor r = cpu_empty({3, 5, 37});
    cpu_be().broadcast_dim(r, ref(x), 3, 5, 37);
    EXPECT_EQ(err(out, r), 0.0) << name(t);

    for (int64_t n : {1, 1000, 1000003}) {
      Tensor y = gpu_randn({n}, 31 + n, t);
      Tensor s = poisoned({}, DType::F32);
      cuda_be().sum_squares(s, y);
      Tensor rs = cpu_empty({});
      cpu_be().sum_squares(rs, ref(y));
      EXPECT_LE(err(s, rs), 1e-6) << name(t) << " n=" << n;
    }
  }
}

// ---- GEMM ------------------------------------------------------------------------------------------

TEST(CudaGemm, TwoDAllTransposesAndBeta) {
  NHA_SKIP_WITHOUT_CUDA();
  const int64_t M = 37, N = 129, K = 77;
  for (DType t : kTypes)
    for (DType ct : {t, DType::F32})
      for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb)
          for (double beta : {0.0, 1.5}) {
            Tensor a = gpu_randn(ta ? Shape{K, M} : Shape{M, K}, 40 + ta, t);
            Tensor b = gpu_randn(tb ? Shape{N, K} : Shape{K, N}, 42 + tb, t);
            Tensor c = beta == 0.0 ? poisoned({M, N}, ct) : gpu_randn({M, N}, 44, ct);
            Tensor r = beta == 0.0 ? Tensor::zeros({M, N}, DType::F64) : ref(c);
            cuda_be().gemm(c, a, b, ta, tb, 0.5, beta);
            cpu_be().gemm(r, ref(a), ref(b), ta, tb, 0.5, beta);
            EXPECT_LE(err(c, r), tol(ct)) << name(t) << "->" << name(ct) << " ta=" << ta
                                          << " tb=" << tb << " beta=" << beta;
          }
}

TEST(CudaGemm, BatchedWithBroadcast) {
  NHA_SKIP_WITHOUT_CUDA();
  const int64_t B = 3, M = 33, N = 65, K = 19;
  for (DType t : kTypes)
    for (int bcast = 0; bcast < 3; ++bcast) {  // 0: none, 1: a broadcast, 2: b broadcast
      Tensor a = gpu_randn({bcast == 1 ? 1 : B, M, K}, 50 + bcast, t);
      Tensor b = gpu_randn({bcast == 2 ? 1 : B, K, N}, 53 + bcast, t);
      Tensor c = poisoned({B, M, N}, t);
      cuda_be().gemm(c, a, b, false, false, 1.0, 0.0);
      Tensor r = Tensor::zeros({B, M, N}, DType::F64);
      cpu_be().gemm(r, ref(a), ref(b), false, false, 1.0, 0.0);
      EXPECT_LE(err(c, r), tol(t)) << name(t) << " broadcast " << bcast;
    }
}

// ---- embedding -------------------------------------------------------------------------------------

TEST(CudaEmbedding, ForwardBackwardMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  const int64_t V = 50, N = 301;
  for (DType t : kTypes)
    for (int64_t C : {129, 128})
      for (DType idt : {DType::I32, DType::I64}) {
        // Many repeated ids (0..9 dominate), every id of the table at most once beyond that.
        std::vector<int64_t> idv(N);
        Generator gen(60 + C);
        for (int64_t n = 0; n < N; ++n) idv[n] = n % 3 == 0 ? int64_t(gen.uniform() * V) % V : n % 10;
        Tensor ids = Tensor::from_vector<int64_t>(idv, {N}).to(idt).to(gpu());
        Tensor table = gpu_randn({V, C}, 61, t);
        Tensor out = poisoned({N, C}, t);
        cuda_be().embedding_forward(out, table, ids);
        Tensor r = cpu_empty({N, C});
        cpu_be().embedding_forward(r, ref(table), ids.to(Device::cpu()));
        EXPECT_EQ(err(out, r), 0.0) << name(t) << " C=" << C;

        Tensor dout = gpu_randn({N, C}, 62, t);
        Tensor dtable = poisoned({V, C}, t);
        cuda_be().embedding_backward(dtable, dout, ids);
        Tensor rd = cpu_empty({V, C});
        cpu_be().embedding_backward(rd, ref(dout), ids.to(Device::cpu()));
        EXPECT_LE(err(dtable, rd), tol(t)) << name(t) << " C=" << C << " " << name(idt);
        // Deterministic: a second run gives the same bits.
        Tensor again = poisoned({V, C}, t);
        cuda_be().embedding_backward(again, dout, ids);
        EXPECT_EQ(bytes(again), bytes(dtable));
      }
}

// ---- RMSNorm ---------------------------------------------------------------------------------------

TEST(CudaRmsNorm, ForwardBackwardMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes)
    for (int64_t C : {129, 768})
      for (int64_t N : {37, 3000}) {
        Tensor x = gpu_randn({N, C}, 70 + C, t, 2.0), w = gpu_randn({C}, 71, t, 1.0);
        Tensor out = poisoned({N, C}, t), rstd = poisoned({N}, DType::F32);
        cuda_be().rmsnorm_forward(out, rstd, x, w, 1e-5);
        Tensor rx = ref(x), rw = ref(w), r = cpu_empty({N, C}), rr = cpu_empty({N});
        cpu_be().rmsnorm_forward(r, rr, rx, rw, 1e-5);
        EXPECT_LE(err(out, r), tol(t)) << name(t) << " C=" << C << " N=" << N;
        EXPECT_LE(err(rstd, rr), 1e-6) << name(t) << " C=" << C << " N=" << N;

        Tensor g = gpu_randn({N, C}, 72 + N, t);
        for (DType dwt : {t, DType::F32}) {
          Tensor dx = poisoned({N, C}, t), dw = poisoned({C}, dwt);
          cuda_be().rmsnorm_backward(dx, dw, g, x, w, rstd);
          Tensor rdx = cpu_empty({N, C}), rdw = cpu_empty({C});
          cpu_be().rmsnorm_backward(rdx, rdw, ref(g), rx, rw, rr);
          EXPECT_LE(err(dx, rdx), tol(t)) << "dx " << name(t) << " C=" << C << " N=" << N;
          EXPECT_LE(err(dw, rdw), tol(dwt)) << "dw " << name(dwt) << " C=" << C << " N=" << N;
          Tensor dw2 = poisoned({C}, dwt), dx2 = poisoned({N, C}, t);
          cuda_be().rmsnorm_backward(dx2, dw2, g, x, w, rstd);
          EXPECT_EQ(bytes(dw2), bytes(dw)) << "dw not deterministic";
        }
      }
}

// The residual add fused with RMSNorm: against the CPU in float64, and against the unfused CUDA
// kernels (forward: the same bits; backward: dx = dh + the norm's dx, rounded once, not twice).
TEST(CudaAddRmsNorm, ForwardBackwardMatchCpuAndUnfused) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes)
    for (int64_t C : {203, 768})
      for (int64_t N : {37, 3000}) {
        SCOPED_TRACE(std::string(name(t)) + " C=" + std::to_string(C) + " N=" + std::to_string(N));
        Tensor x = gpu_randn({N, C}, 80 + C, t, 2.0), d = gpu_randn({N, C}, 81 + N, t);
        Tensor w = gpu_randn({C}, 82, t, 1.0);
        Tensor h = poisoned({N, C}, t), out = poisoned({N, C}, t), rstd = poisoned({N}, DType::F32);
        cuda_be().add_rmsnorm_forward(h, out, rstd, x, d, w, 1e-5);
        Tensor rh = cpu_empty({N, C}), r = cpu_empty({N, C}), rr = cpu_empty({N});
        cpu_be().add(rh, ref(x), ref(d), 1.0, 1.0);
        EXPECT_LE(err(h, rh), tol(t)) << "h";
        // The norm of the h the GPU stored (rounded to bf16 in bf16).
        cpu_be().rmsnorm_forward(r, rr, ref(h), ref(w), 1e-5);
        EXPECT_LE(err(out, r), tol(t)) << "out";
        EXPECT_LE(err(rstd, rr), 1e-6) << "rstd";
        Tensor h2 = poisoned({N, C}, t), out2 = poisoned({N, C}, t);
        Tensor rstd2 = poisoned({N}, DType::F32);
        cuda_be().add(h2, x, d, 1.0, 1.0);
        cuda_be().rmsnorm_forward(out2, rstd2, h2, w, 1e-5);
        EXPECT_EQ(bytes(h), bytes(h2)) << "fused h differs from add()";
        EXPECT_EQ(bytes(out), bytes(out2)) << "fused out differs from add() + rmsnorm_forward()";
        EXPECT_EQ(bytes(rstd), bytes(rstd2)) << "fused rstd differs";

        Tensor g = gpu_randn({N, C}, 83 + N, t), gh = gpu_randn({N, C}, 84 + C, t);
        for (DType dwt : {t, DType::F32}) {
          Tensor dx = poisoned({N, C}, t), dw = poisoned({C}, dwt);
          cuda_be().add_rmsnorm_backward(dx, dw, g, gh, h, w, rstd);
          Tensor rdx = cpu_empty({N, C}), rdw = cpu_empty({C});
          cpu_be().add_rmsnorm_backward(rdx, rdw, ref(g), ref(gh), ref(h), ref(w), rr);
          EXPECT_LE(err(dx, rdx), tol(t)) << "dx";
          EXPECT_LE(err(dw, rdw), tol(dwt)) << "dw " << name(dwt);
          Tensor dx2 = poisoned({N, C}, t), dw2 = poisoned({C}, dwt);
          cuda_be().add_rmsnorm_backward(dx2, dw2, g, gh, h, w, rstd);
          EXPECT_EQ(bytes(dx2), bytes(dx)) << "dx not deterministic";
          EXPECT_EQ(bytes(dw2), bytes(dw)) << "dw not deterministic";
          Tensor dn = poisoned({N, C}, t), dw3 = poisoned({C}, dwt);
          cuda_be().rmsnorm_backward(dn, dw3, g, h, w, rstd);
          cuda_be().add(dn, dn, gh, 1.0, 1.0);
          EXPECT_EQ(bytes(dw3), bytes(dw)) << "dw differs from rmsnorm_backward's";
          EXPECT_LE(err(dx, ref(dn)), tol(t, 4e-3, 1e-6)) << "dx against the unfused kernels";
        }
      }
}

// ---- RoPE ------------------------------------------------------------------------------------------

TEST(CudaRope, ForwardAndInverseMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes)
    for (int64_t D : {64, 130})
      for (int64_t start : {0, 1000}) {
        Tensor x = gpu_randn({2, 77, 3, D}, 80 + D, t);
        for (bool inverse : {false, true}) {
          Tensor out = poisoned({2, 77, 3, D}, t);
          cuda_be().rope(out, x, 10000.0, start, inverse);
          Tensor r = cpu_empty({2, 77, 3, D});
          cpu_be().rope(r, ref(x), 10000.0, start, inverse);
          EXPECT_LE(err(out, r), tol(t)) << name(t) << " D=" << D << " start=" << start
                                         << " inverse=" << inverse;
        }
      }
}

// ---- softmax and cross-entropy -------------------------------------------------------------------

TEST(CudaSoftmax, ForwardBackwardMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes)
    for (int64_t C : {129, 1000, 5}) {
      const int64_t N = 37;
      Tensor x = gpu_randn({N, C}, 90 + C, t, 3.0);
      Tensor out = poisoned({N, C}, t);
      cuda_be().softmax_forward(out, x);
      Tensor r = cpu_empty({N, C});
      cpu_be().softmax_forward(r, ref(x));
      EXPECT_LE(err(out, r), tol(t)) << name(t) << " C=" << C;
      Tensor g = gpu_randn({N, C}, 91, t);
      Tensor dx = poisoned({N, C}, t), rdx = cpu_empty({N, C});
      cuda_be().softmax_backward(dx, g, out);
      cpu_be().softmax_backward(rdx, ref(g), ref(out));
      EXPECT_LE(err(dx, rdx), tol(t, 6e-3)) << name(t) << " C=" << C;
    }
}

TEST(CudaArgmax, MatchesCpuIncludingTies) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes)
    for (int64_t C : {1, 129, 1000, 32001}) {
      const int64_t N = 37;
      // Values rounded to quarters in a small range: many exact ties, so the first-index rule
      // (not the reduction order) decides.
      Tensor x = testing::randn({N, C}, 110 + C, DType::F64, 2.0);
      double* px = x.data<double>();
      for (int64_t i = 0; i < N * C; ++i) px[i] = std::round(px[i] * 4) / 4;
      Tensor xg = x.to(t).to(gpu());
      Tensor out = Tensor::full({N}, -7, DType::I64, gpu());
      cuda_be().argmax(out, xg);
      Tensor r = Tensor::empty({N}, DType::I64);
      cpu_be().argmax(r, ref(xg));
      Tensor o = out.to(Device::cpu());
      for (int64_t n = 0; n < N; ++n)
        EXPECT_EQ(o.data<int64_t>()[n], r.data<int64_t>()[n]) << name(t) << " C=" << C << " n=" << n;
    }
}

TEST(CudaCrossEntropy, ForwardBackwardMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  const int64_t N = 37;
  for (DType t : kTypes)
    for (int64_t V : {1000, 1001, 32000})
      for (DType idt : {DType::I32, DType::I64}) {
        std::vector<int64_t> tv(N);
        Generator gen(100 + V);
        for (int64_t n = 0; n < N; ++n) tv[n] = n % 7 == 3 ? -100 : int64_t(gen.uniform() * V) % V;
        Tensor targets = Tensor::from_vector<int64_t>(tv, {N}).to(idt).to(gpu());
        Tensor logits = gpu_randn({N, V}, 101, t, 3.0);
        Tensor losses = poisoned({N}, DType::F32);
        cuda_be().cross_entropy_forward(losses, logits, targets, -100);
        Tensor rl = cpu_empty({N});
        Tensor rlogits = ref(logits), rtargets = targets.to(Device::cpu());
        cpu_be().cross_entropy_forward(rl, rlogits, rtargets, -100);
        EXPECT_LE(err(losses, rl), 1e-6) << name(t) << " V=" << V;

        Tensor dl = gpu_randn({N}, 102, DType::F32);
        Tensor dlogits = poisoned({N, V}, t);
        cuda_be().cross_entropy_backward(dlogits, logits, targets, dl, -100);
        Tensor rd = cpu_empty({N, V});
        cpu_be().cross_entropy_backward(rd, rlogits, rtargets, ref(dl), -100);
        EXPECT_LE(err(dlogits, rd), tol(t)) << name(t) << " V=" << V;
        // In place (dlogits aliases logits) gives the same bits.
        Tensor inplace = logits.clone();
        cuda_be().cross_entropy_backward(inplace, inplace, targets, dl, -100);
        EXPECT_EQ(bytes(inplace), bytes(dlogits)) << name(t) << " V=" << V;
      }
}

// ---- AdamW -----------------------------------------------------------------------------------------

TEST(CudaAdamW, StepsMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : kTypes) {
    const int64_t n = 10007;
    Tensor p = gpu_randn({n}, 110, t), m = gpu_randn({n}, 111, t, 0.01);
    Tensor v = gpu_rand({n}, 112, t, 0.0, 1e-3);
    Tensor rp = ref(p), rm = ref(m), rv = ref(v);
    const int steps = t == DType::F32 ? 3 : 1;  // bf16 moments round every step: compare one
    for (int s = 1; s <= steps; ++s) {
      Tensor g = gpu_randn({n}, 113 + s, t);
      cuda_be().adamw_step(p, g, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, s);
      cpu_be().adamw_step(rp, ref(g), rm, rv, 1e-2, 0.9, 0.95, 1e-8, 0.1, s);
    }
    EXPECT_LE(err(p, rp), tol(t, 4e-3, 1e-6)) << name(t);
    EXPECT_LE(err(m, rm), tol(t)) << name(t);
    EXPECT_LE(err(v, rv), tol(t)) << name(t);
  }
}

// Flat AdamW: segments at odd offsets and sizes (element-by-element path), aligned ones (16-byte
// packs), one over a thousand chunks (more chunks than blocks), mixed decay, gaps between them.
// Elements outside the segments start as NaN and must stay NaN; inside, the result must match the
// CPU in float64, the per-tensor CUDA kernel to the bit, and the bf16 copy the cast of the result.
TEST(CudaAdamW, FlatMatchesCpuAndPerTensorAndTouchesOnlyItsSegments) {
  NHA_SKIP_WITHOUT_CUDA();
  const std::vector<int64_t> rows = {0,     37,      1,  // offset, numel, decay
                                     40,    5,       0,  //
                                     64,    12293,   1,  // 3 chunks of 4096 and 5 more
                                     12400, 1,       0,  //
                                     12416, 5000003, 1,  //
                                     5012480, 771,   0};
  const int64_t S = int64_t(rows.size()) / 3, total = 5012480 + 771 + 29;
  std::vector<bool> inside(size_t(total), false);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = rows[3 * s]; j < rows[3 * s] + rows[3 * s + 1]; ++j) inside[size_t(j)] = true;
  // N(0, std^2) (or |.| for v) inside the segments, NaN outside, as an f32 GPU tensor.
  auto make = [&](uint64_t seed, double std, bool positive) {
    std::vector<double> x = testing::randn({total}, seed, DType::F64, std).to_vector<double>();
    for (size_t j = 0; j < x.size(); ++j)
      x[j] = !inside[j] ? std::numeric_limits<double>::quiet_NaN()
                        : positive ? std::fabs(x[j]) : x[j];
    return Tensor::from_vector<double>(x, {total}).to(DType::F32).to(gpu());
  };
  Tensor p = make(130, 1.0, false), m = make(131, 0.01, false), v = make(132, 1e-3, true);
  Tensor copy = poisoned({total}, DType::BF16);
  // The per-tensor kernel on each segment of twins of the buffers.
  Tensor p2 = p.clone(), m2 = m.clone(), v2 = v.clone();
  Tensor rp = ref(p), rm = ref(m), rv = ref(v), rcopy;
  const Tensor segments = Tensor::from_vector<int64_t>(rows, {S, 3}).to(gpu());
  const Tensor rsegments = Tensor::from_vector<int64_t>(rows, {S, 3});
  for (int s = 1; s <= 3; ++s) {
    const Tensor g = make(133 + s, 1.0, false);
    cuda_be().adamw_step_flat(p, g, m, v, copy, segments, 1e-2, 0.9, 0.95, 1e-8, 0.1, s);
    cpu_be().adamw_step_flat(rp, ref(g), rm, rv, rcopy, rsegments, 1e-2, 0.9, 0.95, 1e-8, 0.1, s);
    for (int64_t k = 0; k < S; ++k) {
      const int64_t off = rows[3 * k], n = rows[3 * k + 1];
      Tensor ps = p2.slice(0, off, off + n), ms = m2.slice(0, off, off + n),
             vs = v2.slice(0, off, off + n);
      cuda_be().adamw_step(ps, g.slice(0, off, off + n), ms, vs, 1e-2, 0.9, 0.95, 1e-8,
                           rows[3 * k + 2] != 0 ? 0.1 : 0.0, s);
    }
  }
  EXPECT_EQ(bytes(p), bytes(p2)) << "flat and per-tensor kernels differ";
  EXPECT_EQ(bytes(m), bytes(m2));
  EXPECT_EQ(bytes(v), bytes(v2));
  const std::vector<double> hp = p.to(Device::cpu()).to_vector<double>(),
                            hm = m.to(Device::cpu()).to_vector<double>(),
                            hv = v.to(Device::cpu()).to_vector<double>(),
                            hc = copy.to(Device::cpu()).to_vector<double>(),
                            hcast = p.to(DType::BF16).to(Device::cpu()).to_vector<double>(),
                            rpv = rp.to_vector<double>(), rmv = rm.to_vector<double>(),
                            rvv = rv.to_vector<double>();
  // Compare inside the segments; count what happened outside them.
  std::vector<double> in_p, in_rp, in_m, in_rm, in_v, in_rv;
  int64_t written_outside = 0, copy_mismatch = 0;
  for (size_t j = 0; j < size_t(total); ++j) {
    if (!inside[j]) {
      written_outside += !std::isnan(hp[j]) + !std::isnan(hm[j]) + !std::isnan(hv[j]) +
                         !std::isnan(hc[j]);
      continue;
    }
    in_p.push_back(hp[j]);
    in_rp.push_back(rpv[j]);
    in_m.push_back(hm[j]);
    in_rm.push_back(rmv[j]);
    in_v.push_back(hv[j]);
    in_rv.push_back(rvv[j]);
    copy_mismatch += !(hc[j] == hcast[j]);
  }
  EXPECT_EQ(written_outside, 0) << "elements outside every segment were written";
  EXPECT_EQ(copy_mismatch, 0) << "the bf16 copy is not the cast of the updated parameters";
  auto host_tensor = [](const std::vector<double>& x) {
    return Tensor::from_vector<double>(x, {int64_t(x.size())});
  };
  EXPECT_LE(testing::rel_rms(host_tensor(in_p), host_tensor(in_rp)), 1e-6) << "p";
  EXPECT_LE(testing::rel_rms(host_tensor(in_m), host_tensor(in_rm)), 1e-5) << "m";
  EXPECT_LE(testing::rel_rms(host_tensor(in_v), host_tensor(in_rv)), 1e-5) << "v";
}

// The AdamW class on the GPU (flat gradients, bf16 copies) against a CPU AdamW with separate
// gradients: the same parameters up to f32-vs-f64 rounding, and copies equal to casts.
TEST(CudaAdamW, OptimizerWithFlatGradientsAndCopiesMatchesCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  std::vector<Tensor> gp, cp;
  std::vector<ParamEntry> ge, ce;
  const Shape shapes[] = {{3, 7}, {768}, {5}, {203, 9}};
  for (size_t i = 0; i < 4; ++i) {
    cp.push_back(testing::randn(shapes[i], 140 + i, DType::F32).set_requires_grad(true));
    gp.push_back(cp.back().detach().to(gpu()).set_requires_grad(true));
    ge.push_back({"p" + std::to_string(i), gp.back(), i % 2 == 0});
    ce.push_back({"p" + std::to_string(i), cp.back(), i % 2 == 0});
  }
  const AdamWOptions o{.lr = 1e-2, .weight_decay = 0.1};
  AdamW gpu_opt(ge, o, DType::BF16), cpu_opt(ce, o);
  FlatGrads grads(gp, std::numeric_limits<int64_t>::max());
  for (int s = 1; s <= 3; ++s) {
    grads.zero_grad();
    for (size_t i = 0; i < gp.size(); ++i) {
      const Tensor g = testing::randn(shapes[i], 150 + 10 * s + i, DType::F32);
      gp[i].mutable_grad().copy_(g);
      cp[i].mutable_grad() = g;
    }
    gpu_opt.step();
    cpu_opt.step();
    for (size_t i = 0; i < gp.size(); ++i) {
      EXPECT_LE(err(gp[i], cp[i].to(DType::F64)), 1e-6) << "step " << s << ", parameter " << i;
      EXPECT_EQ(bytes(gpu_opt.copy(i)), bytes(gp[i].to(DType::BF16)))
          << "step " << s << ", copy " << i;
    }
  }
  AutocastGuard bf16(DType::BF16);
  EXPECT_EQ(autocast(gp[1]).data_ptr(), gpu_opt.copy(1).data_ptr());
}

}  // namespace
}  // namespace nha
