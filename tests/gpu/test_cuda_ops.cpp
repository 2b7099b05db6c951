// CUDA backend ops vs the CPU reference (float64 on the exact values the GPU sees), f32 and bf16,
// odd sizes, outputs poisoned with NaN before every run.
#include "gpu/cuda_testing.h"

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

}  // namespace
}  // namespace nha
