// Native Hybrid Attention on the CPU: the op against float64 golden files, the per-token
// recurrence, finite differences and its two limits (pure memory, full attention); the NhaMixer
// layer against golden files, finite differences and its decode form; mixed-layer models.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/nha_reference.h"
#include "common/testing.h"
#include "kernels/backend.h"
#include "layers/attention.h"
#include "layers/nha.h"
#include "layers/transformer.h"

namespace nha {
namespace {

using testing::gradcheck;
using testing::randn;
using testing::rel_rms;

// ---- helpers ------------------------------------------------------------------------------------

// The seven inputs of nha_attend. g = logsigmoid(f)/8 from f ~ N(0, 2^2) (decays 0.6..1 per
// step, strong enough to matter over a chunk); s is drawn independently, as the op allows.
struct NhaInputs {
  Tensor q, k, qr, kr, v, s, g;
  std::vector<Tensor> all() const { return {q, k, qr, kr, v, s, g}; }
};

NhaInputs random_inputs(int64_t B, int64_t T, int64_t H, int64_t Dk, int64_t Dv, int64_t M,
                        uint64_t seed, DType dt = DType::F64) {
  autograd::NoGradGuard no_grad;
  NhaInputs x;
  x.q = randn({B, T, H, Dk}, seed + 1, dt);
  x.k = randn({B, T, H, Dk}, seed + 2, dt);
  x.qr = randn({B, T, H, Dk}, seed + 3, dt);
  x.kr = randn({B, T, H, Dk}, seed + 4, dt);
  x.v = randn({B, T, H, Dv}, seed + 5, dt);
  x.g = nha_gates(randn({B, T, H, M}, seed + 6, dt, 2.0)).first;
  x.s = nha_gates(randn({B, T, H, M}, seed + 7, dt, 2.0)).second;
  return x;
}

Tensor attend(const NhaInputs& x, int64_t w, double scale = 0.0) {
  return nha_attend(x.q, x.k, x.qr, x.kr, x.v, x.s, x.g, w, scale);
}

// {out, lse} straight from the backend (the op does not return lse).
std::pair<Tensor, Tensor> kernel_forward(const NhaInputs& x, int64_t w, double scale) {
  const int64_t B = x.q.size(0), T = x.q.size(1), H = x.q.size(2);
  Tensor out = Tensor::empty(x.v.shape(), x.v.dtype()), lse = Tensor::empty({B, H, T}, x.q.dtype());
  backend_for(x.q).nha_forward(out, lse, x.q, x.k, x.qr, x.kr, x.v, x.s, x.g, scale, w);
  return {out, lse};
}

// Golden tensors are {"shape": [...], "data": [...]} (row-major float64).
Tensor tensor_of(const nlohmann::json& j) {
  return Tensor::from_vector<double>(j.at("data").get<std::vector<double>>(),
                                     j.at("shape").get<Shape>());
}

// The vendored golden files matching `prefix*.json.zst` (tests/data/nha-golden/README.md), sorted.
std::vector<std::filesystem::path> golden_files(const std::string& prefix) {
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(testing::test_data("nha-golden"))) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) == 0 && name.ends_with(".json.zst")) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

nlohmann::json read_json(const std::filesystem::path& p) {
  return nlohmann::json::parse(testing::read_zst_text(p.string()));
}

ModelConfig layer_config(int64_t d, int64_t heads) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = d;
  c.n_layers = 1;
  c.n_heads = heads;
  return c;
}

// A standalone f64 NHA mixer (out_scale 1).
std::shared_ptr<NhaMixer> make_nha(int64_t d, int64_t heads, int64_t window, int64_t slots,
                                   double init_std = 0.02, uint64_t seed = 1) {
  ModelConfig c = layer_config(d, heads);
  c.init_std = init_std;
  Generator gen(seed);
  auto m = std::make_shared<NhaMixer>(c, MixerConfig{MixerType::NHA, window, slots}, 1.0, gen);
  m->to(DType::F64);
  return m;
}

// ---- the op against float64 golden values -------------------------------------------------------

TEST(NhaGolden, OpForwardAndAllGradients) {
  const auto files = golden_files("op_");
  ASSERT_EQ(files.size(), 6u) << "tests/data/nha-golden/op_*.json.zst";
  for (const auto& path : files) {
    const nlohmann::json j = read_json(path);
    const nlohmann::json &in = j.at("inputs"), &grads = j.at("grads");
    const int64_t w = j.at("config").at("w");
    const double scale = j.at("config").at("scale");
    const char* names[7] = {"q", "k", "q_rope", "k_rope", "v", "s", "g"};
    std::vector<Tensor> x;
    for (const char* n : names) x.push_back(tensor_of(in.at(n)).set_requires_grad(true));
    Tensor out = nha_attend(x[0], x[1], x[2], x[3], x[4], x[5], x[6], w, scale);
    const double err_out = rel_rms(out, tensor_of(j.at("outputs").at("o")));
    EXPECT_LT(err_out, 1e-10) << path.filename();
    out.backward(tensor_of(in.at("dO")));
    double worst = 0;
    for (int i = 0; i < 7; ++i) {
      const double err = rel_rms(x[i].grad(), tensor_of(grads.at(names[i])));
      EXPECT_LT(err, 1e-10) << path.filename() << " d" << names[i];
      worst = std::max(worst, err);
    }
    std::printf("  %s: out rel %.1e, worst grad rel %.1e\n", path.filename().c_str(), err_out,
                worst);
  }
}

// The whole layer: weights from the file, y and the gradients of x and every weight.
TEST(NhaGolden, LayerForwardAndAllGradients) {
  const auto files = golden_files("layer_");
  ASSERT_EQ(files.size(), 3u) << "tests/data/nha-golden/layer_*.json.zst";
  for (const auto& path : files) {
    const nlohmann::json j = read_json(path);
    const nlohmann::json &cfg = j.at("config"), &in = j.at("inputs"), &grads = j.at("grads");
    auto mixer = make_nha(cfg.at("d"), cfg.at("H"), cfg.at("w"), cfg.at("m"));
    const std::pair<const char*, Tensor> weights[] = {
        {"Wq", mixer->wq->weight}, {"Wk", mixer->wk->weight}, {"Wv", mixer->wv->weight},
        {"Wf", mixer->wf->weight}, {"Wo", mixer->wo->weight}, {"g_norm", mixer->out_norm->weight}};
    {
      autograd::NoGradGuard no_grad;
      for (auto [name, w] : weights) w.copy_(tensor_of(in.at(name)));
    }
    Tensor x = tensor_of(in.at("x")).set_requires_grad(true);
    Tensor y = mixer->forward(x);
    const double err_y = rel_rms(y, tensor_of(j.at("outputs").at("y")));
    EXPECT_LT(err_y, 1e-10) << path.filename();
    y.backward(tensor_of(in.at("dy")));
    double worst = rel_rms(x.grad(), tensor_of(grads.at("x")));
    EXPECT_LT(worst, 1e-10) << path.filename() << " dx";
    for (auto [name, w] : weights) {
      const double err = rel_rms(w.grad(), tensor_of(grads.at(name)));
      EXPECT_LT(err, 1e-10) << path.filename() << " d" << name;
      worst = std::max(worst, err);
    }
    std::printf("  %s: y rel %.1e, worst grad rel %.1e\n", path.filename().c_str(), err_y, worst);
  }
}

// ---- the chunked kernel against the per-token recurrence ----------------------------------------

TEST(Nha, ChunkedMatchesRecurrence) {
  uint64_t seed = 1000;
  for (int64_t M : {3, 16})
    for (int64_t T : {1, 7, 63, 64, 65, 130, 200})
      for (int64_t w : {int64_t(0), int64_t(1), int64_t(5), int64_t(64), int64_t(100), T + 3}) {
        const NhaInputs x = random_inputs(2, T, 2, 4, 3, M, seed += 10);
        auto [out, lse] = kernel_forward(x, w, 0.4);
        auto [ref_out, ref_lse] =
            nha_recurrent_forward(x.q, x.k, x.qr, x.kr, x.v, x.s, x.g, 0.4, w);
        EXPECT_LT(rel_rms(out, ref_out), 1e-12) << "T=" << T << " w=" << w << " M=" << M;
        EXPECT_LT(rel_rms(lse, ref_lse), 1e-12) << "T=" << T << " w=" << w << " M=" << M;
      }
}

// Decays from a = 1 (g -> 0) to a ~ e^-100 per step: the chunk's cumulative decay underflows, but
// every exponent is <= 0, so the kernels stay finite and exact.
TEST(Nha, ExtremeGatesStayFinite) {
  NhaInputs x = random_inputs(1, 130, 2, 4, 4, 5, 7000);
  {
    autograd::NoGradGuard no_grad;
    x.g = nha_gates(randn(x.g.shape(), 7001, DType::F64, 400.0)).first;
  }
  for (int64_t w : {0, 5}) {
    auto [out, lse] = kernel_forward(x, w, 0.5);
    auto [ref_out, ref_lse] = nha_recurrent_forward(x.q, x.k, x.qr, x.kr, x.v, x.s, x.g, 0.5, w);
    EXPECT_LT(rel_rms(out, ref_out), 1e-12) << "w=" << w;
    std::vector<Tensor> in = x.all();
    for (Tensor& t : in) t.set_requires_grad(true);
    nha_attend(in[0], in[1], in[2], in[3], in[4], in[5], in[6], w)
        .backward(randn(out.shape(), 7002));
    for (const Tensor& t : in)
      for (double e : t.grad().to_vector<double>()) ASSERT_TRUE(std::isfinite(e)) << "w=" << w;
  }
}

// The backward kernel overwrites every output (poisoned with NaN first). With w >= T the memory is
// never written, so q, k, s, g get exactly zero gradient.
TEST(Nha, BackwardKernelOverwritesOutputs) {
  const NhaInputs x = random_inputs(2, 9, 2, 4, 3, 3, 8000);
  const Tensor dout = randn(x.v.shape(), 8001);
  for (int64_t w : {0, 4, 9}) {
    auto [out, lse] = kernel_forward(x, w, 0.5);
    std::vector<Tensor> d;
    for (const Tensor& t : x.all()) d.push_back(Tensor::full(t.shape(), std::nan(""), DType::F64));
    backend_for(x.q).nha_backward(d[0], d[1], d[2], d[3], d[4], d[5], d[6], dout, x.q, x.k, x.qr,
                                  x.kr, x.v, x.s, x.g, out, lse, 0.5, w);
    for (const Tensor& t : d)
      for (double e : t.to_vector<double>()) ASSERT_TRUE(std::isfinite(e)) << "w=" << w;
    if (w == 9)
      for (int i : {0, 1, 5, 6})
        for (double e : d[i].to_vector<double>()) EXPECT_EQ(e, 0.0) << "grad " << i;
  }
}

// f32 kernels against the f64 kernels on the same (f32-representable) inputs, forward and backward.
TEST(Nha, F32MatchesF64) {
  const NhaInputs x32 = random_inputs(2, 130, 2, 8, 8, 16, 77, DType::F32);
  const Tensor dout = randn({2, 130, 2, 8}, 78, DType::F32);
  for (int64_t w : {0, 5, 200}) {
    std::vector<Tensor> res[2];
    int r = 0;
    for (DType dt : {DType::F32, DType::F64}) {
      std::vector<Tensor> in;
      for (const Tensor& t : x32.all()) in.push_back(t.to(dt).clone().set_requires_grad(true));
      Tensor out = nha_attend(in[0], in[1], in[2], in[3], in[4], in[5], in[6], w);
      out.backward(dout.to(dt));
      res[r] = {out};
      for (const Tensor& t : in) res[r].push_back(t.grad());
      ++r;
    }
    for (size_t i = 0; i < res[0].size(); ++i) {
      EXPECT_EQ(res[0][i].dtype(), DType::F32);
      EXPECT_LT(rel_rms(res[0][i], res[1][i]), 1e-5) << "w=" << w << " tensor " << i;
    }
  }
}

// The GEMM kernels at odd sizes (T = 131 crosses chunks of 32 and 64 and is a multiple of
// neither; odd heads, head dims and slots) for ordinary, strong (f ~ N(-12, 2)) and extreme
// (f ~ N(-60, 2)) gate logits, f32 and f64, outputs poisoned with NaN: the f64 forward against the
// recurrence to 1e-12, the f32 forward against the recurrence and the f32 backward against the
// f64 backward on the same (f32-representable) inputs.
TEST(Nha, KernelsMatchReferenceAtOddSizesAndDecays) {
  const int64_t B = 2, T = 131, H = 3, Dk = 5, Dv = 7;
  uint64_t seed = 9000;
  for (double f_mean : {0.0, -12.0, -60.0})
    for (int64_t M : {3, 16})
      for (int64_t w : {0, 1, 5, 33, 200}) {
        NhaInputs x = random_inputs(B, T, H, Dk, Dv, M, seed += 10, DType::F32);
        {
          autograd::NoGradGuard no_grad;
          const Tensor f = randn(x.g.shape(), seed + 1, DType::F32, 2.0) +
                           Tensor::full(x.g.shape(), f_mean, DType::F32);
          x.g = nha_gates(f).first;
        }
        const Tensor dout = randn(x.v.shape(), seed + 2, DType::F32);
        std::vector<Tensor> grads[2];
        for (DType dt : {DType::F32, DType::F64}) {
          NhaInputs y;
          y.q = x.q.to(dt), y.k = x.k.to(dt), y.qr = x.qr.to(dt), y.kr = x.kr.to(dt);
          y.v = x.v.to(dt), y.s = x.s.to(dt), y.g = x.g.to(dt);
          Backend& be = backend_for(y.q);
          Tensor out = Tensor::full(y.v.shape(), std::nan(""), dt);
          Tensor lse = Tensor::full({B, H, T}, std::nan(""), dt);
          be.nha_forward(out, lse, y.q, y.k, y.qr, y.kr, y.v, y.s, y.g, 0.4, w);
          auto [ref_out, ref_lse] =
              nha_recurrent_forward(y.q, y.k, y.qr, y.kr, y.v, y.s, y.g, 0.4, w);
          const double tol = dt == DType::F64 ? 1e-12 : 1e-6;
          EXPECT_LT(rel_rms(out, ref_out), tol)
              << dtype_name(dt) << " f=" << f_mean << " M=" << M << " w=" << w;
          EXPECT_LT(rel_rms(lse, ref_lse), tol)
              << dtype_name(dt) << " f=" << f_mean << " M=" << M << " w=" << w;
          std::vector<Tensor>& d = grads[dt == DType::F64];
          for (const Tensor& t : y.all()) d.push_back(Tensor::full(t.shape(), std::nan(""), dt));
          be.nha_backward(d[0], d[1], d[2], d[3], d[4], d[5], d[6], dout.to(dt), y.q, y.k, y.qr,
                          y.kr, y.v, y.s, y.g, out, lse, 0.4, w);
        }
        for (size_t i = 0; i < grads[0].size(); ++i)
          EXPECT_LT(rel_rms(grads[0][i], grads[1][i]), 1e-5)
              << "f=" << f_mean << " M=" << M << " w=" << w << " grad " << i;
      }
}

// ---- gradients ----------------------------------------------------------------------------------

TEST(Nha, GradcheckF64AllInputs) {
  uint64_t seed = 2000;
  struct Case {
    int64_t B, T, H, Dk, Dv, M;
    std::vector<int64_t> windows;
  };
  // The second case crosses a chunk boundary (C = 64), so the carried state gradients count.
  for (const Case& c : {Case{2, 9, 2, 4, 3, 3, {0, 1, 3, 11}}, Case{1, 70, 1, 2, 2, 2, {0, 5, 40}}})
    for (int64_t w : c.windows) {
      NhaInputs x = random_inputs(c.B, c.T, c.H, c.Dk, c.Dv, c.M, seed += 10);
      std::vector<Tensor> in = x.all();
      for (Tensor& t : in) t.set_requires_grad(true);
      EXPECT_TRUE(gradcheck(
          [w](const std::vector<Tensor>& a) {
            return nha_attend(a[0], a[1], a[2], a[3], a[4], a[5], a[6], w);
          },
          in))
          << "T=" << c.T << " w=" << w;
    }
}

// Long sequences, several chunks: the derivative of sum(out * dout) along a random direction of
// all inputs at once, by central differences, against <grad, direction>. Two forwards per case.
TEST(Nha, DirectionalDerivativeOverManyChunks) {
  uint64_t seed = 3000;
  for (int64_t w : {0, 5, 70, 300}) {
    NhaInputs x = random_inputs(2, 200, 2, 4, 4, 16, seed += 10);
    std::vector<Tensor> in = x.all();
    for (Tensor& t : in) t.set_requires_grad(true);
    const Tensor dout = randn({2, 200, 2, 4}, seed + 1);
    nha_attend(in[0], in[1], in[2], in[3], in[4], in[5], in[6], w).backward(dout);
    std::vector<Tensor> dir;
    double analytic = 0;
    for (size_t i = 0; i < in.size(); ++i) {
      dir.push_back(randn(in[i].shape(), seed + 2 + i));
      const std::vector<double> gv = in[i].grad().to_vector<double>(),
                                dv = dir[i].to_vector<double>();
      for (size_t e = 0; e < gv.size(); ++e) analytic += gv[e] * dv[e];
    }
    auto loss_at = [&](double eps) {
      autograd::NoGradGuard no_grad;
      std::vector<Tensor> p;
      for (size_t i = 0; i < in.size(); ++i) p.push_back(in[i] + dir[i] * eps);
      Tensor out = nha_attend(p[0], p[1], p[2], p[3], p[4], p[5], p[6], w);
      return sum(out * dout).item<double>();
    };
    const double h = 1e-5, numeric = (loss_at(h) - loss_at(-h)) / (2 * h);
    EXPECT_NEAR(analytic, numeric, 1e-7 * std::abs(numeric)) << "w=" << w;
  }
}

TEST(Nha, GatesMatchFormulaAndGradcheck) {
  const std::vector<double> fs = {-800, -30, -2, -1e-3, 0, 0.5, 3, 40, 900};
  auto [g, s] = nha_gates(Tensor::from_vector<double>(fs, {int64_t(fs.size())}));
  const std::vector<double> gv = g.to_vector<double>(), sv = s.to_vector<double>();
  for (size_t i = 0; i < fs.size(); ++i) {
    const double ref =
        fs[i] > 0 ? -std::log1p(std::exp(-fs[i])) / 8 : (fs[i] - std::log1p(std::exp(fs[i]))) / 8;
    EXPECT_NEAR(gv[i], ref, 1e-15 * std::max(1.0, std::abs(ref))) << "f=" << fs[i];
    EXPECT_NEAR(sv[i], -std::expm1(ref), 1e-15) << "f=" << fs[i];
    EXPECT_LE(gv[i], 0.0);
  }
  // Each output alone: the engine gives the unused output a zero gradient.
  Tensor f = randn({3, 5}, 7, DType::F64, 3.0).set_requires_grad(true);
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& a) { return nha_gates(a[0]).first; }, {f}));
  EXPECT_TRUE(gradcheck([](const std::vector<Tensor>& a) { return nha_gates(a[0]).second; }, {f}));
  EXPECT_TRUE(gradcheck(
      [](const std::vector<Tensor>& a) {
        auto [gg, ss] = nha_gates(a[0]);
        return gg * 2.0 + ss;
      },
      {f}));
}

// ---- the two limits -----------------------------------------------------------------------------

// window 0 is a pure gated-slot RNN, written here from docs/nha.md §2 with the token written first:
//   Hk = Hk a_t + k_t s_t^T,  Hv = Hv a_t + s_t v_t^T,  o_t = softmax(scale q_t Hk) Hv.
TEST(Nha, WindowZeroIsGatedSlotRnn) {
  const int64_t T = 90, H = 2, Dk = 4, Dv = 3, M = 5;
  const NhaInputs x = random_inputs(1, T, H, Dk, Dv, M, 4000);
  const double scale = 0.5;
  const std::vector<double> q = x.q.to_vector<double>(), k = x.k.to_vector<double>(),
                            v = x.v.to_vector<double>(), s = x.s.to_vector<double>(),
                            g = x.g.to_vector<double>();
  std::vector<double> ref(size_t(T * H * Dv));
  for (int64_t h = 0; h < H; ++h) {
    std::vector<double> Hk(Dk * M, 0.0), Hv(M * Dv, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t rk = (t * H + h) * Dk, rv = (t * H + h) * Dv, rm = (t * H + h) * M;
      std::vector<double> p(M, 0.0);
      double z = 0;
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t d = 0; d < Dk; ++d)
          Hk[d * M + m] = Hk[d * M + m] * std::exp(g[rm + m]) + k[rk + d] * s[rm + m];
        for (int64_t e = 0; e < Dv; ++e)
          Hv[m * Dv + e] = Hv[m * Dv + e] * std::exp(g[rm + m]) + s[rm + m] * v[rv + e];
        for (int64_t d = 0; d < Dk; ++d) p[m] += scale * q[rk + d] * Hk[d * M + m];
        z += (p[m] = std::exp(p[m]));  // logits are small: no max shift needed
      }
      for (int64_t e = 0; e < Dv; ++e) {
        double o = 0;
        for (int64_t m = 0; m < M; ++m) o += p[m] / z * Hv[m * Dv + e];
        ref[rv + e] = o;
      }
    }
  }
  EXPECT_LT(rel_rms(attend(x, 0, scale), Tensor::from_vector<double>(ref, {1, T, H, Dv})), 1e-12);
}

// window >= T: memory is never written, so the result is causal attention over (qr, kr, v) with
// M extra zero-logit, zero-value slots in the denominator:
//   out = out_attn e^{lse_attn} / (e^{lse_attn} + M).   q, k, s, g do not matter at all.
TEST(Nha, WindowAtLeastTIsAttentionPlusNullSlots) {
  const int64_t B = 2, T = 70, H = 2, D = 4, M = 7;
  const NhaInputs x = random_inputs(B, T, H, D, D, M, 5000);
  auto [attn, lse] = attention_with_lse(x.qr, x.kr, x.v);
  const std::vector<double> a = attn.to_vector<double>(), l = lse.to_vector<double>();
  std::vector<double> ref(a.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const double e = std::exp(l[(b * H + h) * T + t]), r = e / (e + double(M));
        for (int64_t d = 0; d < D; ++d)
          ref[((b * T + t) * H + h) * D + d] = a[((b * T + t) * H + h) * D + d] * r;
      }
  const Tensor expected = Tensor::from_vector<double>(ref, x.v.shape());
  for (int64_t w : {T, T + 1, int64_t(1) << 40})
    EXPECT_LT(rel_rms(attend(x, w), expected), 1e-13) << "w=" << w;
}

TEST(Nha, BadInputsFailClearly) {
  const NhaInputs x = random_inputs(1, 5, 2, 4, 4, 3, 6000);
  auto message = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string neg = message([&] { attend(x, -1); });
  EXPECT_NE(neg.find("window must be >= 0"), std::string::npos) << neg;
  EXPECT_NE(neg.find("HINT"), std::string::npos) << neg;
  NhaInputs bad = x;
  bad.kr = randn({1, 5, 2, 3}, 1);
  EXPECT_NE(message([&] { attend(bad, 2); }).find("equal shapes"), std::string::npos);
  bad = x;
  bad.g = randn({1, 5, 2, 4}, 1);
  EXPECT_NE(message([&] { attend(bad, 2); }).find("HINT"), std::string::npos);
  bad = x;
  bad.s = x.s.to(DType::F32);
  EXPECT_NE(message([&] { attend(bad, 2); }).find("nha_gates"), std::string::npos);
  bad = x;
  bad.v = randn({1, 6, 2, 4}, 1);
  EXPECT_THROW(attend(bad, 2), Error);
  EXPECT_THROW(nha_gates(Tensor::zeros({3}, DType::I32)), Error);
}

// ---- the layer ----------------------------------------------------------------------------------

TEST(NhaMixer, ParameterNamesAndShapes) {
  ModelConfig c = layer_config(8, 2);
  c.n_layers = 3;
  c.mlp_hidden = 12;
  c.mixers = {MixerConfig{MixerType::NHA, 4, 3}, MixerConfig{MixerType::Attention, 0, 0},
              MixerConfig{MixerType::GSA, 9, 5}};
  LanguageModel model(c, 1);
  std::vector<std::string> names;
  for (const auto& p : model.named_parameters())
    if (p.name.rfind("layers.0.mixer.", 0) == 0)
      names.push_back(p.name + " " + shape_str(p.tensor.shape()));
  const std::vector<std::string> expected = {
      "layers.0.mixer.wq.weight [8, 8]", "layers.0.mixer.wk.weight [8, 8]",
      "layers.0.mixer.wv.weight [8, 8]", "layers.0.mixer.wf.weight [6, 8]",
      "layers.0.mixer.wo.weight [8, 8]", "layers.0.mixer.out_norm.weight [8]"};
  EXPECT_EQ(names, expected);
  auto& gsa = dynamic_cast<NhaMixer&>(*model.layers[2]->mixer);
  EXPECT_EQ(gsa.window, 0);  // gsa = nha without a window, whatever the config says
  EXPECT_EQ(gsa.slots, 5);
  EXPECT_NE(dynamic_cast<Attention*>(model.layers[1]->mixer.get()), nullptr);
}

TEST(NhaMixer, GradcheckF64AllWeights) {
  for (int64_t w : {0, 2, 100}) {
    // Large weights so the softmax is far from uniform and every gradient is well above FD noise.
    auto mixer = make_nha(8, 2, w, 3, 0.5, 9);
    std::vector<Tensor> in = {randn({2, 5, 8}, 10).set_requires_grad(true)};
    for (const Tensor& p : mixer->parameters()) in.push_back(p);
    EXPECT_TRUE(gradcheck([&](const std::vector<Tensor>& a) { return mixer->forward(a[0]); }, in,
                          {.step = 1e-6, .tolerance = 1e-6}))
        << "w=" << w;
  }
}

// Decode one token at a time (constant-size state) == the parallel forward, in f64.
TEST(NhaMixer, DecodeMatchesForward) {
  const int64_t B = 2, T = 11, d = 8;
  for (int64_t w : {int64_t(0), int64_t(3), T, int64_t(1000)}) {
    auto mixer = make_nha(d, 2, w, 4, 0.4, 21);
    const Tensor x = randn({B, T, d}, 22);
    const Tensor y = mixer->forward(x);
    NhaDecodeState st = mixer->decode_state(B, T);
    std::vector<Tensor> rows;
    for (int64_t t = 0; t < T; ++t)
      rows.push_back(mixer->step(x.slice(1, t, t + 1).contiguous(), st));
    EXPECT_EQ(st.pos, T);
    EXPECT_EQ(st.cap, std::min(w, T));
    for (int64_t t = 0; t < T; ++t)
      EXPECT_LT(rel_rms(rows[t], y.slice(1, t, t + 1).contiguous()), 1e-12)
          << "w=" << w << " t=" << t;
  }
  // A window larger than max_len: the ring holds max_len tokens and refuses one more.
  auto mixer = make_nha(d, 2, 50, 4);
  NhaDecodeState st = mixer->decode_state(1, 2);
  const Tensor x = randn({1, 1, d}, 23);
  mixer->step(x, st);
  mixer->step(x, st);
  EXPECT_THROW(mixer->step(x, st), Error);
}

// ---- models with mixed layers -------------------------------------------------------------------

TEST(NhaModel, MixedLayersTrainStepF32MatchesF64) {
  ModelConfig c = layer_config(16, 2);
  c.n_layers = 3;
  c.mlp_hidden = 24;
  c.init_std = 0.2;
  c.mixers = {MixerConfig{MixerType::NHA, 4, 3}, MixerConfig{MixerType::Attention, 0, 0},
              MixerConfig{MixerType::GSA, 0, 5}};
  const Tensor ids = Tensor::from_vector<int32_t>({1, 5, 2, 9, 3, 7, 0, 4, 10, 6, 8, 2}, {2, 6});
  const Tensor targets =
      Tensor::from_vector<int32_t>({5, 2, 9, 3, 7, -100, 4, 10, 6, 8, 2, 1}, {2, 6});
  std::vector<double> loss;
  std::vector<std::vector<Tensor>> grads;
  for (DType dt : {DType::F32, DType::F64}) {
    LanguageModel model(c, 3);
    model.to(dt);
    Tensor l = model.loss(ids, targets);
    l.backward();
    loss.push_back(l.item<double>());
    grads.emplace_back();
    for (const auto& p : model.named_parameters()) {
      ASSERT_TRUE(p.tensor.grad().defined()) << p.name;
      grads.back().push_back(p.tensor.grad());
    }
  }
  EXPECT_TRUE(std::isfinite(loss[0]));
  EXPECT_NEAR(loss[0], loss[1], 1e-5 * loss[1]);
  for (size_t i = 0; i < grads[0].size(); ++i)
    EXPECT_LT(rel_rms(grads[0][i], grads[1][i]), 1e-4) << i;
}

}  // namespace
}  // namespace nha
