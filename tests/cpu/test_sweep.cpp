// scripts/sweep.py: a 2 x 2 grid run through a stand-in for the nha command (it writes the files a
// real run writes, instantly), then skipping of finished runs, reruns, failures and the outputs.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "common/testing.h"

namespace nha {
namespace {

// `fake train CONFIG --quiet --set k=v ...` writes RUN/metrics.jsonl with val accuracy d_model/1000
// and loss = lr, and logs the call; lr=bad fails. `fake eval RUN --tasks T` writes RUN/eval/eval.json
// with mqar.acc = the val accuracy.
const char* kFakeNha = R"(#!/usr/bin/env python3
import json, os, sys
cmd, log = sys.argv[1], os.environ["FAKE_NHA_LOG"]
if cmd == "train":
    sets = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)
    run = sets["logging.run_dir"]
    with open(log, "a") as f:
        f.write(run + ("" if "--resume" not in sys.argv else " resume") + "\n")
    if sets["train.lr"] == "bad":
        os.makedirs(run + "/checkpoints", exist_ok=True)
        open(run + "/checkpoints/step_00000001.h5", "w").close()
        sys.exit(1)
    os.makedirs(run, exist_ok=True)
    open(run + "/omp_threads.txt", "w").write(os.environ.get("OMP_NUM_THREADS", "unset"))
    acc = int(sets["model.d_model"]) / 1000
    with open(run + "/metrics.jsonl", "w") as f:
        f.write(json.dumps({"type": "train", "step": 5, "tokens": 640, "loss": float(sets["train.lr"])}) + "\n")
        f.write(json.dumps({"type": "val", "step": 5, "tokens": 640, "loss": 1.5, "accuracy": acc}) + "\n")
elif cmd == "eval":
    run = sys.argv[2]
    acc = [json.loads(l) for l in open(run + "/metrics.jsonl")][-1]["accuracy"]
    os.makedirs(run + "/eval", exist_ok=True)
    json.dump({"results": {"mqar": {"primary": "acc", "acc": acc}}}, open(run + "/eval/eval.json", "w"))
)";

class Sweep : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::temp_dir("sweep");
    std::ofstream(dir_ + "/nha") << kFakeNha;
    std::filesystem::permissions(dir_ + "/nha", std::filesystem::perms::owner_all);
    setenv("FAKE_NHA_LOG", (dir_ + "/calls.txt").c_str(), 1);
  }
  // Runs the sweep of one config over `lrs` x d_model {64, 128}; its exit status.
  int sweep(const std::string& lrs, const std::string& steps = "5", const std::string& more = "") {
    const std::string cmd = std::string("env -u OMP_NUM_THREADS python3 ") + NHA_SOURCE_DIR +
                            "/scripts/sweep.py --nha " + dir_ + "/nha --out " + dir_ +
                            "/out --jobs 3 --config a/one.yaml --grid train.lr=" + lrs +
                            " --grid model.d_model=64,128 --set train.steps=" + steps +
                            " --eval mqar --x model.d_model " + more + " > " + dir_ + "/log.txt 2>&1";
    return std::system(cmd.c_str());
  }
  std::vector<std::string> calls() {
    std::vector<std::string> lines;
    std::istringstream in(testing::read_file(dir_ + "/calls.txt"));
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    return lines;
  }
  std::string dir_;
};

TEST_F(Sweep, RunsTheGridSkipsFinishedRunsAndCollects) {
  ASSERT_EQ(sweep("1e-3,3e-3"), 0) << testing::read_file(dir_ + "/log.txt");
  EXPECT_EQ(calls().size(), 4u) << "2 x 2 runs";
  const std::string out = dir_ + "/out";
  const nlohmann::json j = nlohmann::json::parse(testing::read_file(out + "/sweep.json"));
  ASSERT_EQ(j["runs"].size(), 4u);
  for (const auto& r : j["runs"]) {
    const double d = std::stod(r["overrides"]["model.d_model"].get<std::string>());
    EXPECT_DOUBLE_EQ(r["metrics"]["mqar.acc"].get<double>(), d / 1000) << "eval results collected";
    EXPECT_DOUBLE_EQ(r["metrics"]["val_accuracy"].get<double>(), d / 1000);
    EXPECT_DOUBLE_EQ(r["metrics"]["train_loss"].get<double>(),
                     std::stod(r["overrides"]["train.lr"].get<std::string>()));
  }
  const std::string md = testing::read_file(out + "/sweep.md");
  EXPECT_NE(md.find("| one.yaml | 1e-3 | 64 |"), std::string::npos) << md;
  EXPECT_NE(md.find("12.8%"), std::string::npos) << "accuracies in percent: " << md;
  const std::string svg = testing::read_file(out + "/sweep.svg");
  EXPECT_NE(svg.find("<polyline"), std::string::npos) << "one line for the config";
  EXPECT_NE(svg.find("mqar.acc vs model.d_model"), std::string::npos) << svg.substr(0, 400);
  EXPECT_TRUE(std::filesystem::exists(out + "/one/train.lr=1e-3,model.d_model=64/done.json"));

  ASSERT_EQ(sweep("1e-3,3e-3"), 0);
  EXPECT_EQ(calls().size(), 4u) << "finished runs are skipped";
  ASSERT_EQ(sweep("1e-3,3e-3", "6"), 0);
  EXPECT_EQ(calls().size(), 4u) << "also when --set changed, with a note";
  EXPECT_NE(testing::read_file(dir_ + "/log.txt").find("note: "), std::string::npos);
  std::filesystem::remove(out + "/one/train.lr=3e-3,model.d_model=128/done.json");
  ASSERT_EQ(sweep("1e-3,3e-3"), 0);
  ASSERT_EQ(calls().size(), 5u) << "a run without done.json runs again";
  EXPECT_EQ(calls().back(), out + "/one/train.lr=3e-3,model.d_model=128");
}

// --seeds: the repeats' mean and sd per group, the mean validation curve as the plot; every job
// gets its share of the cores as OpenMP threads.
TEST_F(Sweep, SeedsGiveMeanAndSpreadAndCurves) {
  ASSERT_EQ(sweep("1e-3,3e-3", "5", "--seeds train.lr --y val_loss"), 0)
      << testing::read_file(dir_ + "/log.txt");
  const std::string out = dir_ + "/out";
  const std::string md = testing::read_file(out + "/sweep.md");
  EXPECT_NE(md.find("mean ± sample standard deviation over train.lr"), std::string::npos) << md;
  // the group d_model=64 has train losses 1e-3 and 3e-3 (the fake's loss = lr): mean 0.002
  EXPECT_NE(md.find("| one model.d_model=64 | 2 |"), std::string::npos) << md;
  EXPECT_NE(md.find("0.002 ± 0.0014"), std::string::npos) << md;
  const std::string svg = testing::read_file(out + "/sweep.svg");
  EXPECT_NE(svg.find("val_loss vs training tokens (mean over train.lr)"), std::string::npos) << svg;
  EXPECT_EQ(svg.find("no finished runs"), std::string::npos) << svg;
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  EXPECT_EQ(testing::read_file(out + "/one/train.lr=1e-3,model.d_model=64/omp_threads.txt"),
            std::to_string(std::max(1u, cores / 3)));
}

TEST_F(Sweep, FailedRunsAreReportedAndResumed) {
  EXPECT_NE(sweep("1e-3,bad"), 0) << "a failed run fails the sweep";
  const std::string log = testing::read_file(dir_ + "/log.txt");
  EXPECT_NE(log.find("FAILED"), std::string::npos) << log;
  EXPECT_NE(log.find("2/4 runs finished"), std::string::npos) << log;
  EXPECT_NE(sweep("1e-3,bad"), 0);
  std::vector<std::string> c = calls();
  ASSERT_EQ(c.size(), 6u) << "only the two failed runs ran again";
  EXPECT_NE(c.back().find(" resume"), std::string::npos) << "a run with checkpoints resumes";
}

}  // namespace
}  // namespace nha
