// AdamW (kernel and optimizer class) and gradient-norm clipping against hand-computed formulas;
// the flat-buffer optimizer against per-tensor steps, its bf16 copies, flat gradient clipping; the
// sharded optimizer (ZeRO-1) of two ranks, simulated in one process, against the unsharded one.
#include <cmath>
#include <limits>

#include "autograd/autocast.h"
#include "common/testing.h"
#include "kernels/backend.h"
#include "train/flat_grads.h"
#include "train/optim.h"

namespace nha {
namespace {

using testing::randn;

// Reference AdamW state for one tensor, in double, straight from the formula in kernels/backend.h.
struct RefAdamW {
  std::vector<double> p, m, v;
  void step(const std::vector<double>& g, double lr, double b1, double b2, double eps, double wd,
            int64_t t) {
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    for (size_t i = 0; i < p.size(); ++i) {
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double mhat = m[i] / (1 - std::pow(b1, double(t)));
      const double vhat = v[i] / (1 - std::pow(b2, double(t)));
      p[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * p[i]);
    }
  }
};

double max_rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = std::abs(a[i] - b[i]) / std::max(1e-30, std::abs(b[i]));
    if (!std::isfinite(a[i])) return INFINITY;
    worst = std::max(worst, d);
  }
  return worst;
}

TEST(AdamW, KernelOneStepMatchesFormula) {
  for (DType dt : {DType::F64, DType::F32}) {
    const Shape shape{3, 7};
    Tensor p = randn(shape, 1, dt), g = randn(shape, 2, dt);
    Tensor m = randn(shape, 3, dt, 0.1), v = randn(shape, 4, dt, 0.1);
    v.copy_(Tensor::from_vector<double>([&] {  // second moments are non-negative
      std::vector<double> x = v.to_vector<double>();
      for (double& e : x) e = e * e;
      return x;
    }(), shape));
    RefAdamW ref{p.to_vector<double>(), m.to_vector<double>(), v.to_vector<double>()};
    ref.step(g.to_vector<double>(), 0.01, 0.8, 0.9, 1e-8, 0.1, 5);
    backend_for(p).adamw_step(p, g, m, v, 0.01, 0.8, 0.9, 1e-8, 0.1, 5);
    const double tol = dt == DType::F64 ? 1e-14 : 1e-6;
    EXPECT_LT(max_rel_diff(p.to_vector<double>(), ref.p), tol) << dtype_name(dt);
    EXPECT_LT(max_rel_diff(m.to_vector<double>(), ref.m), tol) << dtype_name(dt);
    EXPECT_LT(max_rel_diff(v.to_vector<double>(), ref.v), tol) << dtype_name(dt);
  }
}

TEST(AdamW, FirstStepIsBiasCorrected) {
  // At step 1, mhat = g and vhat = g^2: the update is lr * g / (|g| + eps), about lr * sign(g),
  // whatever the betas. Without bias correction it would be lr * (1-b1)/sqrt(1-b2) * sign(g).
  Tensor p = Tensor::from_vector<double>({1.0, -2.0, 0.5, 3.0}, {4}).set_requires_grad(true);
  std::vector<double> g{0.3, -4.0, 1e-3, 0.0};
  p.mutable_grad() = Tensor::from_vector<double>(g, {4});
  AdamW opt({{"p", p, true}}, {.lr = 0.1, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8});
  opt.step();
  EXPECT_EQ(opt.step_count(), 1);
  std::vector<double> after = p.to_vector<double>();
  const double before[4] = {1.0, -2.0, 0.5, 3.0};
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(after[i], before[i] - 0.1 * g[i] / (std::abs(g[i]) + 1e-8), 1e-15) << i;
  EXPECT_NEAR(after[0], 0.9, 1e-7);
  EXPECT_NEAR(after[1], -1.9, 1e-7);
  EXPECT_EQ(after[3], 3.0);  // zero gradient, no decay: unchanged
  // Moments after one step: m = (1-b1) g, v = (1-b2) g^2 (1 - 0.9 is not the double 0.1).
  std::vector<double> m = opt.m(0).to_vector<double>(), v = opt.v(0).to_vector<double>();
  for (int i = 0; i < 4; ++i) {
    EXPECT_DOUBLE_EQ(m[i], (1 - 0.9) * g[i]);
    EXPECT_DOUBLE_EQ(v[i], (1 - 0.95) * g[i] * g[i]);
  }
}

TEST(AdamW, SeveralStepsMatchFormulaAndDecayOnlyWhereAsked) {
  const Shape shape{4, 5};
  Tensor a = randn(shape, 10).set_requires_grad(true);  // decay
  Tensor b = a.detach().clone().set_requires_grad(true);  // same values, no decay
  AdamWOptions o{.lr = 0.05, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  AdamW opt({{"a", a, true}, {"b", b, false}}, o);
  RefAdamW ra{a.to_vector<double>()}, rb{b.to_vector<double>()};
  const double lrs[4] = {0.05, 0.03, 0.02, 0.01};
  for (int t = 1; t <= 4; ++t) {
    Tensor g = randn(shape, 100 + t);
    a.mutable_grad() = g.clone();
    b.mutable_grad() = g.clone();
    opt.step(lrs[t - 1]);
    ra.step(g.to_vector<double>(), lrs[t - 1], 0.9, 0.95, 1e-8, 0.1, t);
    rb.step(g.to_vector<double>(), lrs[t - 1], 0.9, 0.95, 1e-8, 0.0, t);
    EXPECT_LT(max_rel_diff(a.to_vector<double>(), ra.p), 1e-13) << "step " << t;
    EXPECT_LT(max_rel_diff(b.to_vector<double>(), rb.p), 1e-13) << "step " << t;
    EXPECT_LT(max_rel_diff(opt.m(0).to_vector<double>(), ra.m), 1e-13);
    EXPECT_LT(max_rel_diff(opt.v(1).to_vector<double>(), rb.v), 1e-13);
  }
  EXPECT_EQ(opt.step_count(), 4);
  // Same grads, so the two differ only by decay, and visibly so.
  EXPECT_GT(testing::max_abs_diff(a, b), 1e-4);
}

TEST(AdamW, FloatParamsKeepFloatMoments) {
  const Shape shape{64};
  Tensor p = randn(shape, 20, DType::F32).set_requires_grad(true);
  AdamW opt({{"p", p, true}}, {.lr = 1e-2, .weight_decay = 0.01});
  EXPECT_EQ(opt.m(0).dtype(), DType::F32);
  EXPECT_EQ(opt.v(0).dtype(), DType::F32);
  EXPECT_EQ(opt.m(0).to_vector<double>(), std::vector<double>(64, 0.0));
  RefAdamW ref{p.to_vector<double>()};
  for (int t = 1; t <= 3; ++t) {
    Tensor g = randn(shape, 200 + t, DType::F32);
    p.mutable_grad() = g;
    opt.step();
    ref.step(g.to_vector<double>(), 1e-2, 0.9, 0.95, 1e-8, 0.01, t);
  }
  // f32 state rounds every step: compare by relative RMS (an element near 0 has no relative bound).
  EXPECT_LT(testing::rel_rms(p, Tensor::from_vector<double>(ref.p, shape)), 1e-6);
}

TEST(AdamW, ParamsWithoutGradAreUntouched) {
  Tensor a = randn({3, 3}, 30).set_requires_grad(true);
  Tensor b = randn({5}, 31).set_requires_grad(true);
  const std::vector<double> b0 = b.to_vector<double>();
  AdamW opt({{"a", a, true}, {"b", b, true}}, {.lr = 0.1, .weight_decay = 0.5});
  for (int t = 0; t < 3; ++t) {
    a.mutable_grad() = randn({3, 3}, 40 + t);
    opt.step();
  }
  EXPECT_EQ(b.to_vector<double>(), b0) << "no grad: no update, not even weight decay";
  EXPECT_EQ(opt.m(1).to_vector<double>(), std::vector<double>(5, 0.0));
  EXPECT_EQ(opt.v(1).to_vector<double>(), std::vector<double>(5, 0.0));
  EXPECT_EQ(opt.step_count(), 3);
  EXPECT_NE(opt.m(0).to_vector<double>(), std::vector<double>(9, 0.0));
}

TEST(AdamW, StepAfterBackwardAndZeroGrad) {
  // loss = sum(p * p): grad = 2p; one step moves every element toward 0 by about lr.
  Tensor p = Tensor::from_vector<double>({1.0, -2.0, 3.0}, {3}).set_requires_grad(true);
  AdamW opt({{"w", p, true}}, {.lr = 0.1});
  sum(mul(p, p)).backward();
  ASSERT_TRUE(p.grad().defined());
  opt.step();
  std::vector<double> x = p.to_vector<double>();
  EXPECT_NEAR(x[0], 0.9, 1e-7);
  EXPECT_NEAR(x[1], -1.9, 1e-7);
  EXPECT_NEAR(x[2], 2.9, 1e-7);
  opt.zero_grad();
  EXPECT_FALSE(p.grad().defined());
  EXPECT_TRUE(p.requires_grad()) << "the step must not change requires_grad";
  EXPECT_EQ(opt.index_of("w"), 0u);
  EXPECT_THROW(opt.index_of("nope"), Error);
}

TEST(AdamW, RejectsBadConfig) {
  Tensor p = randn({2}, 1);
  EXPECT_THROW(AdamW({{"p", p, true}, {"p", p.clone(), true}}, {}), Error);  // duplicate name
  EXPECT_THROW(AdamW({{"p", p, true}}, {.beta1 = 1.0}), Error);
  EXPECT_THROW(AdamW({{"p", Tensor(), true}}, {}), Error);
}

TEST(AdamW, ClipGradNormReturnsNormAndScales) {
  Tensor a = Tensor::zeros({2}, DType::F64).set_requires_grad(true);
  Tensor b = Tensor::zeros({2, 2}, DType::F64).set_requires_grad(true);
  Tensor c = Tensor::zeros({3}, DType::F64).set_requires_grad(true);  // no grad: ignored
  auto set_grads = [&] {
    a.mutable_grad() = Tensor::from_vector<double>({3.0, 0.0}, {2});
    b.mutable_grad() = Tensor::from_vector<double>({0.0, 4.0, 0.0, 12.0}, {2, 2});
  };
  // ||(3, 4, 12)|| = 13.
  set_grads();
  EXPECT_DOUBLE_EQ(clip_grad_norm({a, b, c}, 0.0), 13.0);  // max_norm <= 0: norm only
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{3.0, 0.0}));
  EXPECT_DOUBLE_EQ(clip_grad_norm({a, b, c}, 20.0), 13.0);  // below the threshold: untouched
  EXPECT_EQ(b.grad().to_vector<double>(), (std::vector<double>{0.0, 4.0, 0.0, 12.0}));
  EXPECT_DOUBLE_EQ(clip_grad_norm({a, b, c}, 13.0), 13.0);  // equal: untouched
  EXPECT_EQ(b.grad().to_vector<double>(), (std::vector<double>{0.0, 4.0, 0.0, 12.0}));
  EXPECT_FALSE(c.grad().defined());

  EXPECT_DOUBLE_EQ(clip_grad_norm({a, b, c}, 1.0), 13.0);  // clipped: returns the norm before
  const double f = 1.0 / (13.0 + 1e-6);
  std::vector<double> ga = a.grad().to_vector<double>(), gb = b.grad().to_vector<double>();
  EXPECT_DOUBLE_EQ(ga[0], 3.0 * f);
  EXPECT_DOUBLE_EQ(gb[1], 4.0 * f);
  EXPECT_DOUBLE_EQ(gb[3], 12.0 * f);
  EXPECT_NEAR(clip_grad_norm({a, b, c}, 0.0), 1.0, 1e-6);  // now (just under) max_norm
  EXPECT_LT(clip_grad_norm({a, b, c}, 0.0), 1.0);
}

TEST(AdamW, ClipGradNormFloat) {
  Tensor a = randn({1000}, 50, DType::F32).set_requires_grad(true);
  a.mutable_grad() = randn({1000}, 51, DType::F32);
  double ref = 0;
  for (double g : a.grad().to_vector<double>()) ref += g * g;
  ref = std::sqrt(ref);
  EXPECT_NEAR(clip_grad_norm({a}, 0.5), ref, 1e-6 * ref);
  double after = 0;
  for (double g : a.grad().to_vector<double>()) after += g * g;
  EXPECT_NEAR(std::sqrt(after), 0.5, 1e-5);
}

// ---- flat buffers -------------------------------------------------------------------------------

// f32 leaves of odd sizes (the flat layout pads between them).
std::vector<Tensor> odd_params(uint64_t seed) {
  std::vector<Tensor> ps;
  for (const Shape& s : {Shape{3, 7}, Shape{64}, Shape{5}, Shape{2, 3, 4}, Shape{129}})
    ps.push_back(randn(s, seed + ps.size(), DType::F32).set_requires_grad(true));
  return ps;
}

std::vector<ParamEntry> named_entries(const std::vector<Tensor>& ps,
                                      const std::vector<bool>& decay) {
  std::vector<ParamEntry> e;
  for (size_t i = 0; i < ps.size(); ++i) e.push_back({"p" + std::to_string(i), ps[i], decay[i]});
  return e;
}

// Element values as doubles: equal vectors mean equal bits (f32 and bf16 convert exactly).
std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

TEST(AdamWFlat, SameBitsAsPerTensorSteps) {
  const std::vector<bool> decay = {true, false, true, false, true};
  for (bool flat_grads : {false, true}) {
    SCOPED_TRACE(flat_grads ? "flat gradients" : "separate gradients (gathered)");
    std::vector<Tensor> ps = odd_params(300), ref, rm, rv;  // ref: the per-tensor run
    for (const Tensor& p : ps) {
      ref.push_back(p.detach().clone());
      rm.push_back(Tensor::zeros(p.shape()));
      rv.push_back(Tensor::zeros(p.shape()));
    }
    AdamW opt(named_entries(ps, decay), {.lr = 0.05, .weight_decay = 0.1});
    std::unique_ptr<FlatGrads> fg;
    if (flat_grads) fg = std::make_unique<FlatGrads>(ps, std::numeric_limits<int64_t>::max());
    for (int t = 1; t <= 4; ++t) {
      const double lr = 0.05 / t;
      if (fg) fg->zero_grad();
      for (size_t i = 0; i < ps.size(); ++i) {
        // Parameter 2 has no gradient in even steps (separate gradients: undefined, so untouched;
        // flat gradients: zeros, the data-parallel semantics).
        const bool none = i == 2 && t % 2 == 0;
        Tensor g = none ? Tensor::zeros(ps[i].shape())
                        : randn(ps[i].shape(), 400 + 10 * t + i, DType::F32);
        if (fg) {
          ps[i].mutable_grad().copy_(g);
        } else {
          ps[i].mutable_grad() = none ? Tensor() : g;
          if (none) continue;
        }
        backend_for(g).adamw_step(ref[i], g, rm[i], rv[i], lr, 0.9, 0.95, 1e-8,
                                  decay[i] ? 0.1 : 0.0, t);
      }
      opt.step(lr);
      for (size_t i = 0; i < ps.size(); ++i) {
        SCOPED_TRACE("step " + std::to_string(t) + ", parameter " + std::to_string(i));
        EXPECT_EQ(values(ps[i]), values(ref[i]));
        EXPECT_EQ(values(opt.m(i)), values(rm[i]));
        EXPECT_EQ(values(opt.v(i)), values(rv[i]));
      }
    }
    EXPECT_NE(values(ps[0]), values(odd_params(300)[0])) << "the steps moved the parameters";
  }
}

TEST(AdamWFlat, ParametersBecomeViewsOfOneBuffer) {
  std::vector<Tensor> ps = odd_params(310);
  const std::vector<double> before = values(ps[3]);
  Tensor alias = ps[3];  // another handle to the same parameter (as a module holds it)
  AdamW opt(named_entries(ps, {true, true, true, true, true}), {});
  for (size_t i = 1; i < ps.size(); ++i) {
    EXPECT_TRUE(ps[i].impl()->storage == ps[0].impl()->storage) << i;
    EXPECT_TRUE(opt.m(i).impl()->storage == opt.m(0).impl()->storage) << i;
    EXPECT_TRUE(ps[i].requires_grad());
  }
  EXPECT_EQ(values(alias), before) << "the handle sees the same values at the new place";
  EXPECT_EQ(alias.data_ptr(), ps[3].data_ptr());
  EXPECT_FALSE(opt.copy(0).defined()) << "no copies unless asked for";
}

TEST(AdamWFlat, Bf16CopiesAreCastsOfTheMasters) {
  std::vector<Tensor> ps = odd_params(320);
  AdamW opt(named_entries(ps, {true, false, true, false, true}), {.lr = 0.1, .weight_decay = 0.1},
            DType::BF16);
  auto expect_copies_current = [&](const std::string& when) {
    for (size_t i = 0; i < ps.size(); ++i) {
      ASSERT_EQ(opt.copy(i).dtype(), DType::BF16);
      EXPECT_EQ(values(opt.copy(i)), values(ps[i].to(DType::BF16))) << when << ", parameter " << i;
    }
  };
  expect_copies_current("at construction");
  for (int t = 1; t <= 3; ++t) {
    for (size_t i = 0; i < ps.size(); ++i)
      ps[i].mutable_grad() = i == 2 ? Tensor() : randn(ps[i].shape(), 500 + 10 * t + i, DType::F32);
    opt.step();
    expect_copies_current("after step " + std::to_string(t));
  }
  AutocastGuard bf16(DType::BF16);
  EXPECT_EQ(autocast(ps[0]).data_ptr(), opt.copy(0).data_ptr()) << "autocast uses the copy";
  // A write to a master behind the optimizer's back (a checkpoint load): no copy is used until
  // the next step has written them all again, parameter 2 (no gradient) included.
  {
    autograd::NoGradGuard no_grad;
    ps[2].copy_(randn(ps[2].shape(), 530, DType::F32));
  }
  const Tensor cast = autocast(ps[0]);
  EXPECT_NE(cast.data_ptr(), opt.copy(0).data_ptr()) << "a stale copy must not be used";
  EXPECT_EQ(values(cast), values(ps[0].to(DType::BF16)));
  opt.step();
  expect_copies_current("after the step that follows the write");
  EXPECT_EQ(autocast(ps[2]).data_ptr(), opt.copy(2).data_ptr());
}

TEST(AdamWFlat, AutocastCopyGivesTheCastsGradient) {
  Tensor p = randn({4, 6}, 540, DType::F32).set_requires_grad(true);
  Tensor q = p.detach().clone().set_requires_grad(true);  // same values, no copy
  AdamW opt({{"p", p, true}}, {}, DType::BF16);
  const Tensor c = randn({4, 6}, 541, DType::F32);
  {
    AutocastGuard bf16(DType::BF16);
    const Tensor a = autocast(p), b = autocast(q);
    EXPECT_EQ(a.data_ptr(), opt.copy(0).data_ptr());
    EXPECT_NE(b.data_ptr(), opt.copy(0).data_ptr());
    EXPECT_EQ(a.dtype(), DType::BF16);
    EXPECT_EQ(values(a), values(b));
    sum(a.to(DType::F32) * c).backward();
    sum(b.to(DType::F32) * c).backward();
  }
  ASSERT_TRUE(p.grad().defined());
  EXPECT_EQ(p.grad().dtype(), DType::F32) << "the master's gradient is fp32";
  EXPECT_EQ(values(p.grad()), values(q.grad()));
}

TEST(AdamWFlat, RefusesWhatItCannotLayOut) {
  Tensor a = randn({3}, 550, DType::F32).set_requires_grad(true);
  testing::expect_error([&] { AdamW({{"a", a, true}, {"b", randn({2}, 551), true}}, {}); },
                        {"AdamW", "'b'", "one device and dtype"});
  testing::expect_error([&] { AdamW({{"a", a, true}, {"b", a, true}}, {}); },
                        {"AdamW", "'b'", "another name"});
  testing::expect_error([&] { AdamW({{"a", randn({3}, 552)}}, {}, DType::BF16); },
                        {"bf16 copy", "f32"});
  AdamW opt({{"a", a, true}}, {});
  a.set_data(a.detach().clone());  // what Module::to does
  a.mutable_grad() = randn({3}, 553, DType::F32);
  testing::expect_error([&] { opt.step(); }, {"'a'", "flat buffer", "HINT"});
}

TEST(ClipGradNormFlat, MatchesPerTensorClipping) {
  std::vector<Tensor> ps, qs;  // f64: the two sums agree to rounding
  for (const Shape& s : {Shape{3, 7}, Shape{65}, Shape{5}}) {
    ps.push_back(randn(s, 560 + ps.size()).set_requires_grad(true));
    qs.push_back(ps.back().detach().clone().set_requires_grad(true));
  }
  FlatGrads fg(ps, std::numeric_limits<int64_t>::max());
  for (size_t i = 0; i < ps.size(); ++i) {
    const Tensor g = randn(ps[i].shape(), 570 + i);
    ps[i].mutable_grad().copy_(g);
    qs[i].mutable_grad() = g.clone();
  }
  const double norm = clip_grad_norm(qs, 0.0);
  EXPECT_NEAR(clip_grad_norm_flat(fg.buffer(), 0.0), norm, 1e-12 * norm);
  EXPECT_NEAR(clip_grad_norm_flat(fg.buffer(), 2 * norm), norm, 1e-12 * norm) << "no clipping";
  EXPECT_NEAR(clip_grad_norm_flat(fg.buffer(), norm / 3), norm, 1e-12 * norm);
  clip_grad_norm(qs, norm / 3);
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(fg.holds(i)) << "scaled in place";
    EXPECT_LT(testing::rel_rms(ps[i].grad(), qs[i].grad()), 1e-14) << i;
  }
  EXPECT_NEAR(clip_grad_norm_flat(fg.buffer(), 0.0), norm / 3, 1e-6);
  // The padding between the gradients stays zero: the whole buffer's norm is theirs.
  EXPECT_NEAR(std::sqrt(sum(mul(fg.buffer(), fg.buffer())).item<double>()), norm / 3, 1e-6);
  // zero_grad zeroes and puts the views back after something replaced a gradient.
  ps[1].mutable_grad() = Tensor();
  EXPECT_FALSE(fg.holds(1));
  fg.zero_grad();
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_TRUE(fg.holds(i));
  EXPECT_EQ(clip_grad_norm_flat(fg.buffer(), 0.0), 0.0);
}

// ---- sharded (ZeRO-1) ---------------------------------------------------------------------------

// The two ranks of ZeRO-1 in one process: each optimizer updates its slices from its shard of the
// gradients, then each receives the other's slices (what the all-gather does). The parameters,
// their bf16 copies and the moments (gathered as for a checkpoint) have the unsharded optimizer's
// bits; the clipping norm from the two partial sums of squares is the whole buffer's.
TEST(AdamWSharded, TwoShardsGiveTheUnshardedBits) {
  constexpr int kShards = 2;
  constexpr int64_t kBucket = 256;  // elements: several buckets over odd_params
  const std::vector<bool> decay = {true, false, true, false, true};
  const AdamWOptions options{.lr = 0.05, .weight_decay = 0.1};
  std::vector<Tensor> ps = odd_params(600);
  AdamW whole(named_entries(ps, decay), options);
  FlatGrads whole_grads(ps, std::numeric_limits<int64_t>::max());
  std::vector<std::vector<Tensor>> rps;               // (shards,) each rank's parameters
  std::vector<std::unique_ptr<AdamW>> ropt;           // (shards,)
  std::vector<std::unique_ptr<FlatGrads>> rgrads;     // (shards,) laid out like ropt's
  for (int r = 0; r < kShards; ++r) {
    rps.push_back(odd_params(600));
    rgrads.push_back(std::make_unique<FlatGrads>(rps[r], kBucket, flat_align(kShards)));
    ropt.push_back(std::make_unique<AdamW>(named_entries(rps[r], decay), options, DType::BF16,
                                           OptimizerShard{r, kShards, kBucket}));
  }
  ASSERT_GT(rgrads[0]->plan().buckets.size(), 1u);
  // m and v of half the elements each: as many bytes as the parameters.
  EXPECT_EQ(ropt[0]->state_bytes(), int64_t(ropt[0]->flat_parameters().nbytes()));
  for (int t = 1; t <= 3; ++t) {
    for (size_t i = 0; i < ps.size(); ++i) {
      const Tensor g = randn(ps[i].shape(), 610 + 10 * t + i, DType::F32);
      ps[i].mutable_grad().copy_(g);
      for (int r = 0; r < kShards; ++r) rps[r][i].mutable_grad().copy_(g);
    }
    const double max_norm = 2.0;  // below the norm: clipping scales
    const double norm = clip_grad_norm_flat(whole_grads.buffer(), max_norm);
    whole.step(0.05);
    std::vector<Tensor> shards;  // (shards,) each (total / shards,): rank r's gradient slices
    for (int r = 0; r < kShards; ++r) {
      shards.push_back(Tensor::zeros({ropt[r]->shard_elements()}));
      for (const ShardSlice& sl : ropt[r]->slices())
        shards[r].slice(0, sl.shard_offset, sl.shard_offset + sl.size)
            .copy_(rgrads[r]->buffer().slice(0, sl.begin, sl.begin + sl.size));
    }
    // Every rank's norm from the sum of both ranks' sums of squares (the first calls, which do
    // not clip, only record them).
    std::vector<double> partial(kShards);
    for (int r = 0; r < kShards; ++r)
      clip_grad_norm_flat(shards[r], 0.0, [&](double s) { return partial[r] = s; });
    for (int r = 0; r < kShards; ++r) {
      const double sharded_norm = clip_grad_norm_flat(
          shards[r], max_norm, [&](double) { return partial[0] + partial[1]; });
      EXPECT_NEAR(sharded_norm, norm, 1e-12 * norm);
      std::vector<size_t> updated;  // the slices in the order after_slice saw them
      ropt[r]->step(0.05, shards[r], [&](size_t k) { updated.push_back(k); });
      ASSERT_EQ(updated.size(), ropt[r]->slices().size());
      for (size_t k = 0; k < updated.size(); ++k) EXPECT_EQ(updated[k], k);
    }
    for (int r = 0; r < kShards; ++r)  // the all-gather
      for (const ShardSlice& sl : ropt[r]->slices())
        ropt[1 - r]->flat_parameters().slice(0, sl.begin, sl.begin + sl.size)
            .copy_(ropt[r]->flat_parameters().slice(0, sl.begin, sl.begin + sl.size));
    for (int r = 0; r < kShards; ++r) {
      ropt[r]->parameters_written();
      for (size_t i = 0; i < ps.size(); ++i) {
        EXPECT_EQ(values(rps[r][i]), values(ps[i])) << "step " << t << ", rank " << r << ", " << i;
        EXPECT_EQ(values(ropt[r]->copy(i)), values(ps[i].to(DType::BF16))) << "bf16 copy " << i;
      }
    }
  }
  // The moments of both ranks, gathered as for a checkpoint, are the unsharded ones; a load keeps
  // a rank's own slices.
  AdamW& root = *ropt[0];
  root.allocate_full_moments();
  for (int r = 0; r < kShards; ++r)
    for (const ShardSlice& sl : ropt[r]->slices()) {
      const int64_t a = sl.shard_offset, b = sl.shard_offset + sl.size;
      root.full_m().slice(0, sl.begin, sl.begin + sl.size).copy_(ropt[r]->m_shard().slice(0, a, b));
      root.full_v().slice(0, sl.begin, sl.begin + sl.size).copy_(ropt[r]->v_shard().slice(0, a, b));
    }
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(values(root.m(i)), values(whole.m(i))) << i;
    EXPECT_EQ(values(root.v(i)), values(whole.v(i))) << i;
  }
  const std::vector<double> m_before = values(root.m_shard());
  root.m_shard().zero_();
  root.release_full_moments(true);
  EXPECT_EQ(values(root.m_shard()), m_before);
  EXPECT_FALSE(root.m(0).defined()) << "the full moments are gone";
  testing::expect_error([&] { root.step(0.05); }, {"sharded", "HINT", "step(lr, grad_shard)"});
}

}  // namespace
}  // namespace nha
