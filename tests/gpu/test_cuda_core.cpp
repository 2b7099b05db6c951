// CUDA backend: allocator, copies, fill, cast, Philox CPU == GPU, error reporting.
#include <cstdlib>
#include <cstring>

#include "gpu/cuda_testing.h"
#include "kernels/cuda/cuda_common.h"

namespace nha {
namespace {

using namespace cudatest;

TEST(CudaAllocator, CountsBytesAndReusesBlocks) {
  NHA_SKIP_WITHOUT_CUDA();
  Allocator& a = allocator_for(DeviceKind::CUDA);
  const size_t before = a.bytes_in_use();
  {
    Tensor t = Tensor::empty({1000, 37}, DType::F32, gpu());
    EXPECT_EQ(a.bytes_in_use(), before + 1000 * 37 * 4);
    a.reset_peak();
    EXPECT_EQ(a.peak_bytes(), a.bytes_in_use());
  }
  EXPECT_EQ(a.bytes_in_use(), before);
  // Steady state: the same sizes again and again reach cudaMalloc only in the first round.
  if (std::getenv("NHA_CUDA_NO_CACHE")) GTEST_SKIP() << "caching disabled (NHA_CUDA_NO_CACHE)";
  auto round = [] {
    std::vector<Tensor> ts;
    for (int64_t n : {1, 100, 4096, 123457, 3000000}) ts.push_back(Tensor::empty({n}, DType::BF16, gpu()));
  };
  round();
  const size_t calls = cuda::caching_allocator_malloc_calls();
  for (int i = 0; i < 5; ++i) round();
  EXPECT_EQ(cuda::caching_allocator_malloc_calls(), calls);
}

TEST(CudaCopy, RoundTripIsExactForEveryDtype) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : {DType::F32, DType::BF16, DType::I32, DType::I64, DType::F64}) {
    Tensor host = testing::randn({37, 129}, 11, DType::F64, 100.0).to(t);
    Tensor dev = host.to(gpu());
    Tensor dev2 = dev.clone();  // device -> device
    Tensor back = dev2.to(Device::cpu());
    ASSERT_EQ(back.nbytes(), host.nbytes());
    EXPECT_EQ(std::memcmp(back.data_ptr(), host.data_ptr(), host.nbytes()), 0) << name(t);
  }
}

TEST(CudaCopy, StridedViewsMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : {DType::F32, DType::BF16, DType::I64}) {
    Tensor host = testing::randn({5, 37, 3, 19}, 12, DType::F64).to(t);
    Tensor dev = host.to(gpu());
    Tensor a = dev.transpose(1, 3).contiguous();                  // permuted strides
    Tensor b = dev.slice(1, 3, 30).transpose(0, 2).contiguous();  // offset + strides
    Tensor ra = host.transpose(1, 3).contiguous(), rb = host.slice(1, 3, 30).transpose(0, 2).contiguous();
    EXPECT_EQ(bytes(a), bytes(ra)) << name(t);
    EXPECT_EQ(bytes(b), bytes(rb)) << name(t);
  }
}

TEST(CudaFill, MatchesCpuBitwise) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : {DType::F32, DType::BF16, DType::I32, DType::I64, DType::F64})
    for (double v : {0.0, -0.0, 1.0, -3.75, 1e-3, 12345.678}) {
      Tensor g = Tensor::empty({1031}, t, gpu());
      cuda_be().fill(g, v);
      Tensor c = Tensor::empty({1031}, t);
      cpu_be().fill(c, v);
      EXPECT_EQ(bytes(g), bytes(c)) << name(t) << " " << v;
    }
}

TEST(CudaCast, AllPairsMatchCpuBitwise) {
  NHA_SKIP_WITHOUT_CUDA();
  const std::vector<DType> types = {DType::F32, DType::BF16, DType::I32, DType::I64, DType::F64};
  for (DType from : types)
    for (DType to : types) {
      Tensor src = testing::randn({7, 133}, 13, DType::F64, 50.0).to(from);
      Tensor g = Tensor::empty({7, 133}, to, gpu());
      cuda_be().cast(g, src.to(gpu()));
      Tensor c = Tensor::empty({7, 133}, to);
      cpu_be().cast(c, src);
      EXPECT_EQ(bytes(g), bytes(c)) << name(from) << " -> " << name(to);
    }
}

// Element i of a fill uses Philox counter offset + i on both devices: same numbers.
TEST(CudaRandom, PhiloxMatchesCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  for (DType t : {DType::F32, DType::BF16}) {
    for (int kind = 0; kind < 2; ++kind) {
      const int64_t n = 100003;
      Tensor g = poisoned({n}, t);
      Tensor c = Tensor::empty({n}, DType::F32);
      if (kind == 0) {
        cuda_be().fill_normal(g, 1234, 777, 0.02);
        cpu_be().fill_normal(c, 1234, 777, 0.02);
      } else {
        cuda_be().fill_uniform(g, 99, 5, -0.5, 2.0);
        cpu_be().fill_uniform(c, 99, 5, -0.5, 2.0);
      }
      if (t == DType::BF16) c = c.to(DType::BF16);
      // The double-precision log/cos of the two math libraries may differ in the last bit of a
      // double; after rounding to f32/bf16 nearly every element is bit-identical.
      std::vector<float> gv = g.to_vector<float>(), cv = c.to_vector<float>();
      int64_t same = 0;
      double max_rel = 0;
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_TRUE(std::isfinite(gv[i])) << "element " << i << " not written";
        same += std::memcmp(&gv[i], &cv[i], 4) == 0;
        max_rel = std::max(max_rel, std::abs(double(gv[i]) - cv[i]) / (std::abs(double(cv[i])) + 1e-30));
      }
      EXPECT_GE(same, n - 10) << name(t) << " kind " << kind;
      EXPECT_LE(max_rel, t == DType::BF16 ? 8e-3 : 2e-7) << name(t) << " kind " << kind;
    }
  }
  // A generator advanced on the GPU continues the same stream as on the CPU.
  Generator g1(42), g2(42);
  Tensor a = Tensor::randn({1000}, g1, 1.0, DType::F32, gpu());
  Tensor b = Tensor::randn({1000}, g2, 1.0, DType::F32);
  EXPECT_LE(testing::rel_rms(a, b), 1e-7);
  EXPECT_EQ(g1.offset(), g2.offset());
}

TEST(CudaErrors, BadIdsAreReportedAtSynchronize) {
  NHA_SKIP_WITHOUT_CUDA();
  Tensor table = gpu_randn({10, 8}, 1, DType::F32);
  Tensor ids = Tensor::from_vector<int64_t>({1, 2, 10}, {3}, gpu());
  Tensor out = Tensor::empty({3, 8}, DType::F32, gpu());
  cuda_be().embedding_forward(out, table, ids);
  EXPECT_THROW(cuda_be().synchronize(), Error);
  cuda_be().synchronize();  // the error was reported once and cleared

  Tensor logits = gpu_randn({4, 5}, 2, DType::F32);
  Tensor targets = Tensor::from_vector<int32_t>({0, -100, 7, 1}, {4}, gpu());
  Tensor losses = Tensor::empty({4}, DType::F32, gpu());
  cuda_be().cross_entropy_forward(losses, logits, targets, -100);
  try {
    cuda_be().synchronize();
    ADD_FAILURE() << "no error for target 7 of 5 classes";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("target 7"), std::string::npos) << e.what();
  }
}

TEST(CudaErrors, WrongDtypeFailsWithMessage) {
  NHA_SKIP_WITHOUT_CUDA();
  Tensor a = Tensor::zeros({4}, DType::I32, gpu());
  Tensor out = Tensor::empty({4}, DType::I32, gpu());
  EXPECT_THROW(cuda_be().add(out, a, a, 1.0, 1.0), Error);
}

}  // namespace
}  // namespace nha
