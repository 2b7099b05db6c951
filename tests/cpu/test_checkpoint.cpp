// HDF5 checkpoints: every tensor and attribute round-trips bitwise, failed writes leave nothing
// behind, keep_last pruning, parameters-only export in f32 and bf16, mismatches explained.
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "common/testing.h"
#include "layers/transformer.h"
#include "train/checkpoint.h"
#include "train/optim.h"

namespace fs = std::filesystem;

namespace nha {
namespace {

ModelConfig tiny_model(int64_t d = 16) {
  ModelConfig c;
  c.vocab_size = 40;
  c.d_model = d;
  c.n_layers = 2;
  c.n_heads = 2;
  c.mlp_hidden = 32;
  return c;
}

std::vector<ParamEntry> entries_of(const LanguageModel& m) {
  std::vector<ParamEntry> e;
  for (const NamedParameter& p : m.named_parameters())
    e.push_back({p.name, p.tensor, p.kind == ParamKind::Weight});
  return e;
}

// Two AdamW steps with random gradients: parameters, m and v all differ from their init.
void random_steps(LanguageModel& model, AdamW& opt, uint64_t seed) {
  for (int s = 0; s < 2; ++s) {
    for (const NamedParameter& p : model.named_parameters()) {
      Tensor t = p.tensor;
      t.mutable_grad() = testing::randn(t.shape(), seed + 17 * s + t.numel(), DType::F32);
    }
    opt.step(1e-2);
    opt.zero_grad();
  }
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  std::vector<float> x = a.to_vector<float>(), y = b.to_vector<float>();
  return std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() /
            ("nha_ckpt_test_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

TEST_F(CheckpointTest, RoundTripEveryTensorAndAttribute) {
  LanguageModel model(tiny_model(), 1);
  AdamW opt(entries_of(model), {.lr = 1e-2, .weight_decay = 0.1});
  random_steps(model, opt, 5);
  TrainState st;
  st.step = 12;
  st.tokens_seen = 12345;
  st.optim_step = opt.step_count();
  st.rng_seed = 0xfeedbeefcafeull;
  st.rng_offset = 987654321ull;
  st.loss_ema = 2.718281828459045;
  st.loss_ema_count = 11;
  st.bad_steps_in_row = 2;
  st.loader_state = R"({"kind":"tokens","step":12})";
  st.config_yaml = "model:\n  d_model: 16\n";
  const std::string path = checkpoint_path(dir_, st.step);
  save_checkpoint(path, model.named_parameters(), &opt, st);
  EXPECT_EQ(fs::path(path).filename(), "step_00000012.h5");

  TrainState r = read_train_state(path);
  EXPECT_EQ(r.step, st.step);
  EXPECT_EQ(r.tokens_seen, st.tokens_seen);
  EXPECT_EQ(r.optim_step, 2);
  EXPECT_EQ(r.rng_seed, st.rng_seed);
  EXPECT_EQ(r.rng_offset, st.rng_offset);
  EXPECT_EQ(r.loss_ema, st.loss_ema);  // bitwise: stored as f64
  EXPECT_EQ(r.loss_ema_count, st.loss_ema_count);
  EXPECT_EQ(r.bad_steps_in_row, st.bad_steps_in_row);
  EXPECT_EQ(r.loader_state, st.loader_state);
  EXPECT_EQ(r.config_yaml, st.config_yaml);
  EXPECT_EQ(read_config_yaml(path), st.config_yaml);

  // A model and optimizer from another seed become identical to the saved ones.
  LanguageModel other(tiny_model(), 99);
  AdamW other_opt(entries_of(other), {.lr = 1e-2, .weight_decay = 0.1});
  load_checkpoint(path, other.named_parameters(), &other_opt);
  EXPECT_EQ(other_opt.step_count(), opt.step_count());
  auto a = model.named_parameters(), b = other.named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(a[i].tensor, b[i].tensor)) << a[i].name;
    EXPECT_TRUE(bitwise_equal(opt.m(i), other_opt.m(i))) << "m of " << a[i].name;
    EXPECT_TRUE(bitwise_equal(opt.v(i), other_opt.v(i))) << "v of " << a[i].name;
  }
  std::map<std::string, Tensor> params = read_parameters(path);
  EXPECT_EQ(params.size(), a.size());
  for (const NamedParameter& p : a) EXPECT_TRUE(bitwise_equal(params.at(p.name), p.tensor)) << p.name;
}

TEST_F(CheckpointTest, FailedWriteLeavesNoFileBehind) {
  LanguageModel model(tiny_model(), 1);
  AdamW opt(entries_of(model), {});
  TrainState st;
  st.step = 1;
  save_checkpoint(checkpoint_path(dir_, 1), model.named_parameters(), &opt, st);
  random_steps(model, opt, 3);
  st.step = 2;
  set_checkpoint_failure_for_testing(5);  // dies in the middle of /params
  EXPECT_THROW(save_checkpoint(checkpoint_path(dir_, 2), model.named_parameters(), &opt, st), Error);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir_)) files.push_back(e.path().filename().string());
  EXPECT_EQ(files, std::vector<std::string>{"step_00000001.h5"}) << "a partial or temp file remains";
  EXPECT_EQ(latest_checkpoint(dir_), checkpoint_path(dir_, 1));
  EXPECT_EQ(read_train_state(latest_checkpoint(dir_)).step, 1) << "the older checkpoint is intact";
  // The hook is one-shot: the next write succeeds.
  save_checkpoint(checkpoint_path(dir_, 2), model.named_parameters(), &opt, st);
  EXPECT_EQ(read_train_state(latest_checkpoint(dir_)).step, 2);
}

TEST_F(CheckpointTest, KeepLastPrunesOldest) {
  LanguageModel model(tiny_model(8), 1);
  for (int64_t s : {3, 10, 1, 7, 5}) {
    TrainState st;
    st.step = s;
    save_checkpoint(checkpoint_path(dir_, s), model.named_parameters(), nullptr, st);
  }
  // Temp files and other names are never checkpoints.
  { std::ofstream(dir_ + "/step_00000099.h5.tmp.123") << "partial"; }
  { std::ofstream(dir_ + "/notes.h5") << "x"; }
  auto all = list_checkpoints(dir_);
  ASSERT_EQ(all.size(), 5u);
  EXPECT_EQ(all.front().first, 1);
  EXPECT_EQ(all.back().first, 10);
  std::vector<std::string> removed = prune_checkpoints(dir_, 2);
  EXPECT_EQ(removed.size(), 3u);
  all = list_checkpoints(dir_);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].first, 7);
  EXPECT_EQ(all[1].first, 10);
  EXPECT_TRUE(fs::exists(dir_ + "/notes.h5"));
  // A step beyond int64 is no name of ours: ignored (it used to end every run in `stoll`).
  { std::ofstream(dir_ + "/step_99999999999999999999.h5") << "x"; }
  EXPECT_EQ(list_checkpoints(dir_).size(), 2u);
  // Temp files of writers that no longer run are removed; this process's are not.
  const std::string own = dir_ + "/step_00000011.h5.tmp." + std::to_string(::getpid());
  const std::string dead = dir_ + "/step_00000012.h5.tmp.2147483647";  // above any pid_max
  { std::ofstream(own) << "being written"; }
  { std::ofstream(dead) << "left by a killed writer"; }
  const std::vector<std::string> stale = remove_stale_temp_files(dir_);
  EXPECT_NE(std::find(stale.begin(), stale.end(), dead), stale.end());
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(own));
}

TEST_F(CheckpointTest, ExportRefusesToReplaceItsSource) {
  LanguageModel model(tiny_model(8), 1);
  const std::string path = checkpoint_path(dir_, 4);
  save_checkpoint(path, model.named_parameters(), nullptr, TrainState{});
  const std::string before = testing::read_file(path);
  testing::expect_error([&] { export_parameters(path, path, DType::BF16); },
                        {"is the checkpoint being exported", "HINT"});
  testing::expect_error([&] { export_parameters(path, dir_ + "/./step_00000004.h5", DType::F32); },
                        {"would be replaced"});
  EXPECT_EQ(testing::read_file(path), before);
}

TEST_F(CheckpointTest, ExportF32IsExactAndBf16IsRounded) {
  LanguageModel model(tiny_model(), 1);
  AdamW opt(entries_of(model), {});
  random_steps(model, opt, 9);
  TrainState st;
  st.step = 4;
  st.tokens_seen = 400;
  st.config_yaml = "model: {}\n";
  const std::string ckpt = checkpoint_path(dir_, 4);
  save_checkpoint(ckpt, model.named_parameters(), &opt, st);
  export_parameters(ckpt, dir_ + "/out/f32.h5", DType::F32);
  export_parameters(ckpt, dir_ + "/out/bf16.h5", DType::BF16);
  auto f32 = read_parameters(dir_ + "/out/f32.h5"), b16 = read_parameters(dir_ + "/out/bf16.h5");
  EXPECT_LT(fs::file_size(dir_ + "/out/bf16.h5"), fs::file_size(dir_ + "/out/f32.h5"));
  for (const NamedParameter& p : model.named_parameters()) {
    EXPECT_TRUE(bitwise_equal(f32.at(p.name), p.tensor)) << p.name;
    Tensor rounded = p.tensor.detach().to(DType::BF16).to(DType::F32);
    EXPECT_TRUE(bitwise_equal(b16.at(p.name), rounded)) << p.name << ": bf16 round trip";
  }
  EXPECT_EQ(read_config_yaml(dir_ + "/out/bf16.h5"), st.config_yaml);
  TrainState es = read_train_state(dir_ + "/out/bf16.h5");  // step and tokens of the export
  EXPECT_EQ(es.step, 4);
  EXPECT_EQ(es.tokens_seen, 400);
  // An export cannot resume a run.
  try {
    load_checkpoint(dir_ + "/out/f32.h5", model.named_parameters(), &opt);
    ADD_FAILURE() << "an export file was accepted as a training checkpoint";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("HINT"), std::string::npos) << e.what();
  }
}

TEST_F(CheckpointTest, MismatchesAreExplained) {
  LanguageModel model(tiny_model(16), 1);
  TrainState st;
  save_checkpoint(checkpoint_path(dir_, 0), model.named_parameters(), nullptr, st);
  LanguageModel wider(tiny_model(32), 1);
  try {
    load_checkpoint(checkpoint_path(dir_, 0), wider.named_parameters(), nullptr);
    ADD_FAILURE() << "a checkpoint of another shape was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("embed.weight"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("HINT"), std::string::npos) << e.what();
  }
  ModelConfig deeper = tiny_model(16);
  deeper.n_layers = 3;
  LanguageModel three(deeper, 1);
  try {
    load_checkpoint(checkpoint_path(dir_, 0), three.named_parameters(), nullptr);
    ADD_FAILURE() << "a checkpoint with missing layers was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.2.mixer.wq.weight"), std::string::npos) << e.what();
  }
  EXPECT_THROW(read_train_state(dir_ + "/missing.h5"), Error);
  { std::ofstream(dir_ + "/garbage.h5") << "not hdf5"; }
  testing::expect_error([&] { read_train_state(dir_ + "/garbage.h5"); },
                        {"garbage.h5", "neither an integrity seal nor the HDF5 signature", "HINT"});
  // Unsealed files (written before seals) go to HDF5 as they are; its errors name the call.
  { std::ofstream(dir_ + "/garbage.h5") << "\x89HDF\r\n\x1a\nnot hdf5"; }
  try {
    read_train_state(dir_ + "/garbage.h5");
    ADD_FAILURE() << "garbage accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("H5Fopen"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("checkpoint.cpp:"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nha
