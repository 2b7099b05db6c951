// Incremental generation (layers/transformer.h decode API, eval/generate.h): prefill + decode_step
// against the full forward at every position for every mixer kind (full and sliding-window
// attention, nha with w < T and w >= T, gsa, a mixed model) in f32 and f64; batched prompts of
// different lengths against each prompt alone; cached greedy generation against the recomputing
// one (also through generate_greedy_cached's batching and its fallback); the sampling rules; and
// the refusals.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/testing.h"
#include "eval/generate.h"
#include "eval/loglik.h"
#include "layers/nha.h"
#include "layers/transformer.h"

namespace nha {
namespace {

using testing::expect_error;
using testing::rel_rms;

constexpr int64_t kGenVocab = 37;

// A small model with one layer per mixer config; large init so the logits are far from uniform.
std::shared_ptr<LanguageModel> gen_model(const std::vector<MixerConfig>& mixers, DType dtype,
                                         uint64_t seed = 3) {
  ModelConfig c;
  c.vocab_size = kGenVocab;
  c.d_model = 16;
  c.n_heads = 2;
  c.n_layers = int64_t(mixers.size());
  c.mlp_hidden = 24;
  c.init_std = 0.3;
  c.mixers = mixers;
  auto m = std::make_shared<LanguageModel>(c, seed);
  m->to(dtype);
  return m;
}

std::vector<int32_t> gen_ids(int64_t n, uint64_t seed) {
  Generator g(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int32_t& id : ids) id = int32_t(g.next_u64() % kGenVocab);
  return ids;
}

MixerConfig attn(int64_t window = 0) { return {MixerType::Attention, window, 0}; }
MixerConfig nha_layer(int64_t window, int64_t slots = 4) { return {MixerType::NHA, window, slots}; }
MixerConfig gsa_layer(int64_t slots = 4) { return {MixerType::GSA, 0, slots}; }

// logits [V] of forward(ids) at position t
Tensor forward_row(const Tensor& logits, int64_t t) {
  return logits.slice(1, t, t + 1).reshape({-1}).contiguous();
}

// Worst relative RMS error over every position of prefill(ids[:P]) then decode_step(ids[P..])
// against forward(ids).
double worst_decode_error(const LanguageModel& model, const std::vector<int32_t>& ids, int64_t P) {
  autograd::NoGradGuard no_grad;
  const int64_t T = int64_t(ids.size());
  const Tensor full = model.forward(Tensor::from_vector<int32_t>(ids, {1, T}));  // [1, T, V]
  DecodeState st = model.new_decode_state(1, T);
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + P);
  double worst = rel_rms(model.prefill({prompt}, st).reshape({-1}), forward_row(full, P - 1));
  for (int64_t t = P; t < T; ++t) {
    const Tensor next = Tensor::from_vector<int32_t>({ids[size_t(t)]}, {1, 1});
    const Tensor logits = model.decode_step(next, st);
    worst = std::max(worst, rel_rms(logits.reshape({-1}), forward_row(full, t)));
  }
  EXPECT_EQ(st.pos(), T);
  return worst;
}

struct DecodeCase {
  const char* name;
  std::vector<MixerConfig> mixers;
};

const std::vector<DecodeCase>& decode_cases() {
  static const std::vector<DecodeCase> cases = {
      {"transformer", {attn(), attn()}},
      {"sliding window 4 (T > w)", {attn(4), attn(4)}},
      {"nha w=3 < T", {nha_layer(3), nha_layer(3)}},
      {"nha w=1000 >= T", {nha_layer(1000)}},
      {"nha w=T", {nha_layer(13)}},
      {"gsa", {gsa_layer(), gsa_layer(5)}},
      {"mixed", {nha_layer(3), attn(), gsa_layer(), attn(5), nha_layer(1000)}},
  };
  return cases;
}

TEST(Generate, PrefillAndDecodeMatchForwardF32AndF64) {
  const std::vector<int32_t> ids = gen_ids(13, 7);
  for (const DecodeCase& c : decode_cases())
    for (DType dt : {DType::F32, DType::F64}) {
      auto model = gen_model(c.mixers, dt);
      for (int64_t P : {1, 4, 13}) {
        const double err = worst_decode_error(*model, ids, P);
        EXPECT_LT(err, dt == DType::F64 ? 1e-11 : 1e-5)
            << c.name << " " << dtype_name(dt) << " prompt " << P;
        std::printf("[decode error] %-26s %s prompt %2lld: %.2e\n", c.name, dtype_name(dt),
                    (long long)P, err);
      }
    }
}

// Rows of different lengths in one batch (right-aligned, rows at different RoPE positions, ring
// slots holding padding) give each row exactly what it gets alone, and forward()'s logits.
TEST(Generate, BatchedPromptsOfDifferentLengthsMatchEachAlone) {
  const std::vector<std::vector<int32_t>> prompts = {gen_ids(5, 11), gen_ids(1, 12), gen_ids(9, 13),
                                                     gen_ids(9, 14), gen_ids(2, 15)};
  const int64_t B = int64_t(prompts.size()), steps = 6;
  std::vector<std::vector<int32_t>> fed(prompts.size());  // tokens fed after the prompt
  for (size_t b = 0; b < prompts.size(); ++b) fed[b] = gen_ids(steps, 20 + b);
  for (DType dt : {DType::F32, DType::F64}) {
    auto model = gen_model(decode_cases().back().mixers, dt);
    autograd::NoGradGuard no_grad;
    DecodeState st = model->new_decode_state(B, 9 + steps);
    std::vector<Tensor> batched = {model->prefill(prompts, st)};  // per step [B, V]
    for (int64_t i = 0; i < steps; ++i) {
      std::vector<int32_t> next;
      for (int64_t b = 0; b < B; ++b) next.push_back(fed[size_t(b)][size_t(i)]);
      batched.push_back(model->decode_step(Tensor::from_vector<int32_t>(next, {B, 1}), st));
    }
    double worst_alone = 0, worst_forward = 0;
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<int32_t>& p = prompts[size_t(b)];
      DecodeState solo = model->new_decode_state(1, int64_t(p.size()) + steps);
      std::vector<int32_t> seq = p;
      seq.insert(seq.end(), fed[size_t(b)].begin(), fed[size_t(b)].end());
      const int64_t T = int64_t(seq.size());
      const Tensor full = model->forward(Tensor::from_vector<int32_t>(seq, {1, T}));
      for (int64_t i = 0; i <= steps; ++i) {
        const int32_t token = i == 0 ? 0 : fed[size_t(b)][size_t(i - 1)];
        const Tensor alone =
            i == 0 ? model->prefill({p}, solo)
                   : model->decode_step(Tensor::from_vector<int32_t>({token}, {1, 1}), solo);
        const Tensor row = batched[size_t(i)].slice(0, b, b + 1).reshape({-1}).contiguous();
        worst_alone = std::max(worst_alone, rel_rms(row, alone.reshape({-1})));
        worst_forward = std::max(
            worst_forward, rel_rms(row, forward_row(full, int64_t(p.size()) - 1 + i)));
      }
    }
    const double tol = dt == DType::F64 ? 1e-11 : 1e-5;
    EXPECT_LT(worst_alone, tol) << dtype_name(dt);
    EXPECT_LT(worst_forward, tol) << dtype_name(dt);
    std::printf("[batched error] %s: vs alone %.2e, vs forward %.2e\n", dtype_name(dt), worst_alone,
                worst_forward);
  }
}

// generate_greedy over the forward: the reference without caches.
eval::LogitsFn forward_fn(const LanguageModel& model) {
  return [&model](const Tensor& ids) { return model.forward(ids); };
}

TEST(Generate, GreedyWithCacheEqualsWithout) {
  auto model = gen_model(decode_cases().back().mixers, DType::F32);
  const std::vector<std::vector<int32_t>> prompts = {gen_ids(6, 31), gen_ids(2, 32),
                                                     gen_ids(11, 33)};
  eval::SamplingOptions o;
  o.max_new_tokens = 14;
  const eval::GenerationResult r = eval::generate(*model, prompts, o);
  std::vector<eval::GenerateRequest> requests;
  for (const auto& p : prompts) requests.push_back({p});
  eval::ScoreOptions so;
  so.max_len = 64;
  const auto reference = eval::generate_greedy(forward_fn(*model), requests, 14, {}, so);
  ASSERT_EQ(r.tokens.size(), reference.size());
  for (size_t b = 0; b < prompts.size(); ++b) {
    EXPECT_EQ(r.tokens[b], reference[b]) << "prompt " << b;
    EXPECT_EQ(r.tokens[b].size(), 14u);
  }
  EXPECT_EQ(r.new_tokens, 3 * 14);
  EXPECT_EQ(r.steps, 13);
  // The eval path: several batches (batch_tokens), a stop rule, and rows too long for max_len
  // (prompt + new tokens > max_len) that fall back to the recomputing generator. The stop token is
  // the 3rd token of the first row, so at least that row stops early.
  for (int i = 0; i < 10; ++i) requests.push_back({gen_ids(1 + i % 7, 40 + i)});
  requests.push_back({gen_ids(12, 60)});  // 12 + 8 - 1 > 16: cut by generate_greedy
  so.max_len = 16;
  so.batch_tokens = 40;
  const int32_t stop_id = reference[0][2];
  const eval::StopFn stop = [&](const std::vector<int32_t>& g) { return g.back() == stop_id; };
  const auto cached = eval::generate_greedy_cached(*model, DType::F32, requests, 8, stop, so);
  const auto recomputed = eval::generate_greedy(forward_fn(*model), requests, 8, stop, so);
  EXPECT_EQ(cached, recomputed);
  bool some_stopped = false;
  for (const auto& g : recomputed) some_stopped = some_stopped || g.size() < 8;
  EXPECT_TRUE(some_stopped) << "no row hit the stop rule: the test would not check it";
}

TEST(Generate, TopK1IsGreedyAndSeedsReproduce) {
  auto model = gen_model({nha_layer(3), attn()}, DType::F32);
  const std::vector<std::vector<int32_t>> prompts = {gen_ids(4, 71), gen_ids(7, 72)};
  eval::SamplingOptions greedy;
  greedy.max_new_tokens = 20;
  eval::SamplingOptions top1 = greedy;
  top1.temperature = 1.3;
  top1.top_k = 1;
  top1.seed = 5;
  EXPECT_EQ(eval::generate(*model, prompts, top1).tokens,
            eval::generate(*model, prompts, greedy).tokens);
  // A hot sampler over 37 tokens: 20 draws per row agree by chance with probability ~ 1e-20.
  eval::SamplingOptions hot = greedy;
  hot.temperature = 3.0;
  hot.seed = 11;
  const auto a = eval::generate(*model, prompts, hot).tokens;
  EXPECT_EQ(a, eval::generate(*model, prompts, hot).tokens);
  hot.seed = 12;
  const auto b = eval::generate(*model, prompts, hot).tokens;
  EXPECT_NE(a[0], b[0]);
  EXPECT_NE(a[1], b[1]);
  // A row's samples do not depend on the other rows of its batch (the draw is per row and step).
  EXPECT_EQ(eval::generate(*model, {prompts[0]}, hot).tokens[0], b[0]);
  // max_new_tokens and EOS end a row; the EOS is kept as its last token.
  hot.max_new_tokens = 200;
  hot.eos_id = 4;
  const auto ended = eval::generate(*model, prompts, hot).tokens;
  for (const auto& g : ended) {
    ASSERT_FALSE(g.empty());
    EXPECT_TRUE(g.back() == 4 || g.size() == 200u);
    for (size_t i = 0; i + 1 < g.size(); ++i) EXPECT_NE(g[i], 4);
  }
}

TEST(Generate, SampleTokenRules) {
  eval::SamplingOptions o;
  o.temperature = 1.0;
  // Equal logits: the inverse CDF over ids in order.
  const std::vector<float> flat = {0.5f, 0.5f, 0.5f, 0.5f};
  EXPECT_EQ(eval::sample_token(flat.data(), 4, o, 0.0), 0);
  EXPECT_EQ(eval::sample_token(flat.data(), 4, o, 0.51), 2);
  EXPECT_EQ(eval::sample_token(flat.data(), 4, o, 0.999), 3);
  // p = [0.2, 0.5, 0.3] (ids 0, 1, 2): most likely first is 1 (0.5), 2 (0.3), 0 (0.2).
  const std::vector<float> logits = {float(std::log(0.2)), float(std::log(0.5)),
                                     float(std::log(0.3))};
  EXPECT_EQ(eval::sample_token(logits.data(), 3, o, 0.45), 1);
  EXPECT_EQ(eval::sample_token(logits.data(), 3, o, 0.75), 2);
  EXPECT_EQ(eval::sample_token(logits.data(), 3, o, 0.85), 0);
  o.top_p = 0.6;  // keeps 1 and 2 (0.5 < 0.6 <= 0.8), renormalized to 0.625 / 0.375
  EXPECT_EQ(eval::sample_token(logits.data(), 3, o, 0.6), 1);
  EXPECT_EQ(eval::sample_token(logits.data(), 3, o, 0.99), 2);
  o.top_p = 0.45;  // the most likely token alone reaches it
  EXPECT_EQ(eval::sample_token(logits.data(), 3, o, 0.99), 1);
  o.top_p = 1.0;
  o.top_k = 2;
  EXPECT_EQ(eval::sample_token(logits.data(), 3, o, 0.99), 2);
  o.top_k = 0;
  // Frequencies over many Philox draws follow softmax(logits / temperature).
  o.temperature = 2.0;
  std::vector<double> count(3, 0.0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const double u = philox_uniform(9, uint64_t(i), 0, 1);
    count[size_t(eval::sample_token(logits.data(), 3, o, u))] += 1;
  }
  double z = 0;
  for (double p : {0.2, 0.5, 0.3}) z += std::sqrt(p);
  const double want[3] = {std::sqrt(0.2) / z, std::sqrt(0.5) / z, std::sqrt(0.3) / z};
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(count[size_t(i)] / n, want[i], 0.015) << "token " << i;
}

TEST(Generate, RefusesBadArgumentsAndMisuse) {
  auto model = gen_model({attn(), nha_layer(2)}, DType::F32);
  const std::vector<std::vector<int32_t>> prompts = {gen_ids(3, 81)};
  auto with = [](auto edit) {
    eval::SamplingOptions o;
    o.temperature = 1.0;
    edit(o);
    return o;
  };
  for (double p : {0.0, -0.5, 1.5, std::nan("")})
    expect_error([&] { eval::generate(*model, prompts, with([&](auto& o) { o.top_p = p; })); },
                 {"top_p", "(0, 1]", "HINT"});
  for (double t : {-1.0, std::nan("")})
    expect_error(
        [&] { eval::generate(*model, prompts, with([&](auto& o) { o.temperature = t; })); },
        {"temperature", ">= 0", "HINT"});
  expect_error([&] { eval::validate(with([](auto& o) { o.top_k = -1; })); }, {"top_k", "HINT"});
  expect_error([&] { eval::validate(with([](auto& o) { o.max_new_tokens = -2; })); },
               {"max_new_tokens"});
  // Full attention keeps max_len steps and says so; a state is prefilled once, for its batch.
  DecodeState st = model->new_decode_state(1, 4);
  model->prefill(prompts, st);
  model->decode_step(Tensor::from_vector<int32_t>({1}, {1, 1}), st);
  expect_error([&] { model->decode_step(Tensor::from_vector<int32_t>({1}, {1, 1}), st); },
               {"KV cache of 4", "max_len"});
  expect_error([&] { model->prefill(prompts, st); }, {"fresh state"});
  DecodeState two = model->new_decode_state(2, 8);
  expect_error([&] { model->prefill(prompts, two); }, {"1 prompts", "2 rows"});
  expect_error([&] { model->prefill({{1}, {}}, two); }, {"empty prompt"});
  model->prefill({{1, 2}, {3}}, two);
  expect_error([&] { model->decode_step(Tensor::from_vector<int32_t>({1}, {1, 1}), two); },
               {"[2, 1]"});
}

}  // namespace
}  // namespace nha
