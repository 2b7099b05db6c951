// CUDA attention (flash kernels for bf16 with head dim 64/128/256, the simple path otherwise) vs the
// CPU float64 reference: odd T, every window kind, poisoned outputs, bitwise determinism.
#include <cmath>

#include "gpu/cuda_testing.h"

namespace nha {
namespace {

using namespace cudatest;

struct AttnCase {
  int64_t B, T, H, D;
  DType dtype;
  int64_t window;
};

std::string describe(const AttnCase& c) {
  return std::string(name(c.dtype)) + " B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) +
         " H=" + std::to_string(c.H) + " D=" + std::to_string(c.D) +
         " window=" + std::to_string(c.window);
}

// Runs forward and backward on the GPU and on the CPU (f64, from the same input values) and checks
// every output. Tolerances: f32 1e-5; bf16 1e-2 (P and dS are rounded to bf16 before the products).
void check_attention(const AttnCase& c, uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const Shape shape{c.B, c.T, c.H, c.D};
  const double scale = 1.0 / std::sqrt(double(c.D));
  Tensor q = gpu_randn(shape, seed, c.dtype), k = gpu_randn(shape, seed + 1, c.dtype);
  Tensor v = gpu_randn(shape, seed + 2, c.dtype), dout = gpu_randn(shape, seed + 3, c.dtype);
  Tensor rq = ref(q), rk = ref(k), rv = ref(v), rdout = ref(dout);

  Tensor out = poisoned(shape, c.dtype), lse = poisoned({c.B, c.H, c.T}, DType::F32);
  cuda_be().attention_forward(out, lse, q, k, v, scale, c.window);
  Tensor rout = cpu_empty(shape), rlse = cpu_empty({c.B, c.H, c.T});
  cpu_be().attention_forward(rout, rlse, rq, rk, rv, scale, c.window);
  const double t_out = c.dtype == DType::BF16 ? 1e-2 : 1e-5;
  EXPECT_LE(err(out, rout), t_out) << "out";
  EXPECT_LE(err(lse, rlse), c.dtype == DType::BF16 ? 1e-3 : 1e-6) << "lse";

  Tensor dq = poisoned(shape, c.dtype), dk = poisoned(shape, c.dtype), dv = poisoned(shape, c.dtype);
  cuda_be().attention_backward(dq, dk, dv, dout, q, k, v, out, lse, scale, c.window);
  Tensor rdq = cpu_empty(shape), rdk = cpu_empty(shape), rdv = cpu_empty(shape);
  cpu_be().attention_backward(rdq, rdk, rdv, rdout, rq, rk, rv, rout, rlse, scale, c.window);
  EXPECT_LE(err(dq, rdq), t_out) << "dq";
  EXPECT_LE(err(dk, rdk), t_out) << "dk";
  EXPECT_LE(err(dv, rdv), t_out) << "dv";

  // Determinism: a second backward gives the same bits.
  Tensor dq2 = poisoned(shape, c.dtype), dk2 = poisoned(shape, c.dtype), dv2 = poisoned(shape, c.dtype);
  cuda_be().attention_backward(dq2, dk2, dv2, dout, q, k, v, out, lse, scale, c.window);
  EXPECT_EQ(bytes(dq2), bytes(dq)) << "dq not deterministic";
  EXPECT_EQ(bytes(dk2), bytes(dk)) << "dk not deterministic";
  EXPECT_EQ(bytes(dv2), bytes(dv)) << "dv not deterministic";
}

TEST(CudaAttention, FlashBf16OddLengthsAllWindows) {
  NHA_SKIP_WITHOUT_CUDA();
  uint64_t seed = 1000;
  for (int64_t D : {64, 128, 256})
    for (int64_t T : {1, 77, 200}) {
      for (int64_t window : {int64_t(0), int64_t(1), int64_t(17), T + 3})
        check_attention({2, T, 3, D, DType::BF16, window}, seed += 10);
    }
}

TEST(CudaAttention, FlashBf16LongSequenceManyTiles) {
  NHA_SKIP_WITHOUT_CUDA();
  // Several query/key tiles per block, tiles skipped outside the window, a ragged last tile.
  for (int64_t window : {int64_t(0), int64_t(300)})
    check_attention({1, 1111, 2, 64, DType::BF16, window}, 2000 + window);
  check_attention({1, 700, 2, 128, DType::BF16, 129}, 2100);
  check_attention({1, 333, 1, 256, DType::BF16, 0}, 2200);
}

// Small cases for compute-sanitizer racecheck / memcheck (scripts/gpu-check.sh).
TEST(CudaAttention, SmallFlashCases) {
  NHA_SKIP_WITHOUT_CUDA();
  check_attention({1, 77, 2, 64, DType::BF16, 17}, 4000);
  check_attention({1, 77, 1, 128, DType::BF16, 0}, 4010);
  check_attention({1, 40, 1, 256, DType::BF16, 0}, 4020);
}

TEST(CudaAttention, SimplePathF32AndOddHeadDims) {
  NHA_SKIP_WITHOUT_CUDA();
  uint64_t seed = 3000;
  for (int64_t D : {64, 40, 256})
    for (int64_t window : {int64_t(0), int64_t(1), int64_t(17), int64_t(80)})
      check_attention({2, 77, 3, D, DType::F32, window}, seed += 10);
  // bf16 with a head dim the flash kernels are not built for.
  check_attention({2, 77, 3, 40, DType::BF16, 0}, 3500);
  check_attention({2, 77, 3, 40, DType::BF16, 17}, 3510);
}

}  // namespace
}  // namespace nha
