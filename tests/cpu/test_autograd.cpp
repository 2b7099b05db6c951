// Autograd engine: graph shapes, accumulation, version checks, no-grad, custom ops, and float64
// finite-difference checks of the core ops (elementwise, reductions, matmul, views).
#include "common/testing.h"

namespace nha {
namespace {

using testing::gradcheck;
using testing::randn;

Tensor leaf(const Shape& shape, uint64_t seed) { return randn(shape, seed).set_requires_grad(true); }

TEST(Autograd, DiamondGraphSumsBothPaths) {
  // z = y + y * a with y = a * b: dz/da = b + 2ab*... computed by hand below.
  Tensor a = Tensor::from_vector<double>({2.0, -1.0}, {2}).set_requires_grad(true);
  Tensor b = Tensor::from_vector<double>({3.0, 0.5}, {2}).set_requires_grad(true);
  Tensor y = a * b;
  Tensor z = sum(y + y * a);  // = sum(ab + a^2 b)
  z.backward();
  // dz/da = b + 2ab, dz/db = a + a^2
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{3 + 12, 0.5 - 1.0}));
  EXPECT_EQ(b.grad().to_vector<double>(), (std::vector<double>{2 + 4, -1 + 1}));
}

TEST(Autograd, TensorUsedTwiceAccumulates) {
  Tensor x = Tensor::from_vector<double>({1.5}, {1}).set_requires_grad(true);
  Tensor loss = sum(x * x + x);  // d/dx = 2x + 1
  loss.backward();
  EXPECT_DOUBLE_EQ(x.grad().item<double>(), 4.0);
}

TEST(Autograd, GradientsAccumulateAcrossBackwardCalls) {
  Tensor x = Tensor::from_vector<double>({1.0, 2.0}, {2}).set_requires_grad(true);
  sum(x * 3.0).backward();
  sum(x * 2.0).backward();
  EXPECT_EQ(x.grad().to_vector<double>(), (std::vector<double>{5.0, 5.0}));
}

TEST(Autograd, InPlaceChangeAfterSaveIsCaught) {
  Tensor a = leaf({3}, 1);
  Tensor b = randn({3}, 2);
  Tensor y = a * b;  // saves b
  b.add_(Tensor::ones({3}, DType::F64));
  try {
    sum(y).backward();
    FAIL() << "backward used a tensor modified after it was saved";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("modified in place"), std::string::npos) << e.what();
  }
}

TEST(Autograd, InPlaceOnLeafRequiringGradIsRefused) {
  Tensor w = leaf({2}, 3);
  EXPECT_THROW(w.fill_(0.0), Error);
  autograd::NoGradGuard no_grad;
  EXPECT_NO_THROW(w.fill_(0.0));
}

TEST(Autograd, NoGradRecordsNothing) {
  Tensor a = leaf({4}, 4);
  {
    autograd::NoGradGuard no_grad;
    Tensor y = a * 2.0;
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
  }
  EXPECT_TRUE(autograd::grad_mode_enabled());
  EXPECT_NE((a * 2.0).grad_fn(), nullptr);
}

TEST(Autograd, SecondBackwardNeedsRetainGraph) {
  Tensor a = leaf({3}, 5);
  Tensor y = sum(a * a);
  y.backward(Tensor(), /*retain_graph=*/true);
  std::vector<double> g1 = a.grad().to_vector<double>();
  y.backward();
  std::vector<double> g2 = a.grad().to_vector<double>();
  for (size_t i = 0; i < g1.size(); ++i) EXPECT_DOUBLE_EQ(g2[i], 2 * g1[i]);
  EXPECT_THROW(y.backward(), Error) << "saved tensors were freed by the second backward";
}

TEST(Autograd, BackwardOfNonScalarNeedsGradient) {
  Tensor a = leaf({3}, 6);
  Tensor y = a * 2.0;
  EXPECT_THROW(y.backward(), Error);
  y.backward(Tensor::ones({3}, DType::F64));
  for (double g : a.grad().to_vector<double>()) EXPECT_DOUBLE_EQ(g, 2.0);
}

TEST(Autograd, DetachCutsTheGraph) {
  Tensor a = leaf({2}, 7);
  Tensor y = sum(a.detach() * a);  // only the second factor carries gradient
  y.backward();
  EXPECT_LT(testing::rel_rms(a.grad(), a.detach()), 1e-15);
}

TEST(Autograd, CustomOpWithHandWrittenBackward) {
  // f(x, w) = x * w * 3 with its own backward.
  auto cube = [](const Tensor& x, const Tensor& w) {
    return autograd::custom_op(
        "Times3", {x, w},
        [&](autograd::CustomOpContext& ctx) {
          ctx.save(x);
          ctx.save(w);
          return std::vector<Tensor>{scale(mul(x, w), 3.0)};
        },
        [](autograd::CustomOpContext& ctx, std::vector<Tensor>&& g) {
          Tensor dx, dw;
          if (ctx.needs_input_grad(0)) dx = scale(mul(g[0], ctx.saved_tensor(1)), 3.0);
          if (ctx.needs_input_grad(1)) dw = scale(mul(g[0], ctx.saved_tensor(0)), 3.0);
          return std::vector<Tensor>{dx, dw};
        })[0];
  };
  Tensor x = leaf({5}, 8), w = leaf({5}, 9);
  EXPECT_TRUE(gradcheck([&](const std::vector<Tensor>& in) { return cube(in[0], in[1]); }, {x, w}));
  Tensor c = randn({5}, 10);  // no grad: its gradient is not requested
  Tensor y = cube(x, c);
  EXPECT_TRUE(y.requires_grad());
}

TEST(Autograd, CustomOpWrongGradientShapeIsCaught) {
  Tensor x = leaf({3}, 11);
  auto y = autograd::custom_op(
      "Broken", {x}, [&](autograd::CustomOpContext&) { return std::vector<Tensor>{x * 1.0}; },
      [](autograd::CustomOpContext&, std::vector<Tensor>&&) {
        return std::vector<Tensor>{Tensor::zeros({4}, DType::F64)};
      })[0];
  EXPECT_THROW(sum(y).backward(), Error);
}

TEST(Autograd, UnusedOutputOfMultiOutputNodeGetsZeros) {
  Tensor x = leaf({4}, 12);
  auto outs = autograd::custom_op(
      "Split", {x},
      [&](autograd::CustomOpContext&) { return std::vector<Tensor>{x * 1.0, x * 2.0}; },
      [](autograd::CustomOpContext&, std::vector<Tensor>&& g) {
        return std::vector<Tensor>{g[0] + g[1] * 2.0};
      });
  sum(outs[1]).backward();  // outs[0] receives no gradient: the engine must pass zeros
  for (double g : x.grad().to_vector<double>()) EXPECT_DOUBLE_EQ(g, 2.0);
}

// ---- finite differences of the core ops ---------------------------------------------------------

TEST(CoreOpsGrad, Elementwise) {
  Tensor a = leaf({3, 5}, 20), b = leaf({3, 5}, 21);
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return in[0] + in[1]; }, {a, b}));
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return in[0] - in[1]; }, {a, b}));
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return in[0] * in[1]; }, {a, b}));
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return in[0] * -0.7; }, {a}));
}

TEST(CoreOpsGrad, Reductions) {
  Tensor a = leaf({3, 4, 5}, 22);
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return sum(in[0]); }, {a}));
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return mean(in[0]); }, {a}));
  for (int64_t d : {0, 1, 2, -1})
    EXPECT_TRUE(gradcheck([d](const std::vector<Tensor>& in) { return sum(in[0], d); }, {a}))
        << "dim " << d;
  EXPECT_EQ(sum(a, 1, true).shape(), (Shape{3, 1, 5}));
}

TEST(CoreOpsForward, ReductionsMatchLoops) {
  Tensor a = randn({3, 4, 5}, 23);
  std::vector<double> v = a.to_vector<double>();
  std::vector<double> s1 = sum(a, 1).to_vector<double>();
  for (int o = 0; o < 3; ++o)
    for (int i = 0; i < 5; ++i) {
      double acc = 0;
      for (int k = 0; k < 4; ++k) acc += v[(o * 4 + k) * 5 + i];
      EXPECT_NEAR(s1[o * 5 + i], acc, 1e-14);
    }
  double total = 0;
  for (double e : v) total += e;
  EXPECT_NEAR(mean(a).item<double>(), total / 60, 1e-14);
}

TEST(CoreOpsForward, MatmulMatchesLoops) {
  // Odd sizes, 2-D weight and batched forms, f32 vs f64.
  const int64_t B = 2, M = 5, K = 7, N = 3;
  Tensor x = randn({B, M, K}, 24), w = randn({K, N}, 25), wt = randn({N, K}, 26);
  Tensor bm = randn({B, K, N}, 27);
  std::vector<double> xv = x.to_vector<double>(), wv = w.to_vector<double>(),
                      wtv = wt.to_vector<double>(), bv = bm.to_vector<double>();
  std::vector<double> ref_mm(B * M * N), ref_lin(B * M * N), ref_bmm(B * M * N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s1 = 0, s2 = 0, s3 = 0;
        for (int64_t k = 0; k < K; ++k) {
          double xe = xv[(b * M + i) * K + k];
          s1 += xe * wv[k * N + j];
          s2 += xe * wtv[j * K + k];
          s3 += xe * bv[(b * K + k) * N + j];
        }
        ref_mm[(b * M + i) * N + j] = s1;
        ref_lin[(b * M + i) * N + j] = s2;
        ref_bmm[(b * M + i) * N + j] = s3;
      }
  auto ref = [&](const std::vector<double>& r) { return Tensor::from_vector<double>(r, {B, M, N}); };
  EXPECT_LT(testing::rel_rms(matmul(x, w), ref(ref_mm)), 1e-14);
  EXPECT_LT(testing::rel_rms(linear(x, wt), ref(ref_lin)), 1e-14);
  EXPECT_LT(testing::rel_rms(matmul(x, bm), ref(ref_bmm)), 1e-14);
  EXPECT_LT(testing::rel_rms(linear(x.to(DType::F32), wt.to(DType::F32)), ref(ref_lin)), 1e-6);
  EXPECT_THROW(linear(x, w), Error) << "[K,N] weight passed where [N,K] is expected";
}

TEST(CoreOpsGrad, MatmulLinearBmm) {
  Tensor x = leaf({2, 3, 5}, 30), w = leaf({5, 4}, 31), wt = leaf({4, 5}, 32), b = leaf({2, 5, 3}, 33);
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); }, {x, w}));
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return linear(in[0], in[1]); }, {x, wt}));
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); }, {x, b}));
}

TEST(CoreOpsGrad, Views) {
  Tensor a = leaf({3, 4, 5}, 40);
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return in[0].reshape({4, -1}); }, {a}));
  EXPECT_TRUE(gradcheck(
      [](const std::vector<Tensor>& in) { return in[0].transpose(0, 2).contiguous(); }, {a}));
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return in[0].slice(1, 1, 3); }, {a}));
  EXPECT_TRUE(gradcheck(
      [](const std::vector<Tensor>& in) { return in[0].transpose(1, 2).reshape({3, 20}); }, {a}));
  EXPECT_TRUE(gradcheck(
      [](const std::vector<Tensor>& in) { return in[0].to(DType::F32).to(DType::F64); }, {a},
      {.step = 1e-2, .tolerance = 1e-4}));
}

}  // namespace
}  // namespace nha
