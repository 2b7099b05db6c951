// CUDA Native Hybrid Attention core (kernels/cuda/nha.cu) vs the CPU backend in float64 from the
// same input values: out, lse and all 7 gradients at odd T, every window kind (0 = pure memory, 1,
// the chunk size, a window across chunks, >= T = memory never written), several slot counts and
// head dims, f32 and bf16 (with bf16 or f32 gates), outputs poisoned with NaN, bitwise
// determinism of the backward; and the NHA gates.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "gpu/cuda_testing.h"

namespace nha {
namespace {

using namespace cudatest;

struct NhaCase {
  int64_t B, T, H, D, M;
  DType dtype;   // q, k, qr, kr, v, out and their gradients
  DType gdtype;  // s, g, ds, dg
  int64_t window;
  double gate_shift = 0.0;  // added to the gate logits f: negative = strong decay
};

std::string describe(const NhaCase& c) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s/%s B=%lld T=%lld H=%lld D=%lld M=%lld w=%lld shift=%g",
                name(c.dtype), name(c.gdtype), (long long)c.B, (long long)c.T, (long long)c.H,
                (long long)c.D, (long long)c.M, (long long)c.window, c.gate_shift);
  return buf;
}

// Worst error seen per quantity, printed at the end of each test (the report's numbers).
struct Worst {
  double v[9] = {};
  void add(int i, double e) { v[i] = std::max(v[i], e); }
  void print(const char* what) const {
    std::printf("[nha errors] %s: out %.2e lse %.2e dq %.2e dk %.2e dqr %.2e dkr %.2e dv %.2e "
                "ds %.2e dg %.2e\n",
                what, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]);
  }
};

// RMS of (gpu - ref) over max(RMS of ref, floor). A plain rel_rms misreads gradients that are
// exactly 0 in exact arithmetic: with T - w = 1 the only token ever written enters an empty memory,
// so its decay multiplies zero and dg = 0; the CPU's double-precision roundoff (~1e-16) then sits in
// the denominator against the GPU's f32 roundoff (~1e-7). The floor (1e-2, against gradients of
// order 0.1 .. 1 here) keeps those an absolute comparison.
double err_floor(const Tensor& gpu_out, const Tensor& cpu_ref, double floor = 1e-2) {
  const std::vector<double> o = gpu_out.to(Device::cpu()).to(DType::F64).to_vector<double>();
  const std::vector<double> r = cpu_ref.to_vector<double>();
  if (o.size() != r.size() || o.empty()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (size_t i = 0; i < o.size(); ++i) {
    if (!std::isfinite(o[i])) return std::numeric_limits<double>::infinity();
    num += (o[i] - r[i]) * (o[i] - r[i]);
    den += r[i] * r[i];
  }
  const double n = double(o.size());
  return std::sqrt(num / n) / std::max(std::sqrt(den / n), floor);
}

// Forward and backward on the GPU and on the CPU (f64, from the same values); checks every output
// against `tol` (out, gradients) and `tol_lse`.
void check_nha(const NhaCase& c, uint64_t seed, double tol, double tol_lse, Worst* worst) {
  SCOPED_TRACE(describe(c));
  const Shape shape{c.B, c.T, c.H, c.D}, gshape{c.B, c.T, c.H, c.M};
  const double scale = 1.0 / std::sqrt(double(c.D));
  Tensor q = gpu_randn(shape, seed, c.dtype), k = gpu_randn(shape, seed + 1, c.dtype);
  Tensor qr = gpu_randn(shape, seed + 2, c.dtype), kr = gpu_randn(shape, seed + 3, c.dtype);
  Tensor v = gpu_randn(shape, seed + 4, c.dtype), dout = gpu_randn(shape, seed + 5, c.dtype);
  // Realistic gates: f ~ N(shift, 2^2), g = logsigmoid(f) / 8, s = 1 - e^g (computed in f64).
  Tensor f = testing::randn(gshape, seed + 6, DType::F64, 2.0);
  if (c.gate_shift != 0.0) {
    Tensor sh = Tensor::full(gshape, c.gate_shift, DType::F64);
    cpu_be().add(f, f, sh, 1.0, 1.0);
  }
  Tensor g64 = cpu_empty(gshape), s64 = cpu_empty(gshape);
  cpu_be().nha_gate_forward(g64, s64, f);
  Tensor g = g64.to(c.gdtype).to(gpu()), s = s64.to(c.gdtype).to(gpu());
  Tensor rq = ref(q), rk = ref(k), rqr = ref(qr), rkr = ref(kr), rv = ref(v), rdout = ref(dout);
  Tensor rs = ref(s), rg = ref(g);

  Tensor out = poisoned(shape, c.dtype), lse = poisoned({c.B, c.H, c.T}, DType::F32);
  cuda_be().nha_forward(out, lse, q, k, qr, kr, v, s, g, scale, c.window);
  Tensor rout = cpu_empty(shape), rlse = cpu_empty({c.B, c.H, c.T});
  cpu_be().nha_forward(rout, rlse, rq, rk, rqr, rkr, rv, rs, rg, scale, c.window);
  const double e_out = err(out, rout), e_lse = err(lse, rlse);
  EXPECT_LE(e_out, tol) << "out";
  EXPECT_LE(e_lse, tol_lse) << "lse";

  Tensor dq = poisoned(shape, c.dtype), dk = poisoned(shape, c.dtype);
  Tensor dqr = poisoned(shape, c.dtype), dkr = poisoned(shape, c.dtype);
  Tensor dv = poisoned(shape, c.dtype);
  Tensor ds = poisoned(gshape, c.gdtype), dg = poisoned(gshape, c.gdtype);
  cuda_be().nha_backward(dq, dk, dqr, dkr, dv, ds, dg, dout, q, k, qr, kr, v, s, g, out, lse,
                         scale, c.window);
  // The CPU reference gets its own f64 forward outputs: the exact gradient. The GPU backward gets
  // the GPU's out (rounded to bf16 on the bf16 path), as the autograd op passes it.
  Tensor rdq = cpu_empty(shape), rdk = cpu_empty(shape), rdqr = cpu_empty(shape);
  Tensor rdkr = cpu_empty(shape), rdv = cpu_empty(shape);
  Tensor rds = cpu_empty(gshape), rdg = cpu_empty(gshape);
  cpu_be().nha_backward(rdq, rdk, rdqr, rdkr, rdv, rds, rdg, rdout, rq, rk, rqr, rkr, rv, rs, rg,
                        rout, rlse, scale, c.window);
  const double e[7] = {err_floor(dq, rdq), err_floor(dk, rdk), err_floor(dqr, rdqr),
                       err_floor(dkr, rdkr), err_floor(dv, rdv), err_floor(ds, rds),
                       err_floor(dg, rdg)};
  const char* names[7] = {"dq", "dk", "dqr", "dkr", "dv", "ds", "dg"};
  for (int i = 0; i < 7; ++i) EXPECT_LE(e[i], tol) << names[i];
  if (worst) {
    worst->add(0, e_out);
    worst->add(1, e_lse);
    for (int i = 0; i < 7; ++i) worst->add(2 + i, e[i]);
  }

  // Determinism: a second backward gives the same bits.
  Tensor dq2 = poisoned(shape, c.dtype), dk2 = poisoned(shape, c.dtype);
  Tensor dqr2 = poisoned(shape, c.dtype), dkr2 = poisoned(shape, c.dtype);
  Tensor dv2 = poisoned(shape, c.dtype);
  Tensor ds2 = poisoned(gshape, c.gdtype), dg2 = poisoned(gshape, c.gdtype);
  cuda_be().nha_backward(dq2, dk2, dqr2, dkr2, dv2, ds2, dg2, dout, q, k, qr, kr, v, s, g, out,
                         lse, scale, c.window);
  EXPECT_EQ(bytes(dq2), bytes(dq)) << "dq not deterministic";
  EXPECT_EQ(bytes(dk2), bytes(dk)) << "dk not deterministic";
  EXPECT_EQ(bytes(dv2), bytes(dv)) << "dv not deterministic";
  EXPECT_EQ(bytes(ds2), bytes(ds)) << "ds not deterministic";
  EXPECT_EQ(bytes(dg2), bytes(dg)) << "dg not deterministic";
}

constexpr double kF32Tol = 2e-5, kF32LseTol = 2e-6;
constexpr double kBf16Tol = 2e-2, kBf16LseTol = 2e-3;

// Sets an environment variable for the scope (forces the chunk size of nha.cu).
struct ScopedEnv {
  std::string name;
  ScopedEnv(const char* n, const char* value) : name(n) { setenv(n, value, 1); }
  ~ScopedEnv() { unsetenv(name.c_str()); }
};

TEST(CudaNha, F32OddLengthsAllWindows) {
  NHA_SKIP_WITHOUT_CUDA();
  Worst worst;
  uint64_t seed = 100;
  for (int64_t T : {1, 37, 64, 65, 200, 333})
    for (int64_t w : {int64_t(0), int64_t(1), int64_t(64), int64_t(100), T + 3})
      check_nha({2, T, 2, 64, 16, DType::F32, DType::F32, w}, seed += 10, kF32Tol, kF32LseTol,
                &worst);
  worst.print("f32 D=64 M=16 (chunk 64)");
}

TEST(CudaNha, F32HeadDim128Slots64) {
  NHA_SKIP_WITHOUT_CUDA();
  Worst worst;
  uint64_t seed = 200;
  // D = 128 in f32 takes 32-row chunks (shared memory); T = 333 spans 11 of them.
  for (int64_t T : {65, 333})
    for (int64_t w : {int64_t(0), int64_t(64), int64_t(100), int64_t(400)})
      check_nha({1, T, 2, 128, 64, DType::F32, DType::F32, w}, seed += 10, kF32Tol, kF32LseTol,
                &worst);
  worst.print("f32 D=128 M=64");
}

TEST(CudaNha, F32ForcedSmallChunksOddSlots) {
  NHA_SKIP_WITHOUT_CUDA();
  Worst worst;
  {
    ScopedEnv env("NHA_CUDA_NHA_CHUNK", "16");
    check_nha({1, 200, 2, 64, 64, DType::F32, DType::F32, 37}, 300, kF32Tol, kF32LseTol, &worst);
    check_nha({2, 77, 1, 32, 3, DType::F32, DType::F32, 0}, 310, kF32Tol, kF32LseTol, &worst);
  }
  check_nha({2, 100, 3, 32, 3, DType::F32, DType::F32, 5}, 320, kF32Tol, kF32LseTol, &worst);
  check_nha({1, 150, 2, 64, 128, DType::F32, DType::F32, 1}, 330, kF32Tol, kF32LseTol, &worst);
  worst.print("f32 forced chunk 16 / odd M / M=128");
}

TEST(CudaNha, F32StrongDecayIsStable) {
  NHA_SKIP_WITHOUT_CUDA();
  Worst worst;
  // f ~ N(-12, 2^2): g ~ -1.5 per step, e^{-B} over a chunk would overflow f32. The f32 gate
  // cumsum B reaches ~ -140 inside a chunk, so exponents carry ~1e-5 absolute error: dq and dk
  // measured 1.9e-5 on the H200 (2026-11-28), hence 5e-5 here.
  check_nha({1, 300, 2, 64, 16, DType::F32, DType::F32, 0, -12.0}, 400, 5e-5, kF32LseTol, &worst);
  check_nha({1, 300, 2, 64, 16, DType::F32, DType::F32, 64, -12.0}, 410, 5e-5, kF32LseTol,
            &worst);
  worst.print("f32 strong decay");
}

TEST(CudaNha, Bf16OddLengthsAllWindows) {
  NHA_SKIP_WITHOUT_CUDA();
  Worst worst;
  uint64_t seed = 500;
  for (int64_t T : {1, 37, 65, 200, 333})
    for (int64_t w : {int64_t(0), int64_t(1), int64_t(64), int64_t(100), T + 5})
      check_nha({2, T, 2, 128, 64, DType::BF16, DType::BF16, w}, seed += 10, kBf16Tol,
                kBf16LseTol, &worst);
  worst.print("bf16 D=128 M=64");
}

TEST(CudaNha, Bf16WithF32GatesAndOtherHeadDims) {
  NHA_SKIP_WITHOUT_CUDA();
  Worst worst;
  check_nha({2, 200, 2, 64, 16, DType::BF16, DType::F32, 0}, 600, kBf16Tol, kBf16LseTol, &worst);
  check_nha({2, 200, 2, 64, 16, DType::BF16, DType::F32, 100}, 610, kBf16Tol, kBf16LseTol, &worst);
  check_nha({1, 130, 2, 256, 64, DType::BF16, DType::BF16, 64}, 620, kBf16Tol, kBf16LseTol, &worst);
  check_nha({1, 130, 1, 256, 128, DType::BF16, DType::F32, 0}, 630, kBf16Tol, kBf16LseTol, &worst);
  worst.print("bf16 mixed gates / D=64,256");
}

// The bf16 path's chunk products run on tensor cores (nha.cu: split-bf16 operands). With strong
// decay and no window dq and dk are ill-conditioned (two cancellations, see nha.cu "Precision"):
// plain bf16 operands gave them ~0.1 relative RMS error; they must meet the same limit as the rest.
TEST(CudaNha, Bf16StrongDecayIsStable) {
  NHA_SKIP_WITHOUT_CUDA();
  Worst worst;
  check_nha({1, 300, 2, 128, 64, DType::BF16, DType::BF16, 0, -12.0}, 640, kBf16Tol, kBf16LseTol,
            &worst);
  check_nha({2, 200, 2, 64, 16, DType::BF16, DType::F32, 0, -12.0}, 650, kBf16Tol, kBf16LseTol,
            &worst);
  check_nha({1, 300, 2, 128, 64, DType::BF16, DType::BF16, 64, -12.0}, 660, kBf16Tol, kBf16LseTol,
            &worst);
  worst.print("bf16 strong decay");
  // Gates so strong that a 16-row sub-chunk decays by more than 2^64 in some (f ~ N(-24, 2)) or
  // every (N(-60, 2)) slot: those sub-chunks' own pairs take the direct path (nha.cu "sub-chunks").
  Worst extreme;
  check_nha({1, 200, 2, 64, 16, DType::BF16, DType::F32, 0, -24.0}, 662, kBf16Tol, kBf16LseTol,
            &extreme);
  check_nha({1, 200, 2, 64, 16, DType::BF16, DType::F32, 0, -60.0}, 664, kBf16Tol, kBf16LseTol,
            &extreme);
  check_nha({1, 150, 2, 128, 64, DType::BF16, DType::BF16, 20, -60.0}, 666, kBf16Tol, kBf16LseTol,
            &extreme);
  extreme.print("bf16 extreme decay (direct sub-chunks)");
}

// Sub-chunks of 16 rows inside 16/32-row chunks, rows past T inside a sub-chunk, odd slot counts.
TEST(CudaNha, Bf16SmallChunksAndOddSlots) {
  NHA_SKIP_WITHOUT_CUDA();
  Worst worst;
  for (const char* chunk : {"16", "32"}) {
    ScopedEnv env("NHA_CUDA_NHA_CHUNK", chunk);
    check_nha({1, 77, 2, 64, 16, DType::BF16, DType::BF16, 0}, 670, kBf16Tol, kBf16LseTol, &worst);
    check_nha({1, 101, 2, 128, 64, DType::BF16, DType::F32, 37}, 680, kBf16Tol, kBf16LseTol,
              &worst);
  }
  check_nha({2, 90, 2, 64, 3, DType::BF16, DType::BF16, 0}, 690, kBf16Tol, kBf16LseTol, &worst);
  check_nha({1, 130, 2, 32, 5, DType::BF16, DType::F32, 7}, 695, kBf16Tol, kBf16LseTol, &worst);
  // D = 40: partial n8 tiles and a k range that ends inside a k16 step
  check_nha({1, 90, 2, 40, 16, DType::BF16, DType::BF16, 5}, 697, kBf16Tol, kBf16LseTol, &worst);
  worst.print("bf16 chunks 16/32, odd M, D = 40");
}

// The CUDA-core kernels (NHA_CUDA_NHA_FMA=1) stay correct for bf16: they are the comparison point.
TEST(CudaNha, Bf16CudaCoreKernels) {
  NHA_SKIP_WITHOUT_CUDA();
  ScopedEnv env("NHA_CUDA_NHA_FMA", "1");
  Worst worst;
  check_nha({1, 200, 2, 128, 64, DType::BF16, DType::BF16, 0}, 710, kBf16Tol, kBf16LseTol, &worst);
  check_nha({1, 200, 2, 64, 16, DType::BF16, DType::F32, 64}, 720, kBf16Tol, kBf16LseTol, &worst);
  check_nha({1, 300, 2, 128, 64, DType::BF16, DType::BF16, 0, -12.0}, 730, kBf16Tol, kBf16LseTol,
            &worst);
  worst.print("bf16 CUDA-core kernels");
}

// Small cases for compute-sanitizer (scripts/gpu-check.sh).
TEST(CudaNha, SmallCases) {
  NHA_SKIP_WITHOUT_CUDA();
  check_nha({1, 70, 2, 64, 16, DType::F32, DType::F32, 0}, 700, kF32Tol, kF32LseTol, nullptr);
  check_nha({1, 70, 1, 64, 16, DType::F32, DType::F32, 20}, 710, kF32Tol, kF32LseTol, nullptr);
  check_nha({1, 70, 1, 128, 64, DType::BF16, DType::BF16, 64}, 720, kBf16Tol, kBf16LseTol, nullptr);
  check_nha({1, 40, 1, 64, 16, DType::BF16, DType::F32, 50}, 730, kBf16Tol, kBf16LseTol, nullptr);
}

// One chunk of tiny sizes for compute-sanitizer racecheck (slow on shared-memory-heavy kernels).
TEST(CudaNha, TinyForRacecheck) {
  NHA_SKIP_WITHOUT_CUDA();
  check_nha({1, 40, 1, 32, 8, DType::F32, DType::F32, 8}, 750, kF32Tol, kF32LseTol, nullptr);
  // the tensor-core path (bf16): sub-chunk products and their direct diagonal passes
  check_nha({1, 40, 1, 32, 8, DType::BF16, DType::BF16, 8}, 760, kBf16Tol, kBf16LseTol, nullptr);
  check_nha({1, 48, 1, 64, 16, DType::BF16, DType::F32, 0}, 770, kBf16Tol, kBf16LseTol, nullptr);
  // every sub-chunk direct (extreme decay), over three 16-row chunks
  ScopedEnv env("NHA_CUDA_NHA_CHUNK", "16");
  check_nha({1, 48, 1, 32, 8, DType::BF16, DType::F32, 0, -60.0}, 780, kBf16Tol, kBf16LseTol,
            nullptr);
}

TEST(CudaNha, BadShapesFailWithAMessage) {
  NHA_SKIP_WITHOUT_CUDA();
  const Shape shape{1, 8, 1, 12}, gshape{1, 8, 1, 4};
  Tensor q = gpu_randn(shape, 1, DType::F32);
  Tensor s = gpu_randn(gshape, 2, DType::F32);
  Tensor out = poisoned(shape, DType::F32), lse = poisoned({1, 1, 8}, DType::F32);
  EXPECT_THROW(cuda_be().nha_forward(out, lse, q, q, q, q, q, s, s, 0.3, 0), Error);  // D = 12
  const Shape shape2{1, 8, 1, 16}, gshape2{1, 8, 1, 200};
  Tensor q2 = gpu_randn(shape2, 3, DType::F32), s2 = gpu_randn(gshape2, 4, DType::F32);
  Tensor out2 = poisoned(shape2, DType::F32);
  EXPECT_THROW(cuda_be().nha_forward(out2, lse, q2, q2, q2, q2, q2, s2, s2, 0.3, 0), Error);
}

TEST(CudaNha, GatesMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType ft : {DType::F32, DType::BF16})
    for (DType gt : {ft, DType::F32}) {
      SCOPED_TRACE(std::string(name(ft)) + " f, " + name(gt) + " g/s");
      const Shape shape{3, 37, 5};
      Tensor f = gpu_randn(shape, 800, ft, 4.0);
      Tensor g = poisoned(shape, gt), s = poisoned(shape, gt);
      cuda_be().nha_gate_forward(g, s, f);
      Tensor rf = ref(f), rg = cpu_empty(shape), rs = cpu_empty(shape);
      cpu_be().nha_gate_forward(rg, rs, rf);
      const double t = gt == DType::BF16 ? 4e-3 : 1e-6;
      EXPECT_LE(err(g, rg), t) << "g";
      EXPECT_LE(err(s, rs), t) << "s";
      Tensor dg = gpu_randn(shape, 801, gt), ds = gpu_randn(shape, 802, gt);
      Tensor df = poisoned(shape, ft);
      cuda_be().nha_gate_backward(df, dg, ds, f);
      Tensor rdf = cpu_empty(shape);
      cpu_be().nha_gate_backward(rdf, ref(dg), ref(ds), rf);
      EXPECT_LE(err(df, rdf), ft == DType::BF16 ? 4e-3 : 1e-6) << "df";
    }
}

}  // namespace
}  // namespace nha
