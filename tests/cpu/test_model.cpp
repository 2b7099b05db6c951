// The Transformer++ language model: structure, parameter names, determinism, float64 gradient
// check of the whole stack, and config validation.
#include "common/testing.h"
#include "layers/attention.h"
#include "layers/transformer.h"

namespace nha {
namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.n_heads = 2;
  c.mlp_hidden = 12;
  return c;
}

Tensor ids_of(const std::vector<int32_t>& v, int64_t B, int64_t T) {
  return Tensor::from_vector<int32_t>(v, {B, T});
}

TEST(Model, ParameterNamesAndCount) {
  ModelConfig c = tiny_config();
  LanguageModel model(c, 1);
  std::vector<NamedParameter> params = model.named_parameters();
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  const std::vector<std::string> expected_first = {
      "embed.weight",          "layers.0.mixer_norm.weight", "layers.0.mixer.wq.weight",
      "layers.0.mixer.wk.weight", "layers.0.mixer.wv.weight", "layers.0.mixer.wo.weight",
      "layers.0.mlp_norm.weight", "layers.0.mlp.gate.weight", "layers.0.mlp.up.weight",
      "layers.0.mlp.down.weight"};
  ASSERT_GE(names.size(), expected_first.size());
  for (size_t i = 0; i < expected_first.size(); ++i) EXPECT_EQ(names[i], expected_first[i]);
  EXPECT_EQ(names.back(), "lm_head.weight");
  // embed V*d + per layer (2 norms d + 4 d^2 + 3 d*hidden) + final norm d + head V*d
  const int64_t d = 8, V = 11, hid = 12;
  EXPECT_EQ(model.num_parameters(), V * d + 2 * (2 * d + 4 * d * d + 3 * d * hid) + d + V * d);
  EXPECT_EQ(params[0].kind, ParamKind::Embedding);
  EXPECT_EQ(params[1].kind, ParamKind::Norm);
  EXPECT_EQ(params[2].kind, ParamKind::Weight);

  c.tie_embeddings = true;
  LanguageModel tied(c, 1);
  EXPECT_EQ(tied.num_parameters(), model.num_parameters() - V * d);
}

TEST(Model, DefaultMlpHiddenFollowsSpec) {
  ModelConfig c = tiny_config();
  c.mlp_hidden = 0;
  c.d_model = 768;
  EXPECT_EQ(c.resolved_mlp_hidden(), 2048);  // 8*768/3 = 2048 exactly
  c.d_model = 1024;
  EXPECT_EQ(c.resolved_mlp_hidden(), 2816);  // ceil(2730.7/256) * 256
}

TEST(Model, SameSeedSameModelAndOutputShape) {
  LanguageModel a(tiny_config(), 7), b(tiny_config(), 7), c(tiny_config(), 8);
  Tensor ids = ids_of({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 2, 5);
  Tensor la = a.forward(ids), lb = b.forward(ids), lc = c.forward(ids);
  EXPECT_EQ(la.shape(), (Shape{2, 5, 11}));
  EXPECT_EQ(la.to_vector<float>(), lb.to_vector<float>());
  EXPECT_NE(la.to_vector<float>(), lc.to_vector<float>());
}

TEST(Model, OutputProjectionsAreScaledDown) {
  ModelConfig c = tiny_config();
  c.d_model = 64;
  c.mlp_hidden = 128;
  LanguageModel m(c, 3);
  auto rms = [](const Tensor& t) {
    double s = 0;
    for (float v : t.to_vector<float>()) s += double(v) * v;
    return std::sqrt(s / double(t.numel()));
  };
  auto& mix = static_cast<Attention&>(*m.layers[0]->mixer);
  EXPECT_NEAR(rms(mix.wq->weight), 0.02, 0.002);
  EXPECT_NEAR(rms(mix.wo->weight), 0.02 / std::sqrt(4.0), 0.001);
  EXPECT_NEAR(rms(m.layers[1]->mlp->down->weight), 0.01, 0.001);
}

// Whole-model float64 finite differences: every parameter of a tiny model, including a windowed
// attention layer and tied embeddings (the embedding is used twice: input and output).
TEST(Model, WholeModelGradientsMatchFiniteDifferences) {
  for (bool tie : {false, true}) {
    ModelConfig c = tiny_config();
    c.tie_embeddings = tie;
    // Large weights make the attention pattern far from uniform, so q/k gradients are not tiny
    // (at init_std 0.02 they are ~1e-6 of the loss and finite differences would measure noise).
    c.init_std = 0.5;
    c.mixers = {MixerConfig{MixerType::Attention, 0, 0}, MixerConfig{MixerType::Attention, 3, 0}};
    LanguageModel model(c, 11);
    model.to(DType::F64);
    Tensor ids = ids_of({1, 5, 2, 9, 3, 7, 0, 4, 10, 6}, 2, 5);
    Tensor targets = ids_of({5, 2, 9, 3, -100, 0, 4, 10, 6, 1}, 2, 5);
    std::vector<Tensor> params = model.parameters();
    auto f = [&](const std::vector<Tensor>&) { return model.loss(ids, targets); };
    EXPECT_TRUE(testing::gradcheck(f, params, {.step = 1e-5, .tolerance = 1e-6}))
        << (tie ? "tied" : "untied");
  }
}

// The fused residual adds (add_rmsnorm inside and across blocks) against the pre-norm forward
// written out op by op, h = x + mixer(norm(x)), y = h + mlp(norm(h)), logits = head(norm(y)), on
// the same weights: the same loss bits (the CPU's fused kernel is the two kernels), and the same
// gradients up to the order in which the engine sums a tensor's several gradients.
TEST(Model, FusedResidualNormsMatchThePlainForward) {
  for (DType dt : {DType::F32, DType::F64}) {
    SCOPED_TRACE(dtype_name(dt));
    ModelConfig c = tiny_config();
    c.n_layers = 3;
    c.init_std = 0.3;
    c.mixers = {MixerConfig{MixerType::Attention, 0, 0}, MixerConfig{MixerType::Attention, 3, 0},
                MixerConfig{MixerType::Attention, 0, 0}};
    LanguageModel fused(c, 13), plain(c, 13);
    fused.to(dt);
    plain.to(dt);
    Tensor ids = ids_of({1, 5, 2, 9, 3, 7, 0, 4, 10, 6, 8, 2}, 2, 6);
    Tensor targets = ids_of({5, 2, 9, 3, -100, 0, 4, 10, 6, 1, 3, 3}, 2, 6);
    const Tensor lf = fused.loss(ids, targets);
    Tensor x = plain.embed->forward(ids);
    for (const auto& b : plain.layers) {
      const Tensor h = x + b->mixer->forward(b->mixer_norm->forward(x));
      x = h + b->mlp->forward(b->mlp_norm->forward(h));
    }
    const Tensor logits = linear(plain.norm->forward(x), plain.lm_head->weight);
    const Tensor lp = cross_entropy(logits.reshape({-1, c.vocab_size}), targets.reshape({-1}));
    EXPECT_EQ(lf.item<double>(), lp.item<double>());
    lf.backward();
    lp.backward();
    const std::vector<NamedParameter> pf = fused.named_parameters(), pp = plain.named_parameters();
    for (size_t i = 0; i < pf.size(); ++i)
      EXPECT_LT(testing::rel_rms(pf[i].tensor.grad(), pp[i].tensor.grad()),
                dt == DType::F64 ? 1e-13 : 1e-6)
          << pf[i].name;
  }
}

// Sparse targets (MQAR): the head and the cross-entropy on the counted rows only give loss()'s
// value and gradients, with every mixer kind, tied and untied, at odd sizes.
TEST(Model, LossOnRowsMatchesTheMaskedLoss) {
  for (DType dt : {DType::F32, DType::F64}) {
    for (bool tie : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (tie ? " tied" : " untied"));
      ModelConfig c = tiny_config();
      c.n_layers = 3;
      c.tie_embeddings = tie;
      c.init_std = 0.3;
      c.mixers = {MixerConfig{MixerType::Attention, 0, 0}, MixerConfig{MixerType::NHA, 3, 2},
                  MixerConfig{MixerType::GSA, 0, 3}};
      LanguageModel dense(c, 17), sparse(c, 17);
      dense.to(dt);
      sparse.to(dt);
      const int64_t B = 2, T = 7;
      Generator gen(3);
      std::vector<int32_t> ids(B * T), targets(B * T, -100), rows, kept;
      for (auto& id : ids) id = int32_t(gen.next_u64() % 11);
      for (int32_t r : {1, 5, 6, 9, 13}) {  // rows in both sequences, the last row included
        targets[size_t(r)] = int32_t(gen.next_u64() % 11);
        rows.push_back(r);
        kept.push_back(targets[size_t(r)]);
      }
      const Tensor ld = dense.loss(ids_of(ids, B, T), ids_of(targets, B, T));
      const Tensor ls = sparse.loss_on_rows(ids_of(ids, B, T), Tensor::from_vector<int32_t>(rows, {5}),
                                            Tensor::from_vector<int32_t>(kept, {5}));
      const double tol = dt == DType::F64 ? 1e-13 : 1e-6;
      EXPECT_NEAR(ls.item<double>(), ld.item<double>(), tol * std::fabs(ld.item<double>()));
      ld.backward();
      ls.backward();
      const std::vector<NamedParameter> pd = dense.named_parameters(), ps = sparse.named_parameters();
      for (size_t i = 0; i < pd.size(); ++i)
        EXPECT_LT(testing::rel_rms(ps[i].tensor.grad(), pd[i].tensor.grad()), tol) << pd[i].name;
    }
  }
}

TEST(Model, ConfigValidationNamesTheField) {
  auto expect_error = [](ModelConfig c, const std::string& needle) {
    try {
      c.validate();
      ADD_FAILURE() << "accepted a bad config, expected: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  ModelConfig c = tiny_config();
  c.n_heads = 3;
  expect_error(c, "n_heads");
  c = tiny_config();
  c.vocab_size = 0;
  expect_error(c, "vocab_size");
  c = tiny_config();
  c.mixers = {MixerConfig{}};
  expect_error(c, "mixer entries");
  c = tiny_config();
  c.d_model = 6;
  c.n_heads = 2;  // head dim 3 is odd
  expect_error(c, "RoPE");
}

TEST(Model, BadTokenIdsAreReported) {
  LanguageModel m(tiny_config(), 1);
  EXPECT_THROW(m.forward(ids_of({1, 2, 11}, 1, 3)), Error);  // 11 >= vocab 11
  EXPECT_THROW(m.forward(Tensor::zeros({2, 3})), Error);     // float ids
}

}  // namespace
}  // namespace nha
