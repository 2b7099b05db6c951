// Data-parallel training on the CPU over MPI, end to end (label cpu; skips where the build has no
// MPI or mpirun is missing): the real `nha train --ranks N --set train.device=cpu` (mpirun under
// it) on a tiny MQAR model, against one process with the same global batch:
//   - 2 ranks == 1 rank accumulating the same 2 micro-batches: parameters bitwise, losses to 1e-6
//     (the loss is summed in f32 on one rank and in f64 across ranks);
//   - resume 2 -> 1 and 1 -> 2 ranks from a checkpoint: the same bits as the run that never stopped;
//   - a rank that exits or hangs ends the job within a bounded time, named in the output;
//   - ranks started with different configs are refused;
//   - ZeRO-1 (train.zero=1) on 2 ranks == plain 2 ranks == 1 rank, with about half the optimizer
//     state per rank; its unsharded checkpoints resume on 1 rank without ZeRO and on 2 with it, and
//     a plain checkpoint resumes under ZeRO-1; ZeRO-1 on one rank is refused.
// Every run uses one OpenMP thread per process, so that 1 and 2 ranks reduce in the same order.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "common/testing.h"
#include "train/checkpoint.h"
#include "train/distributed.h"

namespace fs = std::filesystem;

#ifndef NHA_BINARY  // tests/CMakeLists.txt defines it when the nha command is built
#define NHA_BINARY ""
#endif

namespace nha {
namespace {

// Attention and NHA layers in fp32 on the CPU; MQAR data needs no files. 16 rows per step: two
// micro-batches of 8 on one rank, one per rank on two; gradient buckets of 20 KB (several). The
// constant schedule lets a run of 4 steps resume to 8 exactly like a run of 8.
const char* kConfig = R"(model:
  vocab_size: 512
  d_model: 32
  n_layers: 2
  n_heads: 2
  layers: [{type: attention}, {type: nha, window: 8, slots: 4}]
train:
  device: cpu
  seq_len: 32
  global_batch_tokens: 512
  micro_batch: 8
  steps: 8
  lr: 3.0e-3
  schedule: constant
  warmup_steps: 0
  grad_clip: 1.0
  seed: 0
  dist_timeout_s: 5
  dist_bucket_mb: 0.02
data:
  type: mqar
  mqar_preset: L32-K4-N1000-V512
checkpoint:
  interval: 4
logging:
  interval: 1
)";

class MpiRanks : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string(NHA_BINARY).empty()) GTEST_SKIP() << "the nha command is not built";
    if (!dist::mpi_built()) GTEST_SKIP() << "this build has no MPI (scripts/setup.sh --with-mpi)";
    if (std::system("command -v mpirun > /dev/null 2>&1") != 0) GTEST_SKIP() << "no mpirun";
    dir_ = testing::temp_dir("mpi-ranks");
    std::ofstream(dir_ + "/tiny.yaml") << kConfig;
  }

  struct Result {
    int status = -1;
    std::string output;
    double seconds = 0;
  };

  // `nha train CONFIG --ranks N ARGS` in the test's directory, `env` prepended.
  Result train(int ranks, const std::string& args, const std::string& env = "",
               const std::string& config = "tiny.yaml") {
    const std::string log = dir_ + "/last.log";
    const std::string cmd = "cd " + dir_ + " && OMP_NUM_THREADS=1 " + env + " " + NHA_BINARY +
                            " train " + config + " --quiet --ranks " + std::to_string(ranks) +
                            " " + args + " > " + log + " 2>&1";
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = std::system(cmd.c_str());
    Result r;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    r.output = testing::read_file(log);
    return r;
  }

  // Trains `run` from scratch; expects success.
  void train_run(const std::string& run, int ranks, const std::string& extra = "") {
    fs::remove_all(dir_ + "/" + run);
    const Result r = train(ranks, "--set logging.run_dir=" + run + " " + extra);
    ASSERT_EQ(r.status, 0) << run << " failed:\n" << r.output;
  }

  // step -> training loss of RUN/metrics.jsonl.
  std::map<int64_t, double> losses(const std::string& run) {
    std::map<int64_t, double> out;
    std::istringstream in(testing::read_file(dir_ + "/" + run + "/metrics.jsonl"));
    for (std::string line; std::getline(in, line);) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j.at("type") == "train") out[j.at("step").get<int64_t>()] = j.at("loss").get<double>();
    }
    return out;
  }

  // optimizer_bytes_per_rank of RUN/metrics.jsonl's first train record.
  int64_t optimizer_bytes_per_rank(const std::string& run) {
    std::istringstream in(testing::read_file(dir_ + "/" + run + "/metrics.jsonl"));
    std::string line;
    std::getline(in, line);
    return nlohmann::json::parse(line).at("optimizer_bytes_per_rank").get<int64_t>();
  }

  // Resumes `run` (at its step-4 checkpoint) to step 8 on `ranks` ranks; expects success.
  void resume_run(const std::string& run, int ranks, const std::string& extra = "") {
    const Result r = train(ranks, "--resume --set logging.run_dir=" + run + " " + extra);
    ASSERT_EQ(r.status, 0) << run << " resume failed:\n" << r.output;
  }

  // Every parameter of the run's step-8 checkpoint equal bit for bit to the reference run's.
  void expect_same_parameters(const std::string& run, const std::string& ref) {
    const auto a = read_parameters(dir_ + "/" + run + "/checkpoints/step_00000008.h5");
    const auto b = read_parameters(dir_ + "/" + ref + "/checkpoints/step_00000008.h5");
    ASSERT_EQ(a.size(), b.size());
    for (const auto& [name, t] : a) {
      const std::vector<float> x = t.to_vector<float>(), y = b.at(name).to_vector<float>();
      EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float))) << run << ": " << name;
    }
  }

  std::string dir_;
};

TEST_F(MpiRanks, TwoRanksEqualOneRankWithTheSameGlobalBatch) {
  train_run("one", 1);
  train_run("two", 2);
  const auto l1 = losses("one"), l2 = losses("two");
  ASSERT_EQ(l1.size(), 8u);
  ASSERT_EQ(l2.size(), 8u);
  for (const auto& [step, loss] : l1) EXPECT_NEAR(l2.at(step), loss, 1e-6 * loss) << "step " << step;
  expect_same_parameters("two", "one");
  EXPECT_NE(losses("one").at(1), losses("one").at(8)) << "the runs trained";
}

TEST_F(MpiRanks, ResumeOnOtherRankCounts) {
  train_run("one", 1);
  for (const auto& [first, then] : {std::pair{2, 1}, std::pair{1, 2}}) {
    const std::string run = "r" + std::to_string(first) + std::to_string(then);
    train_run(run, first, "--set train.steps=4");  // ends with its step-4 checkpoint
    const Result r = train(then, "--resume --set logging.run_dir=" + run);
    ASSERT_EQ(r.status, 0) << run << " resume failed:\n" << r.output;
    expect_same_parameters(run, "one");
  }
}

TEST_F(MpiRanks, ADeadRankEndsTheJobAndIsNamed) {
  const Result exited = train(2, "--set logging.run_dir=exit", "NHA_TEST_FAULT=exit:1:3");
  EXPECT_NE(exited.status, 0) << exited.output;
  EXPECT_NE(exited.output.find("rank 1: NHA_TEST_FAULT: exit at step 3"), std::string::npos)
      << exited.output;
  EXPECT_LT(exited.seconds, 60) << exited.output;
  // A hung rank: the other one's watchdog gives up after train.dist_timeout_s = 5 s.
  const Result hung = train(2, "--set logging.run_dir=hang", "NHA_TEST_FAULT=hang:1:3");
  EXPECT_NE(hung.status, 0) << hung.output;
  EXPECT_NE(hung.output.find("rank 0: "), std::string::npos) << hung.output;
  EXPECT_NE(hung.output.find("did not finish within train.dist_timeout_s"), std::string::npos)
      << hung.output;
  EXPECT_LT(hung.seconds, 60) << hung.output;
}

TEST_F(MpiRanks, RanksWithDifferentConfigsAreRefused) {
  std::string other = kConfig;
  other.replace(other.find("lr: 3.0e-3"), 10, "lr: 1.0e-3");
  std::ofstream(dir_ + "/other.yaml") << other;
  // One mpirun, two programs: rank 0 with tiny.yaml, rank 1 with other.yaml.
  const std::string root = geteuid() == 0 ? " --allow-run-as-root" : "";
  const std::string cmd = "cd " + dir_ + " && OMP_NUM_THREADS=1 mpirun --oversubscribe" + root +
                          " -np 1 " + NHA_BINARY + " train tiny.yaml --quiet : -np 1 " +
                          NHA_BINARY + " train other.yaml --quiet > mismatch.log 2>&1";
  const int rc = std::system(cmd.c_str());
  const std::string out = testing::read_file(dir_ + "/mismatch.log");
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("configs differ between ranks"), std::string::npos) << out;
}

TEST_F(MpiRanks, ZeroOneEqualsPlainDataParallelAndOneRank) {
  train_run("one", 1);
  train_run("two", 2);
  train_run("zero", 2, "--set train.zero=1");
  const auto l1 = losses("one"), l2 = losses("two"), lz = losses("zero");
  ASSERT_EQ(lz.size(), 8u);
  for (const auto& [step, loss] : l2) {
    EXPECT_EQ(lz.at(step), loss) << "step " << step << ": ZeRO-1 vs plain, both on 2 ranks";
    EXPECT_NEAR(lz.at(step), l1.at(step), 1e-6 * loss) << "step " << step << ": ZeRO-1 vs 1 rank";
  }
  // The update is elementwise and every rank's slice of the averaged gradient has the bits of the
  // all-reduce's; only the clipping norm is summed in another order (per rank, then over ranks),
  // which did not change a bit of the parameters here.
  expect_same_parameters("zero", "two");
  expect_same_parameters("zero", "one");
  // m and v of half the parameters per rank; more than half by the padding of every parameter to
  // a multiple of 2 x 64 elements (< 1% here).
  const int64_t plain = optimizer_bytes_per_rank("two"), zero = optimizer_bytes_per_rank("zero");
  EXPECT_GE(2 * zero, plain);
  EXPECT_LE(double(zero), 0.51 * double(plain)) << zero << " vs " << plain << " bytes";
}

TEST_F(MpiRanks, ZeroOneCheckpointsResumeOnAnyRankCountWithOrWithoutZero) {
  train_run("one", 1);
  // ZeRO-1 on 2 ranks to step 4, then on 1 rank without ZeRO and on 2 ranks with it.
  train_run("zero", 2, "--set train.zero=1 --set train.steps=4");
  fs::copy(dir_ + "/zero", dir_ + "/zero-then-one", fs::copy_options::recursive);
  resume_run("zero", 2, "--set train.zero=1");
  resume_run("zero-then-one", 1);
  // A plain checkpoint of 1 rank, resumed under ZeRO-1 on 2.
  train_run("one-then-zero", 1, "--set train.steps=4");
  resume_run("one-then-zero", 2, "--set train.zero=1");
  for (const char* run : {"zero", "zero-then-one", "one-then-zero"})
    expect_same_parameters(run, "one");
}

TEST_F(MpiRanks, ImpossibleZeroSettingsAreRefused) {
  const Result one = train(1, "--set logging.run_dir=z1 --set train.zero=1");
  EXPECT_NE(one.status, 0) << one.output;
  EXPECT_NE(one.output.find("train.zero is 1 but the run has one rank"), std::string::npos)
      << one.output;
  EXPECT_NE(one.output.find("HINT: --set train.zero=0"), std::string::npos) << one.output;
  const Result three = train(2, "--set logging.run_dir=z3 --set train.zero=3");
  EXPECT_NE(three.status, 0) << three.output;
  EXPECT_NE(three.output.find("train.zero is 3. HINT"), std::string::npos) << three.output;
}

}  // namespace
}  // namespace nha
