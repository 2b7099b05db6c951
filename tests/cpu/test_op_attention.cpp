// Causal / sliding-window attention on the CPU: forward vs a naive reference, gradients vs finite
// differences, limits, and input errors.
#include <cmath>
#include <limits>

#include "common/testing.h"
#include "kernels/backend.h"

namespace nha {
namespace {

using testing::gradcheck;
using testing::randn;
using testing::rel_rms;

// Naive reference, independent of the kernel: full score matrix per (b, h) with -inf outside
// the causal window, softmax, weighted sum of values. All in double.
// Returns out [B, T, H, D] and lse [B, H, T] as f64 tensors.
std::pair<Tensor, Tensor> naive_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                          int64_t window, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  if (scale <= 0) scale = 1.0 / std::sqrt(double(D));
  std::vector<double> Q = q.to_vector<double>(), K = k.to_vector<double>(),
                      V = v.to_vector<double>();
  std::vector<double> O(Q.size(), 0.0), L(size_t(B * H * T), 0.0);
  auto at = [&](int64_t b, int64_t t, int64_t h, int64_t d) {
    return size_t(((b * T + t) * H + h) * D + d);
  };
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      std::vector<std::vector<double>> S(T, std::vector<double>(T, ninf));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < T; ++j) {
          const bool visible = j <= t && (window <= 0 || j > t - window);
          if (!visible) continue;
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += Q[at(b, t, h, d)] * K[at(b, j, h, d)];
          S[t][j] = scale * s;
        }
      for (int64_t t = 0; t < T; ++t) {
        double mx = ninf;
        for (int64_t j = 0; j < T; ++j) mx = std::max(mx, S[t][j]);
        double z = 0;
        for (int64_t j = 0; j < T; ++j) z += std::exp(S[t][j] - mx);  // exp(-inf) = 0
        L[size_t((b * H + h) * T + t)] = mx + std::log(z);
        for (int64_t j = 0; j < T; ++j) {
          const double p = std::exp(S[t][j] - mx) / z;
          for (int64_t d = 0; d < D; ++d) O[at(b, t, h, d)] += p * V[at(b, j, h, d)];
        }
      }
    }
  return {Tensor::from_vector<double>(O, q.shape()), Tensor::from_vector<double>(L, {B, H, T})};
}

// Naive backward from the same definition: dv = P^T dout, dP = dout V^T,
// dS = P * (dP - rowsum(P * dP)), dq = scale dS K, dk = scale dS^T Q. Returns {dq, dk, dv} (f64).
std::vector<Tensor> naive_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const Tensor& dout, int64_t window, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  if (scale <= 0) scale = 1.0 / std::sqrt(double(D));
  std::vector<double> Q = q.to_vector<double>(), K = k.to_vector<double>(),
                      V = v.to_vector<double>(), G = dout.to_vector<double>();
  std::vector<double> dQ(Q.size(), 0.0), dK(Q.size(), 0.0), dV(Q.size(), 0.0);
  auto at = [&](int64_t b, int64_t t, int64_t h, int64_t d) {
    return size_t(((b * T + t) * H + h) * D + d);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      // P [T, T], zero outside the causal window.
      std::vector<std::vector<double>> P(T, std::vector<double>(T, 0.0));
      for (int64_t t = 0; t < T; ++t) {
        double mx = -std::numeric_limits<double>::infinity(), z = 0;
        std::vector<double> s(T, 0.0);
        for (int64_t j = 0; j <= t; ++j) {
          if (window > 0 && j <= t - window) continue;
          for (int64_t d = 0; d < D; ++d) s[j] += Q[at(b, t, h, d)] * K[at(b, j, h, d)];
          s[j] *= scale;
          mx = std::max(mx, s[j]);
        }
        for (int64_t j = 0; j <= t; ++j)
          if (!(window > 0 && j <= t - window)) z += std::exp(s[j] - mx);
        for (int64_t j = 0; j <= t; ++j)
          if (!(window > 0 && j <= t - window)) P[t][j] = std::exp(s[j] - mx) / z;
      }
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> dP(T, 0.0);
        double rowsum = 0;
        for (int64_t j = 0; j < T; ++j) {
          for (int64_t d = 0; d < D; ++d) dP[j] += G[at(b, t, h, d)] * V[at(b, j, h, d)];
          rowsum += P[t][j] * dP[j];
        }
        for (int64_t j = 0; j < T; ++j) {
          const double dS = P[t][j] * (dP[j] - rowsum);
          for (int64_t d = 0; d < D; ++d) {
            dV[at(b, j, h, d)] += P[t][j] * G[at(b, t, h, d)];
            dQ[at(b, t, h, d)] += scale * dS * K[at(b, j, h, d)];
            dK[at(b, j, h, d)] += scale * dS * Q[at(b, t, h, d)];
          }
        }
      }
    }
  return {Tensor::from_vector<double>(dQ, q.shape()), Tensor::from_vector<double>(dK, q.shape()),
          Tensor::from_vector<double>(dV, q.shape())};
}

struct Size {
  int64_t B, T, H, D;
};

TEST(Attention, ForwardMatchesNaiveF64) {
  uint64_t seed = 100;
  for (Size s : {Size{2, 7, 3, 5}, Size{2, 13, 3, 8}, Size{1, 1, 2, 4}}) {
    for (int64_t window : {int64_t(0), int64_t(1), int64_t(3), s.T, s.T + 5, int64_t(-2)}) {
      Shape shape{s.B, s.T, s.H, s.D};
      Tensor q = randn(shape, ++seed), k = randn(shape, ++seed), v = randn(shape, ++seed);
      auto [out, lse] = attention_with_lse(q, k, v, window);
      auto [ref_out, ref_lse] = naive_attention(q, k, v, window, 0.0);
      EXPECT_EQ(out.dtype(), DType::F64);
      EXPECT_EQ(lse.shape(), (Shape{s.B, s.H, s.T}));
      EXPECT_LT(rel_rms(out, ref_out), 1e-12) << "T=" << s.T << " D=" << s.D << " w=" << window;
      EXPECT_LT(rel_rms(lse, ref_lse), 1e-12) << "T=" << s.T << " D=" << s.D << " w=" << window;
    }
  }
}

TEST(Attention, ForwardMatchesNaiveF32) {
  uint64_t seed = 200;
  for (Size s : {Size{2, 7, 3, 5}, Size{2, 13, 3, 8}}) {
    for (int64_t window : {int64_t(0), int64_t(1), int64_t(3), s.T, s.T + 5}) {
      Shape shape{s.B, s.T, s.H, s.D};
      Tensor q = randn(shape, ++seed, DType::F32), k = randn(shape, ++seed, DType::F32),
             v = randn(shape, ++seed, DType::F32);
      auto [out, lse] = attention_with_lse(q, k, v, window);
      EXPECT_EQ(out.dtype(), DType::F32);
      EXPECT_EQ(lse.dtype(), DType::F32);
      // The reference reads the same f32 values, converted exactly to double.
      auto [ref_out, ref_lse] = naive_attention(q, k, v, window, 0.0);
      EXPECT_LT(rel_rms(out, ref_out), 1e-5) << "T=" << s.T << " w=" << window;
      EXPECT_LT(rel_rms(lse, ref_lse), 1e-5) << "T=" << s.T << " w=" << window;
    }
  }
}

TEST(Attention, ExplicitScale) {
  Shape shape{2, 9, 2, 6};
  Tensor q = randn(shape, 1), k = randn(shape, 2), v = randn(shape, 3);
  auto [out, lse] = attention_with_lse(q, k, v, 4, 0.7);
  auto [ref_out, ref_lse] = naive_attention(q, k, v, 4, 0.7);
  EXPECT_LT(rel_rms(out, ref_out), 1e-12);
  EXPECT_LT(rel_rms(lse, ref_lse), 1e-12);
  // scale <= 0 is 1/sqrt(D), and differs from 0.7.
  Tensor dflt = attention(q, k, v, 4, 0.0);
  Tensor explicit_dflt = attention(q, k, v, 4, 1.0 / std::sqrt(6.0));
  EXPECT_EQ(dflt.to_vector<double>(), explicit_dflt.to_vector<double>());
  EXPECT_GT(rel_rms(dflt, out), 1e-3);
}

TEST(Attention, WindowAtLeastTEqualsFullCausal) {
  Shape shape{2, 13, 3, 8};
  Tensor q = randn(shape, 11), k = randn(shape, 12), v = randn(shape, 13);
  auto [full, full_lse] = attention_with_lse(q, k, v, 0);
  for (int64_t window : {int64_t(13), int64_t(18), std::numeric_limits<int64_t>::max()}) {
    auto [w, w_lse] = attention_with_lse(q, k, v, window);
    EXPECT_EQ(w.to_vector<double>(), full.to_vector<double>()) << "window " << window;
    EXPECT_EQ(w_lse.to_vector<double>(), full_lse.to_vector<double>()) << "window " << window;
  }
  // A window shorter than T does change the result.
  EXPECT_GT(rel_rms(attention(q, k, v, 12), full), 1e-6);
}

TEST(Attention, FirstRowAttendsOnlyToItself) {
  Shape shape{2, 7, 3, 5};
  Tensor q = randn(shape, 21), k = randn(shape, 22), v = randn(shape, 23);
  for (int64_t window : {0, 1, 3}) {
    auto [out, lse] = attention_with_lse(q, k, v, window);
    Tensor out0 = out.slice(1, 0, 1).contiguous(), v0 = v.slice(1, 0, 1).contiguous();
    EXPECT_EQ(out0.to_vector<double>(), v0.to_vector<double>()) << "window " << window;
    // lse of row 0 is its only score: scale * q_0 . k_0.
    std::vector<double> Q = q.to_vector<double>(), K = k.to_vector<double>(),
                        L = lse.to_vector<double>();
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t h = 0; h < 3; ++h) {
        double s = 0;
        for (int64_t d = 0; d < 5; ++d) s += Q[(b * 7 * 3 + h) * 5 + d] * K[(b * 7 * 3 + h) * 5 + d];
        EXPECT_NEAR(L[(b * 3 + h) * 7], s / std::sqrt(5.0), 1e-14);
      }
  }
  // window 1: every row sees only itself, so out == v everywhere.
  EXPECT_EQ(attention(q, k, v, 1).to_vector<double>(), v.to_vector<double>());
}

TEST(Attention, GradcheckF64) {
  uint64_t seed = 300;
  for (Size s : {Size{2, 5, 3, 4}, Size{1, 7, 2, 3}}) {
    for (int64_t window : {int64_t(0), int64_t(1), int64_t(3), s.T + 2}) {
      Shape shape{s.B, s.T, s.H, s.D};
      Tensor q = randn(shape, ++seed).set_requires_grad(true);
      Tensor k = randn(shape, ++seed).set_requires_grad(true);
      Tensor v = randn(shape, ++seed).set_requires_grad(true);
      EXPECT_TRUE(gradcheck(
          [window](const std::vector<Tensor>& x) { return attention(x[0], x[1], x[2], window); },
          {q, k, v}))
          << "T=" << s.T << " D=" << s.D << " window " << window;
    }
  }
}

TEST(Attention, GradcheckExplicitScaleAndPartialGrads) {
  Shape shape{2, 6, 2, 5};
  Tensor q = randn(shape, 41).set_requires_grad(true);
  Tensor k = randn(shape, 42);  // no grad: only dq and dv are needed
  Tensor v = randn(shape, 43).set_requires_grad(true);
  EXPECT_TRUE(gradcheck(
      [](const std::vector<Tensor>& x) { return attention(x[0], x[1], x[2], 4, 0.9); }, {q, k, v}));
  EXPECT_FALSE(k.grad().defined());
}

TEST(Attention, LseIsDetachedAndOutRecordsGraph) {
  Shape shape{1, 4, 1, 2};
  Tensor q = randn(shape, 51).set_requires_grad(true);
  Tensor k = randn(shape, 52), v = randn(shape, 53);
  auto [out, lse] = attention_with_lse(q, k, v);
  EXPECT_TRUE(out.requires_grad());
  EXPECT_FALSE(lse.requires_grad());
  EXPECT_TRUE(lse.is_leaf());
}

// f32 backward kernel vs f64 backward kernel on the same (f32-representable) inputs.
TEST(Attention, BackwardF32MatchesF64) {
  Shape shape{2, 13, 3, 8};
  for (int64_t window : {0, 1, 5}) {
    Tensor q32 = randn(shape, 61, DType::F32), k32 = randn(shape, 62, DType::F32),
           v32 = randn(shape, 63, DType::F32), g32 = randn(shape, 64, DType::F32);
    std::vector<Tensor> grads[2];
    int i = 0;
    for (DType dt : {DType::F32, DType::F64}) {
      Tensor q = q32.to(dt).clone().set_requires_grad(true);
      Tensor k = k32.to(dt).clone().set_requires_grad(true);
      Tensor v = v32.to(dt).clone().set_requires_grad(true);
      attention(q, k, v, window).backward(g32.to(dt));
      grads[i++] = {q.grad(), k.grad(), v.grad()};
    }
    for (int j = 0; j < 3; ++j) {
      EXPECT_EQ(grads[0][j].dtype(), DType::F32);
      EXPECT_LT(rel_rms(grads[0][j], grads[1][j]), 1e-5) << "grad " << j << " window " << window;
    }
  }
}

// Non-contiguous inputs (a [B, H, T, D] tensor transposed to [B, T, H, D]) give the same result.
TEST(Attention, NonContiguousInputs) {
  Tensor qh = randn({2, 3, 7, 4}, 71), kh = randn({2, 3, 7, 4}, 72), vh = randn({2, 3, 7, 4}, 73);
  Tensor q = qh.transpose(1, 2), k = kh.transpose(1, 2), v = vh.transpose(1, 2);
  ASSERT_FALSE(q.is_contiguous());
  Tensor a = attention(q, k, v, 3);
  Tensor b = attention(q.contiguous(), k.contiguous(), v.contiguous(), 3);
  EXPECT_EQ(a.to_vector<double>(), b.to_vector<double>());
}

// Backward kernel called directly: outputs fully overwritten (poisoned first), deterministic.
TEST(Attention, BackwardKernelOverwritesAndIsDeterministic) {
  Shape shape{2, 9, 3, 4};
  Tensor q = randn(shape, 81), k = randn(shape, 82), v = randn(shape, 83), g = randn(shape, 84);
  auto [out, lse] = attention_with_lse(q, k, v, 3);
  Backend& be = backend_for(q);
  std::vector<double> first[3];
  for (int rep = 0; rep < 2; ++rep) {
    Tensor dq = Tensor::full(shape, std::nan(""), DType::F64);
    Tensor dk = Tensor::full(shape, std::nan(""), DType::F64);
    Tensor dv = Tensor::full(shape, std::nan(""), DType::F64);
    be.attention_backward(dq, dk, dv, g, q, k, v, out, lse, 0.5, 3);
    Tensor d[3] = {dq, dk, dv};
    for (int j = 0; j < 3; ++j) {
      std::vector<double> x = d[j].to_vector<double>();
      for (double e : x) ASSERT_TRUE(std::isfinite(e));
      if (rep == 0) first[j] = x;
      else EXPECT_EQ(x, first[j]);
    }
  }
}

// Sizes large enough for the kernels to run threaded (and small ones, serial): forward and all
// three gradients against the naive references, in f64 and f32.
TEST(Attention, ForwardAndBackwardMatchNaive) {
  uint64_t seed = 400;
  for (Size s : {Size{2, 64, 2, 16}, Size{3, 7, 2, 5}}) {
    for (int64_t window : {int64_t(0), int64_t(17), int64_t(2)}) {
      for (DType dt : {DType::F64, DType::F32}) {
        Shape shape{s.B, s.T, s.H, s.D};
        Tensor q = randn(shape, ++seed, dt).set_requires_grad(true);
        Tensor k = randn(shape, ++seed, dt).set_requires_grad(true);
        Tensor v = randn(shape, ++seed, dt).set_requires_grad(true);
        Tensor g = randn(shape, ++seed, dt);
        const double tol = dt == DType::F64 ? 1e-12 : 1e-5;
        auto [out, lse] = attention_with_lse(q, k, v, window);
        auto [ref_out, ref_lse] = naive_attention(q, k, v, window, 0.0);
        EXPECT_LT(rel_rms(out, ref_out), tol) << "T=" << s.T << " w=" << window;
        EXPECT_LT(rel_rms(lse, ref_lse), tol) << "T=" << s.T << " w=" << window;
        out.backward(g);
        std::vector<Tensor> ref = naive_attention_backward(q, k, v, g, window, 0.0);
        EXPECT_LT(rel_rms(q.grad(), ref[0]), tol) << "dq T=" << s.T << " w=" << window;
        EXPECT_LT(rel_rms(k.grad(), ref[1]), tol) << "dk T=" << s.T << " w=" << window;
        EXPECT_LT(rel_rms(v.grad(), ref[2]), tol) << "dv T=" << s.T << " w=" << window;
      }
    }
  }
}

// The blocked kernels (query blocks of 64 rows) at odd sizes that cross blocks: T not a multiple
// of the block, odd heads and head dims, windows on both sides of the block size. The kernels are
// called directly with NaN-poisoned outputs; forward and backward against the naive references,
// f64 to 1e-12 and f32 to 2e-6 (f32 rounding of the inputs' products, nothing more).
TEST(Attention, BlockedKernelsMatchNaiveAtOddSizes) {
  uint64_t seed = 900;
  for (Size s : {Size{2, 131, 3, 5}, Size{1, 67, 1, 7}})
    for (int64_t window : {0, 1, 5, 63, 64, 65, 100, 200})
      for (DType dt : {DType::F64, DType::F32}) {
        const Shape shape{s.B, s.T, s.H, s.D};
        // f32-representable inputs, so the f64 references see exactly the kernel's inputs.
        const Tensor q = randn(shape, ++seed, DType::F32).to(dt),
                     k = randn(shape, ++seed, DType::F32).to(dt),
                     v = randn(shape, ++seed, DType::F32).to(dt),
                     g = randn(shape, ++seed, DType::F32).to(dt);
        const double scale = 0.37, tol = dt == DType::F64 ? 1e-12 : 2e-6;
        Backend& be = backend_for(q);
        Tensor out = Tensor::full(shape, std::nan(""), dt);
        Tensor lse = Tensor::full({s.B, s.H, s.T}, std::nan(""), dt);
        be.attention_forward(out, lse, q, k, v, scale, window);
        auto [ref_out, ref_lse] = naive_attention(q, k, v, window, scale);
        EXPECT_LT(rel_rms(out, ref_out), tol) << "T=" << s.T << " w=" << window;
        EXPECT_LT(rel_rms(lse, ref_lse), tol) << "T=" << s.T << " w=" << window;
        Tensor d[3];
        for (Tensor& t : d) t = Tensor::full(shape, std::nan(""), dt);
        be.attention_backward(d[0], d[1], d[2], g, q, k, v, out, lse, scale, window);
        const std::vector<Tensor> ref = naive_attention_backward(q, k, v, g, window, scale);
        for (int j = 0; j < 3; ++j)
          EXPECT_LT(rel_rms(d[j], ref[j]), tol) << "grad " << j << " T=" << s.T << " w=" << window;
      }
}

// The blocked backward against float64 central differences of sum(out * g) along a random
// direction of (q, k, v), at a size that crosses query blocks.
TEST(Attention, BlockedBackwardMatchesFiniteDifferences) {
  const Shape shape{2, 131, 3, 5};
  uint64_t seed = 950;
  for (int64_t window : {0, 7, 70}) {
    std::vector<Tensor> in, dir;
    for (int i = 0; i < 3; ++i) {
      in.push_back(randn(shape, ++seed).set_requires_grad(true));
      dir.push_back(randn(shape, ++seed));
    }
    const Tensor g = randn(shape, ++seed);
    attention(in[0], in[1], in[2], window).backward(g);
    double analytic = 0;
    for (int i = 0; i < 3; ++i) {
      const std::vector<double> gv = in[i].grad().to_vector<double>(),
                                dv = dir[i].to_vector<double>();
      for (size_t e = 0; e < gv.size(); ++e) analytic += gv[e] * dv[e];
    }
    auto loss_at = [&](double eps) {
      autograd::NoGradGuard no_grad;
      return sum(attention(in[0] + dir[0] * eps, in[1] + dir[1] * eps, in[2] + dir[2] * eps,
                           window) * g).item<double>();
    };
    const double h = 1e-5, numeric = (loss_at(h) - loss_at(-h)) / (2 * h);
    EXPECT_NEAR(analytic, numeric, 1e-7 * std::abs(numeric)) << "w=" << window;
  }
}

TEST(Attention, BadInputsFailClearly) {
  Tensor q = randn({2, 5, 3, 4}, 91), k = randn({2, 5, 3, 4}, 92), v = randn({2, 5, 3, 4}, 93);
  EXPECT_THROW(attention(q, randn({2, 5, 3, 3}, 94), v), Error);   // head dim differs
  EXPECT_THROW(attention(q, k, randn({2, 6, 3, 4}, 95)), Error);   // T differs
  EXPECT_THROW(attention(q.reshape({2, 5, 12}), k.reshape({2, 5, 12}), v.reshape({2, 5, 12})),
               Error);                                             // 3-D
  EXPECT_THROW(attention(q, k.to(DType::F32), v), Error);          // dtypes differ
  EXPECT_THROW(attention(q, k, Tensor()), Error);                  // undefined
  try {
    attention(q, randn({2, 5, 3, 3}, 94), v);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("equal shapes"), std::string::npos) << e.what();
  }
  try {
    attention(q.reshape({2, 5, 12}), k.reshape({2, 5, 12}), v.reshape({2, 5, 12}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[B, T, H, D]"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nha
