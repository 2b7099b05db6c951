// The trainer on a tiny model and synthetic shards written here: gradient accumulation equals the
// large batch, bitwise-identical resume, the NaN guard, validation with bits per byte, logging,
// metrics and the loss plot, refusals; autocast's casting mechanism; FLOP counting.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "autograd/autocast.h"
#include "common/testing.h"
#include "data/shards.h"
#include "kernels/backend.h"
#include "train/metrics.h"
#include "train/plot.h"
#include "train/schedule.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace nha {
namespace {

constexpr int64_t kVocab = 64;

// Documents following a noisy rule (next = 3 * cur + 1 mod 61, sometimes random) so the loss can
// fall; EOS = 2 ends each document. Writes DIR/{train,val}_000000.h5 and a manifest with text_bytes.
void write_synthetic_shards(const std::string& dir) {
  fs::create_directories(dir);
  Generator gen(2024);
  int64_t total = 0;
  for (const char* split : {"train", "val"}) {
    std::vector<uint32_t> tokens;
    std::vector<uint64_t> offsets{0};
    const int docs = std::string(split) == "train" ? 120 : 30;
    for (int d = 0; d < docs; ++d) {
      uint32_t cur = 3 + uint32_t(gen.next_u64() % 60);
      const int len = 20 + int(gen.next_u64() % 40);
      for (int i = 0; i < len; ++i) {
        tokens.push_back(cur);
        cur = gen.uniform() < 0.8 ? 3 + (cur * 3 + 1) % 61 : 3 + uint32_t(gen.next_u64() % 61);
      }
      tokens.push_back(2);
      offsets.push_back(tokens.size());
    }
    data::ShardMeta m;
    m.split = split;
    m.vocab_size = kVocab;
    m.eos_id = 2;
    m.tokenizer_hash = "fnv1a64:trainer-test";
    m.tokenizer_name = "synthetic";
    m.token_bytes = 2;
    data::write_shard(dir + "/" + split + "_000000.h5", tokens, offsets, m);
    total += int64_t(tokens.size());
  }
  nlohmann::json manifest = {{"text_bytes", 4 * total},
                             {"splits", {{"train", {{"tokens", total}}}, {"val", {{"tokens", 0}}}}}};
  std::ofstream(dir + "/manifest.json") << manifest.dump();
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = (fs::temp_directory_path() /
             ("nha_trainer_test_" + std::to_string(::getpid()) + "_" +
              ::testing::UnitTest::GetInstance()->current_test_info()->name()))
                .string();
    fs::remove_all(root_);
    write_synthetic_shards(root_ + "/shards");
  }
  void TearDown() override { fs::remove_all(root_); }

  // 2 layers, d 32; 8 sequences of 16 tokens per step in micro-batches of `micro`.
  RunConfig config(const std::string& run, std::vector<std::string> overrides = {}) {
    const std::string yaml = R"(
model: {vocab_size: 64, d_model: 32, n_layers: 2, n_heads: 2, mlp_hidden: 64}
train: {device: cpu, seq_len: 16, micro_batch: 2, global_batch_tokens: 128, steps: 6, lr: 3.0e-3,
        warmup_steps: 2, seed: 7}
eval: {interval: 0, val_tokens: 256}
checkpoint: {interval: 0, keep_last: 3}
logging: {interval: 2}
)";
    // The test's own overrides come last so they can replace these.
    std::vector<std::string> all = {"data.train=" + root_ + "/shards", "data.val=" + root_ + "/shards",
                                    "logging.run_dir=" + root_ + "/" + run,
                                    "checkpoint.dir=" + root_ + "/" + run + "/checkpoints"};
    all.insert(all.end(), overrides.begin(), overrides.end());
    return parse_config(yaml, "test.yaml", all);
  }

  std::string root_;
};

std::vector<float> flat(const Tensor& t) { return t.detach().to_vector<float>(); }

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  std::vector<float> x = flat(a), y = flat(b);
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

TEST_F(TrainerTest, AccumulationEqualsLargeBatch) {
  Trainer small(config("small", {"train.micro_batch=2"}));
  Trainer large(config("large", {"train.micro_batch=8"}));
  EXPECT_EQ(small.accumulation(), 4);
  EXPECT_EQ(large.accumulation(), 1);
  data::Batch a = small.next_batch(), b = large.next_batch();
  ASSERT_EQ(a.inputs.to_vector<int32_t>(), b.inputs.to_vector<int32_t>()) << "same data per step";
  const double la = small.forward_backward(a), lb = large.forward_backward(b);
  EXPECT_NEAR(la, lb, 1e-5);
  auto pa = small.model().named_parameters(), pb = large.model().named_parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    ASSERT_TRUE(pa[i].tensor.grad().defined()) << pa[i].name;
    EXPECT_LT(testing::rel_rms(pa[i].tensor.grad(), pb[i].tensor.grad()), 1e-5) << pa[i].name;
  }
  // And a whole step (clip, AdamW) lands on the same parameters up to rounding.
  small.optimizer().zero_grad();
  large.optimizer().zero_grad();
  Trainer small2(config("small2", {"train.micro_batch=2"}));
  Trainer large2(config("large2", {"train.micro_batch=8"}));
  small2.train_step();
  large2.train_step();
  pa = small2.model().named_parameters();
  pb = large2.model().named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_LT(testing::rel_rms(pa[i].tensor, pb[i].tensor), 1e-5) << pa[i].name;
}

// The trainer's flat path (gradients in one flat buffer, clip_grad_norm_flat, one flat AdamW
// kernel) against the per-tensor path it replaced, run by hand on a twin trainer: per-tensor
// gradients from the backward, clip_grad_norm over them, Backend::adamw_step per parameter with
// moments of its own. Without clipping every loss and weight is the same to the bit; with
// clipping the two norms are summed in different orders, so the weights differ by rounding.
TEST_F(TrainerTest, FlatStepsMatchThePerTensorPath) {
  for (double clip : {0.0, 0.05}) {
    SCOPED_TRACE("grad_clip " + std::to_string(clip));
    const std::string c = "train.grad_clip=" + std::to_string(clip), tag = clip > 0 ? "c" : "n";
    Trainer flat(config("flat" + tag, {c})), ref(config("ref" + tag, {c}));
    const TrainConfig& t = ref.config().train;
    std::vector<NamedParameter> params = ref.model().named_parameters();
    std::vector<Tensor> tensors, m, v;
    for (const NamedParameter& p : params) {
      tensors.push_back(p.tensor);
      m.push_back(Tensor::zeros(p.tensor.shape()));
      v.push_back(Tensor::zeros(p.tensor.shape()));
    }
    for (int64_t step = 0; step < 4; ++step) {
      const StepStats st = flat.train_step();
      ref.optimizer().zero_grad();  // undefined: the backward allocates per-tensor gradients
      const double loss = ref.forward_backward(ref.next_batch(), step);
      const double norm = clip_grad_norm(tensors, t.grad_clip);
      {
        autograd::NoGradGuard no_grad;
        for (size_t i = 0; i < params.size(); ++i)
          backend_for(tensors[i]).adamw_step(
              tensors[i], tensors[i].grad(), m[i], v[i], lr_at(t, step), t.beta1, t.beta2, t.eps,
              params[i].kind == ParamKind::Weight ? t.weight_decay : 0.0, step + 1);
      }
      ASSERT_FALSE(st.skipped);
      if (clip == 0)
        EXPECT_EQ(st.loss, loss) << "step " << step;
      else
        EXPECT_NEAR(st.loss, loss, 1e-6 * loss) << "step " << step;
      EXPECT_NEAR(st.grad_norm, norm, 1e-6 * norm) << "step " << step;
      if (clip > 0) EXPECT_GT(norm, clip) << "the test should clip";
    }
    const std::vector<NamedParameter> pf = flat.model().named_parameters();
    for (size_t i = 0; i < pf.size(); ++i) {
      if (clip == 0)
        EXPECT_TRUE(bitwise_equal(pf[i].tensor, params[i].tensor)) << pf[i].name;
      else
        EXPECT_LT(testing::rel_rms(pf[i].tensor, params[i].tensor), 1e-6) << pf[i].name;
    }
  }
}

TEST_F(TrainerTest, ResumeIsBitwiseIdentical) {
  // Every micro-batch loss of every step, recorded by the loss hook.
  auto recorder = [](std::vector<double>& out) {
    return [&out](int64_t, int64_t, const Tensor& loss) {
      out.push_back(loss.item<double>());
      return loss;
    };
  };
  std::vector<double> straight, resumed;
  const std::vector<std::string> sets = {"eval.interval=2", "checkpoint.interval=3"};
  TrainerOptions o;
  o.loss_hook = recorder(straight);
  Trainer a(config("straight", sets), o);
  a.train();
  ASSERT_EQ(a.step(), 6);
  ASSERT_EQ(straight.size(), 6u * 4u);

  {
    TrainerOptions o1;
    o1.loss_hook = recorder(resumed);
    Trainer b(config("resumed", sets), o1);
    b.train(3);  // checkpoint.interval 3: step_00000003.h5
    ASSERT_EQ(b.step(), 3);
  }
  TrainerOptions o2;
  o2.resume = true;
  o2.loss_hook = recorder(resumed);
  Trainer c(config("resumed", sets), o2);
  EXPECT_EQ(c.step(), 3);
  EXPECT_EQ(c.tokens_seen(), 3 * 128);
  c.train();
  ASSERT_EQ(c.step(), 6);
  ASSERT_EQ(resumed.size(), straight.size());
  for (size_t i = 0; i < straight.size(); ++i)
    EXPECT_EQ(std::memcmp(&straight[i], &resumed[i], sizeof(double)), 0)
        << "micro-batch loss " << i << ": " << straight[i] << " vs " << resumed[i];
  auto pa = a.model().named_parameters(), pc = c.model().named_parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(pa[i].tensor, pc[i].tensor)) << pa[i].name;
    EXPECT_TRUE(bitwise_equal(a.optimizer().m(i), c.optimizer().m(i))) << "m of " << pa[i].name;
    EXPECT_TRUE(bitwise_equal(a.optimizer().v(i), c.optimizer().v(i))) << "v of " << pa[i].name;
  }
  EXPECT_EQ(a.optimizer().step_count(), c.optimizer().step_count());
  // Both final checkpoints hold the same parameters.
  auto fa = read_parameters(latest_checkpoint(root_ + "/straight/checkpoints"));
  auto fc = read_parameters(latest_checkpoint(root_ + "/resumed/checkpoints"));
  for (auto& [name, t] : fa) EXPECT_TRUE(bitwise_equal(t, fc.at(name))) << name;
}

// train.init_from: a fresh run starts from a trained run's parameters (through an export file,
// as after nha import / convert) with a fresh optimizer and step; another network is refused.
TEST_F(TrainerTest, InitFromStartsFromAnotherRunsParameters) {
  Trainer a(config("source", {"checkpoint.interval=3"}));
  a.train();
  const std::string exported = root_ + "/source.h5";
  export_parameters(latest_checkpoint(root_ + "/source/checkpoints"), exported, DType::F32);
  Trainer b(config("tuned", {"train.init_from=" + exported, "train.seed=99"}));
  EXPECT_EQ(b.step(), 0);
  EXPECT_EQ(b.optimizer().step_count(), 0);
  auto pa = a.model().named_parameters(), pb = b.model().named_parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(bitwise_equal(pa[i].tensor, pb[i].tensor)) << pa[i].name;
  b.train(1);
  EXPECT_FALSE(bitwise_equal(pa[0].tensor, b.model().named_parameters()[0].tensor)) << "it trains";
  // The same parameter shapes but another mixer: refused, naming the layer.
  testing::expect_error(
      [&] { Trainer(config("other", {"train.init_from=" + exported, "model.layers=[{type: attention}, {type: attention, window: 4}]"})); },
      {"train.init_from", "layer 1: attention window 0 vs attention window 4", "HINT"});
  testing::expect_error([&] { Trainer(config("none", {"train.init_from=" + root_ + "/nothing.h5"})); },
                        {"nothing.h5"});
}

// A damaged newest checkpoint: --resume says so and continues from the newest one that loads.
TEST_F(TrainerTest, ResumeFallsBackToTheNewestCheckpointThatLoads) {
  const std::vector<std::string> sets = {"checkpoint.interval=3"};
  Trainer(config("run", sets)).train();
  const std::string newest = root_ + "/run/checkpoints/step_00000006.h5";
  std::string bytes = testing::read_file(newest);
  ASSERT_FALSE(bytes.empty());
  bytes[bytes.size() / 2] = char(bytes[bytes.size() / 2] ^ 1);
  std::ofstream(newest, std::ios::binary | std::ios::trunc) << bytes;
  std::ostringstream log;
  TrainerOptions o;
  o.resume = true;
  o.log = &log;
  Trainer resumed(config("run", sets), o);
  EXPECT_EQ(resumed.step(), 3);
  EXPECT_NE(log.str().find("cannot resume from " + newest), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("is damaged"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("an older checkpoint"), std::string::npos) << log.str();
  // With every checkpoint damaged the error names the newest's problem.
  const std::string older = root_ + "/run/checkpoints/step_00000003.h5";
  std::ofstream(older, std::ios::binary | std::ios::trunc) << bytes.substr(0, 100);
  testing::expect_error([&] { Trainer again(config("run", sets), o); },
                        {"none of the 2 checkpoints", newest, "is damaged"});
}

TEST_F(TrainerTest, NanGuardSkipsTheUpdateThenStops) {
  int64_t nan_from = 2, nan_until = 2;  // steps whose loss is poisoned
  TrainerOptions o;
  o.loss_hook = [&](int64_t step, int64_t, const Tensor& loss) {
    return step >= nan_from && step <= nan_until ? loss * std::nan("") : loss;
  };
  Trainer t(config("nan", {"train.max_bad_steps=3", "train.steps=20"}), o);
  t.train_step();
  t.train_step();
  std::vector<std::vector<float>> before;
  for (const NamedParameter& p : t.model().named_parameters()) before.push_back(flat(p.tensor));
  StepStats bad = t.train_step();  // step 2: NaN loss and gradients
  EXPECT_TRUE(bad.skipped);
  EXPECT_NE(bad.skip_reason.find("nan"), std::string::npos) << bad.skip_reason;
  EXPECT_EQ(t.step(), 3) << "the step (and its batch) is consumed";
  EXPECT_EQ(t.optimizer().step_count(), 2) << "no AdamW update for the bad step";
  auto params = t.model().named_parameters();
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_EQ(flat(params[i].tensor), before[i]) << params[i].name << " changed by a skipped step";
  EXPECT_FALSE(t.train_step().skipped) << "a good step after a bad one trains again";
  EXPECT_EQ(t.optimizer().step_count(), 3);

  // From step 6 on every loss is NaN: after 3 in a row the run stops with a clear message.
  nan_from = 6;
  nan_until = 1000;
  std::ostringstream log;
  try {
    t.train();
    ADD_FAILURE() << "training went on through NaN losses";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("3 bad steps in a row"), std::string::npos) << msg;
    EXPECT_NE(msg.find("HINT"), std::string::npos) << msg;
  }
  EXPECT_EQ(t.step(), 9);
  EXPECT_EQ(t.optimizer().step_count(), 5);  // steps 0, 1, 3, 4, 5
  int skips = 0;
  std::ifstream in(root_ + "/nan/metrics.jsonl");
  for (std::string line; std::getline(in, line);)
    skips += nlohmann::json::parse(line)["type"] == "skip";
  EXPECT_EQ(skips, 3) << "each skipped step is in metrics.jsonl";
}

TEST_F(TrainerTest, ValidationLossAndBitsPerByte) {
  Trainer t(config("val"));
  EXPECT_DOUBLE_EQ(t.bytes_per_token(), 4.0);  // the manifest: text_bytes / tokens
  ValStats v = t.validate();
  EXPECT_EQ(v.tokens, 256);                    // val_tokens / seq_len windows of 16 targets
  EXPECT_NEAR(v.loss, std::log(double(kVocab)), 0.5) << "an untrained model is near chance";
  EXPECT_NEAR(v.bpb, v.loss / std::log(2.0) / 4.0, 1e-12);
  EXPECT_EQ(v.accuracy, -1);
  ValStats again = t.validate();
  EXPECT_EQ(again.loss, v.loss) << "the validation set is fixed";
}

TEST_F(TrainerTest, LogsMetricsConfigAndPlot) {
  std::ostringstream log;
  TrainerOptions o;
  o.log = &log;
  Trainer t(config("logs", {"eval.interval=3"}), o);
  t.train();
  const std::string text = log.str();
  for (const char* needle : {"parameters", "step      2/6 | loss", "tok/s", "mfu n/a", "(rss)", "eta",
                             "val  step 3 | loss", "bpb", "checkpoint"})
    EXPECT_NE(text.find(needle), std::string::npos) << "'" << needle << "' not in:\n" << text;
  // The resolved config round-trips.
  RunConfig saved = load_config(root_ + "/logs/config.yaml");
  EXPECT_EQ(to_yaml(saved).substr(to_yaml(saved).find("train:")),
            to_yaml(t.config()).substr(to_yaml(t.config()).find("train:")));
  // metrics.jsonl: a train record per logging interval, val records at 3 and 6.
  int train = 0, val = 0;
  std::ifstream in(root_ + "/logs/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (j["type"] == "train") {
      ++train;
      EXPECT_GT(j["tokens_per_s"].get<double>(), 0);
      EXPECT_TRUE(std::isfinite(j["loss"].get<double>()));
    }
    if (j["type"] == "val") {
      ++val;
      EXPECT_TRUE(j.contains("bpb"));
    }
  }
  EXPECT_EQ(train, 3);
  EXPECT_EQ(val, 2);
  // Loss decreases on this learnable data.
  RunCurve c = read_run_metrics(root_ + "/logs");
  ASSERT_EQ(c.train.size(), 3u);
  EXPECT_LT(c.val.back().second, c.val.front().second + 0.5);
  write_loss_plot({root_ + "/logs", root_ + "/logs/metrics.jsonl"}, root_ + "/plot/loss.svg", "test");
  std::ifstream svg_in(root_ + "/plot/loss.svg");
  std::stringstream svg;
  svg << svg_in.rdbuf();
  for (const char* needle : {"<svg", "<polyline", "logs train", "logs val", "tokens", "loss (nats/token)"})
    EXPECT_NE(svg.str().find(needle), std::string::npos) << needle;
  EXPECT_THROW(write_loss_plot({root_ + "/nowhere"}, root_ + "/x.svg"), Error);
}

TEST_F(TrainerTest, RefusalsNameTheProblem) {
  auto expect_error = [](const std::function<void()>& f, const std::vector<std::string>& needles) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one mentioning " << needles[0];
    } catch (const Error& e) {
      for (const std::string& n : needles)
        EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "'" << n << "' not in: " << e.what();
    }
  };
  expect_error([&] { Trainer t(config("a", {"train.precision=bf16"})); },
               {"train.precision", "HINT"});
  expect_error([&] { Trainer t(config("a", {"data.train=" + root_ + "/none"})); },
               {"data.train", "nha prepare", "HINT"});
  expect_error([&] { Trainer t(config("a", {"model.vocab_size=32"})); }, {"vocab_size", "HINT"});
  TrainerOptions resume;
  resume.resume = true;
  expect_error([&] { Trainer t(config("b"), resume); }, {"--resume", "no checkpoint", "HINT"});
  {
    Trainer t(config("c", {"train.steps=1"}));
    t.train();
  }
  expect_error([&] { Trainer t(config("c", {"train.steps=1"})); }, {"already holds checkpoints", "--resume"});
  if (cuda_device_count() == 0)
    expect_error([&] { Trainer t(config("d", {"train.device=cuda"})); }, {"cuda", "HINT"});
}

TEST(Autocast, CastsOperandsAndReturnsFp32Gradients) {
  // The casting mechanism on the CPU, with f64 as the compute dtype (the CPU has no bf16 kernels):
  // f32 master weights, f64 activations and loss, f32 gradients equal to the fp32 run's.
  ModelConfig cfg;
  cfg.vocab_size = 32;
  cfg.d_model = 16;
  cfg.n_layers = 2;
  cfg.n_heads = 2;
  cfg.mlp_hidden = 32;
  LanguageModel ref(cfg, 3), mixed(cfg, 3);
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{1, 5, 9, 3, 7, 2, 8, 4}, {2, 4});
  Tensor tgt = Tensor::from_vector(std::vector<int32_t>{5, 9, 3, 7, 2, 8, 4, 1}, {2, 4});
  Tensor l_ref = ref.loss(ids, tgt);
  l_ref.backward();
  Tensor l_mixed;
  {
    AutocastGuard guard(DType::F64);
    EXPECT_TRUE(autocast_enabled());
    l_mixed = mixed.loss(ids, tgt);
  }
  EXPECT_FALSE(autocast_enabled());
  EXPECT_EQ(l_mixed.dtype(), DType::F64) << "the compute ran in the autocast dtype";
  EXPECT_NEAR(l_mixed.item<double>(), l_ref.item<double>(), 1e-5);
  l_mixed.backward();
  auto pr = ref.named_parameters(), pm = mixed.named_parameters();
  for (size_t i = 0; i < pr.size(); ++i) {
    ASSERT_TRUE(pm[i].tensor.grad().defined()) << pm[i].name;
    EXPECT_EQ(pm[i].tensor.dtype(), DType::F32) << pm[i].name;
    EXPECT_EQ(pm[i].tensor.grad().dtype(), DType::F32) << pm[i].name << ": master grads are f32";
    EXPECT_LT(testing::rel_rms(pm[i].tensor.grad(), pr[i].tensor.grad()), 1e-4) << pm[i].name;
  }
  {
    AutocastGuard off(DType::F32);
    EXPECT_FALSE(autocast_enabled());
  }
}

TEST(Metrics, FlopsPerTokenCountsSpans) {
  MixerConfig full, win, nha, gsa;
  win.window = 2;
  nha.type = MixerType::NHA;
  nha.window = 2;
  nha.slots = 8;
  gsa.type = MixerType::GSA;
  gsa.slots = 8;
  EXPECT_DOUBLE_EQ(mixer_span(full, 4), 2.5);          // (1 + 2 + 3 + 4) / 4
  EXPECT_DOUBLE_EQ(mixer_span(win, 4), 1.75);          // (1 + 2 + 2 + 2) / 4
  EXPECT_DOUBLE_EQ(mixer_span(nha, 4), 1.75 + 8);
  EXPECT_DOUBLE_EQ(mixer_span(gsa, 4), 8);
  ModelConfig m;
  m.d_model = 10;
  m.n_layers = 2;
  EXPECT_DOUBLE_EQ(flops_per_token(m, 4, 1000), 6.0 * 1000 + 12.0 * 10 * 2 * 2.5);
  EXPECT_EQ(format_count(1234567), "1.23M");
  EXPECT_EQ(format_duration(3725), "1h02m");
}

}  // namespace
}  // namespace nha
