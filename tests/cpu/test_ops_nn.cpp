// Model ops on the CPU backend: embedding, rmsnorm, rope, silu/swiglu, softmax, cross_entropy.
// For each op: the forward against a naive float64 loop reference (kernels run on NaN-poisoned
// outputs so unwritten elements show), gradients by float64 central differences, f32 against f64
// on sizes large enough for the OpenMP paths, and the errors bad inputs raise.
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/testing.h"
#include "core/random.h"
#include "kernels/backend.h"

namespace nha {
namespace {

using testing::expect_error;
using testing::gradcheck;
using testing::randn;
using testing::rel_rms;
using Vec = std::vector<double>;

// f64 kernels agree with a float64 reference to rounding; f32 kernels to single precision.
constexpr double kF64Tol = 1e-12;
constexpr double kF32Tol = 1e-5;
constexpr DType kFloatTypes[] = {DType::F64, DType::F32};

double tol_for(DType t) { return t == DType::F64 ? kF64Tol : kF32Tol; }
Backend& cpu() { return backend_for(Device::cpu()); }

// A NaN-filled output: elements a kernel forgets to write make rel_rms infinite.
Tensor poisoned(const Shape& shape, DType dtype) {
  return Tensor::full(shape, std::numeric_limits<double>::quiet_NaN(), dtype);
}
Tensor f64(const Vec& values, const Shape& shape) { return Tensor::from_vector(values, shape); }
Tensor ids_tensor(const std::vector<int64_t>& ids, const Shape& shape, DType dtype = DType::I64) {
  return Tensor::from_vector(ids, shape).to(dtype);
}
Vec host(const Tensor& t) { return t.to_vector<double>(); }
// A leaf that requires grad, for gradcheck and backward tests.
Tensor leaf(const Tensor& t) { return t.detach().clone().set_requires_grad(true); }

// n ids uniform in [0, V), fresh per seed.
std::vector<int64_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  Generator gen(seed);
  std::vector<int64_t> ids;
  for (double u : Tensor::rand({n}, gen, 0.0, double(V), DType::F64).to_vector<double>())
    ids.push_back(std::min(V - 1, int64_t(std::floor(u))));
  return ids;
}

// =================================== embedding ===================================================

// out[n, c] = table[ids[n], c]
Vec embedding_ref(const Vec& table, const std::vector<int64_t>& ids, int64_t C) {
  Vec out;
  for (int64_t id : ids)
    for (int64_t c = 0; c < C; ++c) out.push_back(table[id * C + c]);
  return out;
}

TEST(OpEmbedding, ForwardMatchesReference) {
  const int64_t V = 13, C = 7;
  const std::vector<int64_t> ids = random_ids(30, V, 101);
  for (DType dt : kFloatTypes)
    for (DType it : {DType::I32, DType::I64}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " table, " + dtype_name(it) + " ids");
      Tensor table = randn({V, C}, 102).to(dt);
      Tensor idt = ids_tensor(ids, {2, 3, 5}, it);
      Tensor ref = f64(embedding_ref(host(table), ids, C), {2, 3, 5, C});
      Tensor out = embedding(table, idt);
      EXPECT_EQ(out.shape(), (Shape{2, 3, 5, C}));
      EXPECT_LT(rel_rms(out, ref), tol_for(dt));
      Tensor raw = poisoned({30, C}, dt);
      cpu().embedding_forward(raw, table, idt.reshape({30}));
      EXPECT_LT(rel_rms(raw.reshape({2, 3, 5, C}), ref), tol_for(dt));
    }
}

TEST(OpEmbedding, Gradcheck) {
  // 12 ids over a vocab of 5: repeats are certain, and some rows get no gradient.
  Tensor ids = ids_tensor(random_ids(12, 5, 111), {3, 4});
  EXPECT_TRUE(gradcheck([&](const std::vector<Tensor>& in) { return embedding(in[0], ids); },
                        {leaf(randn({5, 7}, 112))}));
}

TEST(OpEmbedding, RepeatedIdAccumulatesGradient) {
  const int64_t C = 3;
  Tensor table = leaf(randn({5, C}, 121));
  Tensor dout = randn({3, C}, 122);
  embedding(table, ids_tensor({2, 4, 2}, {3}, DType::I32)).backward(dout);
  const Vec g = host(table.grad()), d = host(dout);
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_DOUBLE_EQ(g[2 * C + c], d[0 * C + c] + d[2 * C + c]) << "id 2 at positions 0 and 2";
    EXPECT_DOUBLE_EQ(g[4 * C + c], d[1 * C + c]);
    for (int64_t unused : {0, 1, 3}) EXPECT_EQ(g[unused * C + c], 0.0) << "row " << unused;
  }
}

// Many tokens over a small vocab with C spanning several column blocks: the parallel backward
// against a loop reference, f32 against f64, and bitwise equal reruns.
TEST(OpEmbedding, LargeBackwardMatchesReferenceAndIsDeterministic) {
  const int64_t N = 1000, V = 7, C = 130;
  const std::vector<int64_t> ids = random_ids(N, V, 131);
  Tensor idt = ids_tensor(ids, {N});
  Tensor dout = randn({N, C}, 132);
  const Vec d = host(dout);
  Vec ref(V * C, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) ref[ids[n] * C + c] += d[n * C + c];
  Tensor reft = f64(ref, {V, C});
  Tensor by_dtype[2];
  for (int k = 0; k < 2; ++k) {
    const DType dt = kFloatTypes[k];
    SCOPED_TRACE(dtype_name(dt));
    Tensor dtable = poisoned({V, C}, dt), again = poisoned({V, C}, dt);
    cpu().embedding_backward(dtable, dout.to(dt), idt);
    cpu().embedding_backward(again, dout.to(dt), idt);
    EXPECT_LT(rel_rms(dtable, reft), tol_for(dt));
    EXPECT_EQ(host(dtable), host(again)) << "embedding backward is not deterministic";
    by_dtype[k] = dtable;
  }
  EXPECT_LT(rel_rms(by_dtype[1], by_dtype[0]), kF32Tol);
}

TEST(OpEmbedding, BadInputsFailClearly) {
  Tensor table = randn({13, 4}, 141);
  expect_error([&] { embedding(table, randn({3}, 142)); }, {"i32 or i64", "f64[3]"});
  expect_error([&] { embedding(table, ids_tensor({0, 1, 2, 3, 13}, {5})); },
               {"id 13", "position 4", "[0, 13)", "HINT"});
  expect_error([&] { embedding(table, ids_tensor({0, -1}, {2}, DType::I32)); },
               {"id -1", "position 1"});
  expect_error([&] { embedding(randn({13}, 143), ids_tensor({0}, {1})); }, {"[V, C]"});
  Tensor dtable = Tensor::empty({13, 4}, DType::F64);
  expect_error([&] { cpu().embedding_backward(dtable, randn({1, 4}, 144), ids_tensor({20}, {1})); },
               {"id 20"});
}

// =================================== rmsnorm =====================================================

// rstd[n] = 1/sqrt(mean_c x^2 + eps);  out = x * rstd * w
Vec rmsnorm_ref(const Vec& x, const Vec& w, double eps, Vec* rstd) {
  const int64_t C = int64_t(w.size()), N = int64_t(x.size()) / C;
  Vec out(x.size());
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += x[n * C + c] * x[n * C + c];
    const double r = 1.0 / std::sqrt(ss / double(C) + eps);
    rstd->push_back(r);
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = x[n * C + c] * r * w[c];
  }
  return out;
}

TEST(OpRmsNorm, ForwardMatchesReference) {
  const double eps = 1e-5;
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = randn({2, 5, 13}, 201).to(dt), w = randn({13}, 202).to(dt);
    Vec rstd;
    Tensor ref = f64(rmsnorm_ref(host(x), host(w), eps, &rstd), {2, 5, 13});
    EXPECT_LT(rel_rms(rmsnorm(x, w, eps), ref), tol_for(dt));
    Tensor out = poisoned({2, 5, 13}, dt), r = poisoned({10}, dt);
    cpu().rmsnorm_forward(out, r, x, w, eps);
    EXPECT_LT(rel_rms(out, ref), tol_for(dt));
    EXPECT_LT(rel_rms(r, f64(rstd, {10})), tol_for(dt));
  }
}

TEST(OpRmsNorm, Gradcheck) {
  auto f = [](const std::vector<Tensor>& in) { return rmsnorm(in[0], in[1], 1e-5); };
  EXPECT_TRUE(gradcheck(f, {leaf(randn({7, 13}, 211)), leaf(randn({13}, 212))}));
  EXPECT_TRUE(gradcheck(f, {leaf(randn({2, 3, 6}, 213)), leaf(randn({6}, 214))}));
  EXPECT_TRUE(gradcheck(f, {randn({7, 13}, 215), leaf(randn({13}, 216))})) << "weight only";
  // C over 64: the weight gradient is summed in several column blocks.
  EXPECT_TRUE(gradcheck(f, {leaf(randn({3, 130}, 217)), leaf(randn({130}, 218))}));
}

// Rows x columns above the OpenMP thresholds: forward and both gradients, f32 against f64.
TEST(OpRmsNorm, LargeF32AgreesWithF64) {
  Tensor x = randn({301, 257}, 221), w = randn({257}, 222), dout = randn({301, 257}, 223);
  std::vector<Tensor> outs, dxs, dws;
  for (DType dt : kFloatTypes) {
    Tensor xl = leaf(x.to(dt)), wl = leaf(w.to(dt));
    Tensor y = rmsnorm(xl, wl, 1e-6);
    y.backward(dout.to(dt));
    outs.push_back(y);
    dxs.push_back(xl.grad());
    dws.push_back(wl.grad());
  }
  EXPECT_LT(rel_rms(outs[1], outs[0]), kF32Tol);
  EXPECT_LT(rel_rms(dxs[1], dxs[0]), kF32Tol);
  EXPECT_LT(rel_rms(dws[1], dws[0]), kF32Tol);
}

TEST(OpRmsNorm, BadInputsFailClearly) {
  Tensor x = randn({7, 13}, 231);
  expect_error([&] { rmsnorm(x, randn({12}, 232), 1e-5); }, {"f64[12]", "f64[7, 13]"});
  expect_error([&] { rmsnorm(x, randn({13}, 233, DType::F32), 1e-5); }, {"weight", "f32[13]"});
}

// =================================== add_rmsnorm (residual add + rmsnorm) ========================

TEST(OpAddRmsNorm, ForwardMatchesUnfusedAndReference) {
  const double eps = 1e-5;
  for (DType dt : kFloatTypes)
    for (const Shape& s : {Shape{37, 203}, Shape{2, 3, 768}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " " + shape_str(s));
      const int64_t C = s.back(), N = numel_of(s) / C;
      Tensor x = randn(s, 241 + C).to(dt), d = randn(s, 242 + C).to(dt);
      Tensor w = randn({C}, 243 + C).to(dt);
      // The op against the unfused ops (the CPU's fused kernel is the two kernels: exact).
      const auto [h, out] = add_rmsnorm(x, d, w, eps);
      const Tensor h_ref = x + d;
      EXPECT_EQ(rel_rms(h, h_ref), 0.0);
      EXPECT_EQ(rel_rms(out, rmsnorm(h_ref, w, eps)), 0.0);
      // The kernel on poisoned outputs against the float64 loops.
      Vec hv = host(x), rstd;
      const Vec dv = host(d);
      for (size_t i = 0; i < hv.size(); ++i) hv[i] += dv[i];
      const Tensor ref = f64(rmsnorm_ref(hv, host(w), eps, &rstd), s);
      Tensor hk = poisoned(s, dt), ok = poisoned(s, dt), rk = poisoned({N}, dt);
      cpu().add_rmsnorm_forward(hk, ok, rk, x, d, w, eps);
      EXPECT_LT(rel_rms(hk, f64(hv, s)), tol_for(dt));
      EXPECT_LT(rel_rms(ok, ref), tol_for(dt));
      EXPECT_LT(rel_rms(rk, f64(rstd, {N})), tol_for(dt));
    }
}

TEST(OpAddRmsNorm, Gradcheck) {
  // Both outputs used (the residual stream continues from h), and each alone.
  auto both = [](const std::vector<Tensor>& in) {
    const auto [h, out] = add_rmsnorm(in[0], in[1], in[2], 1e-5);
    return h * 0.7 + out;
  };
  auto norm_only = [](const std::vector<Tensor>& in) {
    return add_rmsnorm(in[0], in[1], in[2], 1e-5).second;
  };
  auto h_only = [](const std::vector<Tensor>& in) {
    return add_rmsnorm(in[0], in[1], in[2], 1e-5).first;
  };
  EXPECT_TRUE(gradcheck(both, {leaf(randn({7, 13}, 251)), leaf(randn({7, 13}, 252)),
                               leaf(randn({13}, 253))}));
  EXPECT_TRUE(gradcheck(both, {leaf(randn({2, 3, 6}, 254)), leaf(randn({2, 3, 6}, 255)),
                               leaf(randn({6}, 256))}));
  EXPECT_TRUE(gradcheck(norm_only, {leaf(randn({5, 9}, 257)), leaf(randn({5, 9}, 258)),
                                    leaf(randn({9}, 259))}));
  EXPECT_TRUE(gradcheck(h_only, {leaf(randn({5, 9}, 260)), leaf(randn({5, 9}, 261)),
                                 leaf(randn({9}, 262))}));
  EXPECT_TRUE(gradcheck(both, {randn({7, 13}, 263), leaf(randn({7, 13}, 264)), randn({13}, 265)}))
      << "delta only";
  EXPECT_TRUE(
      gradcheck(both, {randn({3, 130}, 266), randn({3, 130}, 267), leaf(randn({130}, 268))}))
      << "weight only, C over one column block";
}

// The fused op's gradients against the unfused graph's (x + delta feeding rmsnorm and the rest of
// the residual stream), f64 and f32 at sizes above the OpenMP thresholds.
TEST(OpAddRmsNorm, BackwardMatchesUnfused) {
  const Shape s{301, 257};
  const Tensor x = randn(s, 271), d = randn(s, 272), w = randn({257}, 273);
  const Tensor gh = randn(s, 274), gout = randn(s, 275);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::vector<Tensor> grads[2];  // fused, unfused: dx, ddelta, dw
    for (int fused = 0; fused < 2; ++fused) {
      Tensor xl = leaf(x.to(dt)), dl = leaf(d.to(dt)), wl = leaf(w.to(dt));
      Tensor h, out;
      if (fused == 1) {
        std::tie(h, out) = add_rmsnorm(xl, dl, wl, 1e-6);
      } else {
        h = xl + dl;
        out = rmsnorm(h, wl, 1e-6);
      }
      sum(h * gh.to(dt) + out * gout.to(dt)).backward();
      grads[fused] = {xl.grad(), dl.grad(), wl.grad()};
    }
    for (size_t i = 0; i < 3; ++i) EXPECT_LT(rel_rms(grads[1][i], grads[0][i]), tol_for(dt)) << i;
  }
}

TEST(OpAddRmsNorm, BadInputsFailClearly) {
  Tensor x = randn({7, 13}, 281);
  expect_error([&] { add_rmsnorm(x, randn({7, 12}, 282), randn({13}, 283), 1e-5); },
               {"add_rmsnorm", "delta", "f64[7, 12]"});
  expect_error([&] { add_rmsnorm(x, randn({7, 13}, 284), randn({12}, 285), 1e-5); },
               {"add_rmsnorm", "f64[12]"});
}

// =================================== rope ========================================================

// Rotate-half: pairs (i, i + D/2) of x [B, T, H, D] rotated by (start + t) / base^(2i/D).
Vec rope_ref(const Vec& x, const Shape& s, double base, int64_t start) {
  const int64_t B = s[0], T = s[1], H = s[2], D = s[3], half = D / 2;
  Vec out(x.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const double a = double(start + t) / std::pow(base, double(2 * i) / double(D));
          const int64_t lo = ((b * T + t) * H + h) * D + i, hi = lo + half;
          out[lo] = x[lo] * std::cos(a) - x[hi] * std::sin(a);
          out[hi] = x[hi] * std::cos(a) + x[lo] * std::sin(a);
        }
  return out;
}

TEST(OpRope, ForwardMatchesReference) {
  const Shape s{2, 5, 3, 6};
  for (DType dt : kFloatTypes)
    for (auto [base, start] : std::vector<std::pair<double, int64_t>>{{10000.0, 0}, {100.0, 7}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " base " + std::to_string(base));
      Tensor x = randn(s, 301).to(dt);
      Tensor ref = f64(rope_ref(host(x), s, base, start), s);
      EXPECT_LT(rel_rms(rope(x, base, start), ref), tol_for(dt));
      Tensor out = poisoned(s, dt);
      cpu().rope(out, x, base, start, false);
      EXPECT_LT(rel_rms(out, ref), tol_for(dt));
    }
}

// Hand-computed rotations, independent of rope_ref: D = 4, base = 100, position 2 turns the pair
// (0, 2) by 2 rad and the pair (1, 3) by 2 / 100^(1/2) = 0.2 rad.
TEST(OpRope, KnownRotation) {
  Tensor x = f64({1, 0, 0, 1}, {1, 1, 1, 4});
  const Vec y = host(rope(x, 100.0, 2));
  const Vec expected = {std::cos(2.0), -std::sin(0.2), std::sin(2.0), std::cos(0.2)};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i], expected[i], 1e-15) << "element " << i;
}

TEST(OpRope, InverseUndoesRope) {
  const Shape s{2, 5, 3, 6};
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = randn(s, 311).to(dt), y = poisoned(s, dt), z = poisoned(s, dt);
    cpu().rope(y, x, 500.0, 3, false);
    cpu().rope(z, y, 500.0, 3, true);
    EXPECT_GT(rel_rms(y, x), 0.1) << "rope must actually rotate";
    EXPECT_LT(rel_rms(z, x), tol_for(dt));
  }
}

// Position start_pos + t only depends on the sum: rope of the window [s, e) with start_pos = s
// equals the window of rope over the whole sequence (incremental decoding relies on it).
TEST(OpRope, StartPosMatchesLaterPositions) {
  Tensor x = randn({2, 5, 3, 6}, 321);
  Tensor full = rope(x, 10000.0, 0);
  for (int64_t s = 0; s < 5; ++s)
    EXPECT_LT(rel_rms(rope(x.slice(1, s, s + 1), 10000.0, s), full.slice(1, s, s + 1)), kF64Tol)
        << "position " << s;
  EXPECT_LT(rel_rms(rope(x.slice(1, 2, 5), 10000.0, 2), full.slice(1, 2, 5)), kF64Tol);
}

TEST(OpRope, Gradcheck) {
  for (double base : {10000.0, 10.0})
    EXPECT_TRUE(gradcheck([&](const std::vector<Tensor>& in) { return rope(in[0], base, 4); },
                          {leaf(randn({2, 5, 3, 6}, 331))}))
        << "base " << base;
}

TEST(OpRope, LargeF32AgreesWithF64) {
  const Shape s{4, 67, 5, 64};
  Tensor x = randn(s, 341), dout = randn(s, 342);
  std::vector<Tensor> outs, dxs;
  for (DType dt : kFloatTypes) {
    Tensor xl = leaf(x.to(dt));
    Tensor y = rope(xl, 10000.0, 1000);
    y.backward(dout.to(dt));
    outs.push_back(y);
    dxs.push_back(xl.grad());
  }
  EXPECT_LT(rel_rms(outs[1], outs[0]), kF32Tol);
  EXPECT_LT(rel_rms(dxs[1], dxs[0]), kF32Tol);
}

TEST(OpRope, BadInputsFailClearly) {
  expect_error([&] { rope(randn({2, 5, 3, 5}, 351)); }, {"head dim 5", "odd", "HINT"});
  expect_error([&] { rope(randn({5, 3, 6}, 352)); }, {"[B, T, H, D]"});
}

// =================================== silu / swiglu ===============================================

double silu_ref(double x) { return x / (1.0 + std::exp(-x)); }

TEST(OpActivations, ForwardMatchesReference) {
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor g = randn({7, 13}, 401, DType::F64, 3.0).to(dt), u = randn({7, 13}, 402).to(dt);
    Vec silu_v, swiglu_v;
    const Vec gv = host(g), uv = host(u);
    for (size_t i = 0; i < gv.size(); ++i) {
      silu_v.push_back(silu_ref(gv[i]));
      swiglu_v.push_back(silu_ref(gv[i]) * uv[i]);
    }
    Tensor silu_r = f64(silu_v, {7, 13}), swiglu_r = f64(swiglu_v, {7, 13});
    EXPECT_LT(rel_rms(silu(g), silu_r), tol_for(dt));
    EXPECT_LT(rel_rms(swiglu(g, u), swiglu_r), tol_for(dt));
    Tensor a = poisoned({7, 13}, dt), b = poisoned({7, 13}, dt);
    cpu().silu_forward(a, g);
    cpu().swiglu_forward(b, g, u);
    EXPECT_LT(rel_rms(a, silu_r), tol_for(dt));
    EXPECT_LT(rel_rms(b, swiglu_r), tol_for(dt));
  }
}

// exp(-x) overflows for x << 0 (in f32 already at x = -89): values and gradients stay finite.
TEST(OpActivations, ExtremeInputsStayFinite) {
  const Vec xs = {-1000, -100, -30, -1, 0, 1, 30, 100, 1000};
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = leaf(f64(xs, {9}).to(dt));
    Tensor y = silu(x);
    y.backward(Tensor::ones({9}, dt));
    Vec ref, dref;
    for (double v : xs) {
      ref.push_back(silu_ref(v));
      const double s = 1.0 / (1.0 + std::exp(-v));
      dref.push_back(s * (1.0 + v * (1.0 - s)));
    }
    EXPECT_LT(rel_rms(y, f64(ref, {9})), tol_for(dt));
    EXPECT_LT(rel_rms(x.grad(), f64(dref, {9})), tol_for(dt));
  }
}

TEST(OpActivations, Gradcheck) {
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return silu(in[0]); },
                        {leaf(randn({7, 13}, 411, DType::F64, 3.0))}));
  auto f = [](const std::vector<Tensor>& in) { return swiglu(in[0], in[1]); };
  EXPECT_TRUE(
      gradcheck(f, {leaf(randn({7, 13}, 412, DType::F64, 3.0)), leaf(randn({7, 13}, 413))}));
  EXPECT_TRUE(gradcheck(f, {randn({3, 5}, 414), leaf(randn({3, 5}, 415))})) << "up only";
  EXPECT_TRUE(gradcheck(f, {leaf(randn({3, 5}, 416)), randn({3, 5}, 417)})) << "gate only";
}

TEST(OpActivations, LargeF32AgreesWithF64) {
  Tensor g = randn({301, 257}, 421, DType::F64, 3.0), u = randn({301, 257}, 422);
  Tensor dout = randn({301, 257}, 423);
  std::vector<Tensor> ys, dgs, dus, dxs;
  for (DType dt : kFloatTypes) {
    Tensor gl = leaf(g.to(dt)), ul = leaf(u.to(dt)), xl = leaf(g.to(dt));
    Tensor y = swiglu(gl, ul);
    y.backward(dout.to(dt));
    silu(xl).backward(dout.to(dt));
    ys.push_back(y);
    dgs.push_back(gl.grad());
    dus.push_back(ul.grad());
    dxs.push_back(xl.grad());
  }
  EXPECT_LT(rel_rms(ys[1], ys[0]), kF32Tol);
  EXPECT_LT(rel_rms(dgs[1], dgs[0]), kF32Tol);
  EXPECT_LT(rel_rms(dus[1], dus[0]), kF32Tol);
  EXPECT_LT(rel_rms(dxs[1], dxs[0]), kF32Tol);
}

TEST(OpActivations, BadInputsFailClearly) {
  expect_error([&] { swiglu(randn({7, 13}, 431), randn({7, 12}, 432)); }, {"shapes differ"});
  expect_error([&] { swiglu(randn({7, 13}, 433), randn({7, 13}, 434, DType::F32)); }, {"up"});
  expect_error([&] { silu(ids_tensor({1, 2}, {2})); }, {"f32 or f64", "i64[2]"});
}

// =================================== softmax =====================================================

// Row-wise softmax over the last dim of width C, with the max subtracted.
Vec softmax_ref(const Vec& x, int64_t C) {
  Vec out(x.size());
  for (size_t r = 0; r < x.size() / C; ++r) {
    double m = -INFINITY, s = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, x[r * C + c]);
    for (int64_t c = 0; c < C; ++c) s += std::exp(x[r * C + c] - m);
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = std::exp(x[r * C + c] - m) / s;
  }
  return out;
}

TEST(OpSoftmax, ForwardMatchesReference) {
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = randn({2, 3, 13}, 501, DType::F64, 3.0).to(dt);
    Tensor ref = f64(softmax_ref(host(x), 13), {2, 3, 13});
    EXPECT_LT(rel_rms(softmax(x), ref), tol_for(dt));
    Tensor out = poisoned({2, 3, 13}, dt);
    cpu().softmax_forward(out, x);
    EXPECT_LT(rel_rms(out, ref), tol_for(dt));
  }
}

// Logits near +-1000 overflow a naive exp; with the max subtracted the result equals the softmax
// of the unshifted logits. In f64, x + 1000 is rounded to ulp(1000) = 1.1e-13, which bounds the
// agreement (1e-10 leaves margin); in f32 the reference is taken on the rounded inputs.
TEST(OpSoftmax, StableForLargeLogits) {
  Tensor x = randn({7, 13}, 511);
  Tensor base = softmax(x);
  for (double shift : {1000.0, -1000.0}) {
    Tensor shifted = add(x, Tensor::full({7, 13}, shift, DType::F64));
    EXPECT_LT(rel_rms(softmax(shifted), base), 1e-10) << "shift " << shift;
    Tensor xf = shifted.to(DType::F32);
    EXPECT_LT(rel_rms(softmax(xf), f64(softmax_ref(host(xf), 13), {7, 13})), kF32Tol);
  }
}

TEST(OpSoftmax, Gradcheck) {
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& in) { return softmax(in[0]); },
                        {leaf(randn({2, 3, 13}, 521, DType::F64, 2.0))}));
}

TEST(OpSoftmax, LargeF32AgreesWithF64) {
  Tensor x = randn({301, 257}, 531, DType::F64, 3.0), dout = randn({301, 257}, 532);
  std::vector<Tensor> ys, dxs;
  for (DType dt : kFloatTypes) {
    Tensor xl = leaf(x.to(dt));
    Tensor y = softmax(xl);
    y.backward(dout.to(dt));
    ys.push_back(y);
    dxs.push_back(xl.grad());
  }
  EXPECT_LT(rel_rms(ys[1], ys[0]), kF32Tol);
  EXPECT_LT(rel_rms(dxs[1], dxs[0]), kF32Tol);
}

TEST(OpSoftmax, BadInputsFailClearly) {
  expect_error([&] { softmax(ids_tensor({1, 2}, {1, 2}, DType::I32)); }, {"f32 or f64", "i32"});
}

// =================================== cross_entropy ===============================================

constexpr int64_t kIgnore = -100;

// losses[n] = logsumexp(logits[n]) - logits[n, t_n] (0 for ignored rows), from plain loops.
Vec ce_rows_ref(const Vec& logits, const std::vector<int64_t>& targets, int64_t V, int64_t ignore) {
  Vec losses;
  for (size_t n = 0; n < targets.size(); ++n) {
    if (targets[n] == ignore) {
      losses.push_back(0.0);
      continue;
    }
    double m = -INFINITY, s = 0;
    for (int64_t c = 0; c < V; ++c) m = std::max(m, logits[n * V + c]);
    for (int64_t c = 0; c < V; ++c) s += std::exp(logits[n * V + c] - m);
    losses.push_back(m + std::log(s) - logits[n * V + targets[n]]);
  }
  return losses;
}

// Targets for N rows over V classes with rows 1 and 4 ignored.
std::vector<int64_t> ce_targets(int64_t N, int64_t V, uint64_t seed) {
  std::vector<int64_t> t = random_ids(N, V, seed);
  t[1] = t[4] = kIgnore;
  return t;
}

TEST(OpCrossEntropy, ForwardMatchesReference) {
  const int64_t N = 7, V = 13;
  const std::vector<int64_t> targets = ce_targets(N, V, 601);
  for (DType dt : kFloatTypes)
    for (DType it : {DType::I32, DType::I64}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " logits, " + dtype_name(it) + " targets");
      Tensor logits = randn({N, V}, 602, DType::F64, 3.0).to(dt);
      Tensor tt = ids_tensor(targets, {N}, it);
      const Vec rows = ce_rows_ref(host(logits), targets, V, kIgnore);
      double total = 0;
      for (double l : rows) total += l;
      Tensor loss = cross_entropy(logits, tt, kIgnore);
      EXPECT_EQ(loss.shape(), Shape{});
      EXPECT_LT(rel_rms(loss, f64({total / 5.0}, {})), tol_for(dt)) << "mean over 5 valid rows";
      Tensor raw = poisoned({N}, dt);
      cpu().cross_entropy_forward(raw, logits, tt, kIgnore);
      EXPECT_LT(rel_rms(raw, f64(rows, {N})), tol_for(dt));
      EXPECT_EQ(host(raw)[1], 0.0);
      EXPECT_EQ(host(raw)[4], 0.0);
    }
}

// The loss is -mean over valid rows of log softmax(logits)[target], computed here through the
// softmax op: an independent path to the same number.
TEST(OpCrossEntropy, EqualsMeanNegativeLogSoftmax) {
  const int64_t N = 7, V = 13;
  const std::vector<int64_t> targets = ce_targets(N, V, 611);
  Tensor logits = randn({N, V}, 612, DType::F64, 3.0);
  const Vec p = host(softmax(logits));
  double acc = 0;
  int valid = 0;
  for (int64_t n = 0; n < N; ++n)
    if (targets[n] != kIgnore) {
      acc -= std::log(p[n * V + targets[n]]);
      ++valid;
    }
  Tensor loss = cross_entropy(logits, ids_tensor(targets, {N}), kIgnore);
  EXPECT_LT(rel_rms(loss, f64({acc / valid}, {})), kF64Tol);
  // The count given by a caller that knows it (the trainer) instead of counted here.
  Tensor given = cross_entropy(logits, ids_tensor(targets, {N}), kIgnore, valid);
  EXPECT_EQ(given.item<double>(), loss.item<double>());
  testing::expect_error([&] { cross_entropy(logits, ids_tensor(targets, {N}), kIgnore, N + 1); },
                        {"valid_count 8 for 7 targets"});
}

TEST(OpCrossEntropy, Gradcheck) {
  const int64_t N = 7, V = 13;
  auto check = [&](const std::vector<int64_t>& targets, int64_t ignore, uint64_t seed) {
    Tensor tt = ids_tensor(targets, {N});
    auto f = [&](const std::vector<Tensor>& in) { return cross_entropy(in[0], tt, ignore); };
    return gradcheck(f, {leaf(randn({N, V}, seed, DType::F64, 2.0))});
  };
  EXPECT_TRUE(check(ce_targets(N, V, 621), kIgnore, 622)) << "with ignored rows";
  EXPECT_TRUE(check(random_ids(N, V, 623), kIgnore, 624)) << "no ignored rows";
  EXPECT_TRUE(check({3, 0, 3, 12, 5, 3, 1}, 3, 625)) << "ignore_index inside [0, V)";
}

TEST(OpCrossEntropy, IgnoredRowsGetZeroGradient) {
  const int64_t N = 7, V = 13;
  const std::vector<int64_t> targets = ce_targets(N, V, 631);
  Tensor logits = leaf(randn({N, V}, 632));
  cross_entropy(logits, ids_tensor(targets, {N}), kIgnore).backward();
  const Vec g = host(logits.grad());
  for (int64_t n = 0; n < N; ++n) {
    double row_sum = 0, row_abs = 0;
    for (int64_t c = 0; c < V; ++c) {
      row_sum += g[n * V + c];
      row_abs += std::abs(g[n * V + c]);
    }
    if (targets[n] == kIgnore) {
      EXPECT_EQ(row_abs, 0.0) << "ignored row " << n;
    } else {
      EXPECT_GT(row_abs, 0.1) << "row " << n;
      // 13 terms each rounded near 1e-16 relative to lse (~3): 1e-12 is far above rounding.
      EXPECT_NEAR(row_sum, 0.0, 1e-12) << "softmax - onehot sums to 0, row " << n;
      EXPECT_LT(g[n * V + targets[n]], 0.0) << "the target logit's gradient is negative";
    }
  }
}

TEST(OpCrossEntropy, AllIgnoredGivesZeroLossAndGradient) {
  for (DType dt : kFloatTypes) {
    Tensor logits = leaf(randn({3, 5}, 641).to(dt));
    Tensor loss = cross_entropy(logits, ids_tensor({-1, -1, -1}, {3}), -1);
    loss.backward();
    EXPECT_EQ(loss.item<double>(), 0.0);
    for (double v : host(logits.grad())) EXPECT_EQ(v, 0.0);
  }
}

// Per-row upstream gradients (not only the mean's uniform 1/n) through the backward kernel.
TEST(OpCrossEntropy, BackwardKernelMatchesReference) {
  const int64_t N = 7, V = 13;
  const std::vector<int64_t> targets = ce_targets(N, V, 651);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor logits = randn({N, V}, 652, DType::F64, 3.0).to(dt), dl = randn({N}, 653).to(dt);
    const Vec x = host(logits), d = host(dl);
    Vec ref(N * V, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      if (targets[n] == kIgnore) continue;
      const Vec p = softmax_ref(Vec(x.begin() + n * V, x.begin() + (n + 1) * V), V);
      for (int64_t c = 0; c < V; ++c) ref[n * V + c] = d[n] * (p[c] - (c == targets[n]));
    }
    Tensor dlogits = poisoned({N, V}, dt);
    Tensor tt = ids_tensor(targets, {N}, DType::I32);
    cpu().cross_entropy_backward(dlogits, logits, tt, dl, kIgnore);
    EXPECT_LT(rel_rms(dlogits, f64(ref, {N, V})), tol_for(dt));
  }
}

TEST(OpCrossEntropy, LargeF32AgreesWithF64) {
  const int64_t N = 301, V = 257;
  Tensor logits = randn({N, V}, 661, DType::F64, 4.0);
  Tensor tt = ids_tensor(ce_targets(N, V, 662), {N});
  std::vector<Tensor> losses, grads;
  for (DType dt : kFloatTypes) {
    Tensor l = leaf(logits.to(dt));
    Tensor loss = cross_entropy(l, tt, kIgnore);
    loss.backward();
    losses.push_back(loss);
    grads.push_back(l.grad());
  }
  EXPECT_LT(rel_rms(losses[1], losses[0]), kF32Tol);
  EXPECT_LT(rel_rms(grads[1], grads[0]), kF32Tol);
}

TEST(OpCrossEntropy, BadInputsFailClearly) {
  Tensor logits = randn({7, 13}, 671);
  auto targets = [](std::vector<int64_t> t) { return ids_tensor(t, {int64_t(t.size())}); };
  expect_error([&] { cross_entropy(logits, targets({0, 1, 13, 2, 3, 4, 5})); },
               {"target 13", "row 2", "[0, 13)", "HINT"});
  expect_error([&] { cross_entropy(logits, targets({0, 1, 2, 3, -1, 4, 5})); },
               {"target -1", "row 4", "ignore_index (-100)"});
  expect_error([&] { cross_entropy(logits, randn({7}, 672)); }, {"i32 or i64"});
  expect_error([&] { cross_entropy(logits, targets({0, 1, 2, 3, 4, 5})); }, {"[N, V]", "i64[6]"});
  expect_error([&] { cross_entropy(randn({2, 7, 13}, 673), targets({0, 1})); },
               {"HINT", "reshape"});
  Tensor dlogits = Tensor::empty({7, 13}, DType::F64);
  expect_error([&] {
    cpu().cross_entropy_backward(dlogits, logits, targets({0, 1, 2, 3, 4, 5, 99}), randn({7}, 674),
                                 kIgnore);
  }, {"target 99", "row 6"});
}

}  // namespace
}  // namespace nha
