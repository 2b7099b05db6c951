// Tensor core: shapes, views, dtypes, RNG, errors.
#include "common/testing.h"
#include "core/profile.h"
#include "core/random.h"
#include "kernels/backend.h"

namespace nha {
namespace {

TEST(Tensor, FactoriesAndProperties) {
  Tensor t = Tensor::full({2, 3}, 1.5);
  EXPECT_EQ(t.shape(), (Shape{2, 3}));
  EXPECT_EQ(t.numel(), 6);
  EXPECT_EQ(t.size(-1), 3);
  EXPECT_TRUE(t.is_contiguous());
  for (float v : t.to_vector<float>()) EXPECT_EQ(v, 1.5f);
  EXPECT_EQ(t.str(), "f32[2, 3] cpu");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 64, 0u) << "CPU storage is 64-byte aligned";
}

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_vector<float>({0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor tr = t.transpose(0, 1);
  EXPECT_EQ(tr.shape(), (Shape{3, 2}));
  EXPECT_FALSE(tr.is_contiguous());
  EXPECT_EQ(tr.to_vector<float>(), (std::vector<float>{0, 3, 1, 4, 2, 5}));
  Tensor col = t.slice(1, 1, 3);
  EXPECT_EQ(col.to_vector<float>(), (std::vector<float>{1, 2, 4, 5}));
  Tensor r = t.reshape({3, -1});
  EXPECT_EQ(r.shape(), (Shape{3, 2}));
  EXPECT_EQ(r.data_ptr(), t.data_ptr()) << "reshape of a contiguous tensor is a view";
  r.fill_(7);
  EXPECT_EQ(t.to_vector<float>()[5], 7.0f);
  EXPECT_THROW(t.reshape({4, 2}), Error);
}

TEST(Tensor, DtypeConversions) {
  Tensor t = Tensor::from_vector<float>({1.0f, -2.5f, 3.140625f, 1e-3f}, {4});
  Tensor b = t.to(DType::BF16);
  EXPECT_EQ(b.dtype(), DType::BF16);
  std::vector<float> back = b.to_vector<float>();
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], -2.5f);
  EXPECT_EQ(back[2], 3.140625f);
  EXPECT_NEAR(back[3], 1e-3f, 1e-5f);
  Tensor ids = Tensor::from_vector<int64_t>({3, 1 << 20}, {2}).to(DType::I32);
  EXPECT_EQ(ids.to_vector<int32_t>(), (std::vector<int32_t>{3, 1 << 20}));
}

TEST(Bf16, RoundsToNearestEven) {
  // 1 + 2^-8 is exactly half-way between two bf16 values; ties go to the even mantissa (1.0).
  EXPECT_EQ(float(bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(float(bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(float(bf16(std::nanf("")))));
}

TEST(Random, PhiloxKnownAnswer) {
  // Random123's published known-answer vector for philox4x32-10 with zero key and counter:
  // 6627e8d5 e169c58d bc57ac4c 9b00dbd8. Our counter uses the low 64 bits, key = seed.
  Philox4x32 r = Philox4x32::compute(0, 0);
  EXPECT_EQ(r.c[0], 0x6627e8d5u);
  EXPECT_EQ(r.c[1], 0xe169c58du);
  EXPECT_EQ(r.c[2], 0xbc57ac4cu);
  EXPECT_EQ(r.c[3], 0x9b00dbd8u);
}

TEST(Random, GeneratorIsDeterministicAndAdvances) {
  Generator a(42), b(42);
  Tensor x = Tensor::randn({1000}, a);
  Tensor y = Tensor::randn({1000}, b);
  EXPECT_EQ(x.to_vector<float>(), y.to_vector<float>());
  EXPECT_EQ(a.offset(), 1000u);
  Tensor z = Tensor::randn({1000}, a);
  EXPECT_NE(x.to_vector<float>(), z.to_vector<float>());
  // Moments of 10^5 normals: mean ~ 0 +- 0.01, variance ~ 1 +- 0.02.
  Tensor n = Tensor::randn({100000}, a, 1.0, DType::F64);
  double m = 0, v = 0;
  for (double e : n.to_vector<double>()) m += e;
  m /= 1e5;
  for (double e : n.to_vector<double>()) v += (e - m) * (e - m);
  v /= 1e5;
  EXPECT_NEAR(m, 0.0, 0.01);
  EXPECT_NEAR(v, 1.0, 0.02);
  Tensor u = Tensor::rand({100000}, a, 2.0, 3.0, DType::F64);
  for (double e : u.to_vector<double>()) {
    ASSERT_GE(e, 2.0);
    ASSERT_LT(e, 3.0);
  }
}

TEST(Random, SkipInitLeavesTensorsUnfilledAndTheStreamUnchanged) {
  Generator plain(7), skipping(7);
  const Tensor drawn = Tensor::randn({4096}, plain);
  Tensor skipped;
  {
    SkipInitGuard outer;
    {
      SkipInitGuard inner;
    }  // an inner guard's end must not end the outer one
    skipped = Tensor::randn({4096}, skipping);
  }
  EXPECT_EQ(skipping.offset(), plain.offset());
  // Not filled: a fresh buffer holds whatever the allocator had (zeros from the OS, or old data),
  // not this stream's normals.
  EXPECT_NE(skipped.to_vector<float>(), drawn.to_vector<float>());
  // Later draws are the same with and without the skip, and the guard is gone.
  EXPECT_EQ(Tensor::randn({100}, skipping).to_vector<float>(),
            Tensor::randn({100}, plain).to_vector<float>());
}

TEST(Profile, CollectsCpuOpsOnlyWhenOn) {
  Tensor a = Tensor::full({4, 8}, 1.0), b = Tensor::full({8, 3}, 2.0);
  Tensor c = Tensor::empty({4, 3}, DType::F32, Device::cpu());
  profile::set_enabled(false);
  profile::reset();
  backend_for(c).gemm(c, a, b, false, false, 1.0, 0.0);
  EXPECT_TRUE(profile::entries().empty()) << "off, a scope records nothing";

  profile::set_enabled(true);
  backend_for(c).gemm(c, a, b, false, false, 1.0, 0.0);
  backend_for(c).gemm(c, a, b, false, false, 1.0, 0.0);
  backend_for(c).scale(c, c, 0.5);
  profile::set_enabled(false);
  const std::vector<profile::Entry> entries = profile::entries();
  ASSERT_EQ(entries.size(), 2u);
  for (const profile::Entry& e : entries) {
    EXPECT_TRUE(e.name == "gemm" || e.name == "scale") << e.name;
    EXPECT_EQ(e.calls, e.name == "gemm" ? 2 : 1) << e.name;
    EXPECT_GE(e.seconds, 0.0);
  }
  EXPECT_NE(profile::table().find("gemm"), std::string::npos);
  profile::reset();
}

TEST(Errors, NameFileLineAndMessage) {
  try {
    NHA_CHECK(1 + 1 == 3) << "arithmetic is " << "broken";
    FAIL() << "NHA_CHECK did not throw";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("test_core.cpp:"), std::string::npos) << msg;
    EXPECT_NE(msg.find("1 + 1 == 3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("arithmetic is broken"), std::string::npos) << msg;
  }
  EXPECT_THROW(Device::parse("tpu"), Error);
  EXPECT_THROW(dtype_from_name("f16"), Error);
  EXPECT_EQ(Device::parse("cuda:3"), Device::cuda(3));
}

TEST(Errors, CudaTensorsWithoutBackendFailClearly) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present";
  try {
    Tensor::empty({2}, DType::F32, Device::cuda(0));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("HINT"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nha
