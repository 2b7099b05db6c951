// Recall evaluation: MQAR accuracy (eval/mqar_eval.h) and the recall task files built by
// scripts/make-recall-tasks.py from real documents.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/testing.h"
#include "eval/mqar_eval.h"
#include "eval/tasks.h"

namespace nha::eval {
namespace {

namespace fs = std::filesystem;

data::MqarOptions small_mqar() {
  data::MqarOptions o;
  o.vocab_size = 96;
  o.seed = 7;
  o.settings = {{32, 4, 9}, {64, 8, 5}, {48, 12, 4}};
  return o;
}

// A hand-made recall "model": at position t it predicts the token that followed the first earlier
// occurrence of ids[t] at an even position (the key-value pairs of the MQAR context), shifted by
// `pair_offset` pairs (0: the right value; 1: the next pair's value, always wrong since values
// are distinct). One-hot logits [B, T, V].
LogitsFn recall_model(int64_t V, int pair_offset) {
  return [V, pair_offset](const Tensor& ids) {
    const int64_t B = ids.size(0), T = ids.size(1);
    Tensor logits = Tensor::zeros({B, T, V}, DType::F32);
    const int32_t* x = ids.data<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int32_t* row = x + b * T;
        for (int64_t p = 0; p + 1 + 2 * pair_offset < t; p += 2)
          if (row[p] == row[t]) {
            logits.data<float>()[(b * T + t) * V + row[p + 1 + 2 * pair_offset]] = 1.0f;
            break;
          }
      }
    return logits;
  };
}

TEST(EvalMqar, PerfectRecallScoresOneAndWrongPairScoresZero) {
  const data::MqarOptions o = small_mqar();
  ScoreOptions opt;
  opt.batch_tokens = 100;  // several batches per setting, the last one short
  const std::vector<MqarSettingResult> right = evaluate_mqar(recall_model(o.vocab_size, 0), o, opt);
  ASSERT_EQ(right.size(), 3u);
  for (size_t s = 0; s < right.size(); ++s) {
    SCOPED_TRACE(s);
    EXPECT_EQ(right[s].seq_len, o.settings[s].seq_len);
    EXPECT_EQ(right[s].examples, o.settings[s].num_examples);
    // Every pair is queried once: K query positions per example.
    EXPECT_EQ(right[s].queries, o.settings[s].num_kv_pairs * o.settings[s].num_examples);
    EXPECT_EQ(right[s].correct, right[s].queries);
    EXPECT_DOUBLE_EQ(right[s].accuracy(), 1.0);
  }
  const std::vector<MqarSettingResult> wrong = evaluate_mqar(recall_model(o.vocab_size, 1), o, opt, 2);
  for (const MqarSettingResult& r : wrong) {
    EXPECT_EQ(r.examples, 2);
    EXPECT_GT(r.queries, 0);
    EXPECT_EQ(r.correct, 0);
  }
}

TEST(EvalMqar, CountsOnlyTargetPositions) {
  // logits [1, 3, 4]: argmax 2, 0, 3; targets: ignore, 0, 1 -> 2 queries, 1 correct.
  Tensor logits = Tensor::from_vector<float>({0, 1, 5, 2, 9, 0, 0, 0, 1, 2, 3, 4}, {1, 3, 4});
  Tensor targets = Tensor::from_vector<int32_t>({data::kIgnoreIndex, 0, 1}, {1, 3});
  const PredictionCount c = count_correct_predictions(logits, targets);
  EXPECT_EQ(c.queries, 2);
  EXPECT_EQ(c.correct, 1);
  testing::expect_error([&] { count_correct_predictions(logits, targets.reshape({3, 1})); },
                        {"do not match"});
}

TEST(EvalMqar, TooSmallVocabularyIsRefused) {
  const data::MqarOptions o = small_mqar();
  testing::expect_error([&] { evaluate_mqar(recall_model(o.vocab_size - 1, 0), o, {}, 1); },
                        {"vocabulary of at least 96", "HINT"});
}

TEST(EvalMqar, TaskNamesResolveToPresets) {
  const TaskSpec standard = resolve_task("mqar", "/some/data/dir");
  EXPECT_EQ(standard.schema, Schema::Mqar);
  EXPECT_EQ(standard.path, "test") << "a preset name, not a file under the data dir";
  EXPECT_EQ(standard.primary, "acc");
  const TaskSpec one = resolve_task("long=L1024-K256:mqar", "");
  EXPECT_EQ(one.name, "long");
  EXPECT_EQ(one.path, "L1024-K256");
  EXPECT_EQ(one.schema, Schema::Mqar);
}

// ---- scripts/make-recall-tasks.py ------------------------------------------------------------

class RecallTaskFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::temp_dir("recall_tasks");
    // Prose: 60 numbered paragraphs of 20 words; records: 30 dpkg-style package records.
    std::ofstream prose(dir_ + "/prose.txt");
    for (int p = 0; p < 60; ++p) {
      for (int w = 0; w < 20; ++w) prose << "word" << p << "x" << w << (w < 19 ? " " : "\n");
    }
    std::ofstream records(dir_ + "/status");
    for (int r = 0; r < 30; ++r)
      records << "Package: pkg" << r << "\nStatus: install ok installed\nVersion: " << r << ".4-"
              << (r * 7) % 11 << "\nMaintainer: Person " << r << " <p" << r
              << "@example.org>\nInstalled-Size: " << 1000 + 37 * r
              << "\nDescription: the package number " << r << "\n long text left out\n\n";
  }
  // Runs scripts/make-recall-tasks.py with `args`; its exit status (output in dir_/log.txt).
  int run_script(const std::string& args) {
    const std::string cmd = std::string("python3 ") + NHA_SOURCE_DIR +
                            "/scripts/make-recall-tasks.py " + args + " > " + dir_ + "/log.txt 2>&1";
    return std::system(cmd.c_str());
  }
  std::string run(const std::string& out, int seed) {
    EXPECT_EQ(run_script("--prose " + dir_ + "/prose.txt --records " + dir_ + "/status --out " + out +
                         " --rows 40 --context-words 100 --records-per-row 5 --seed " +
                         std::to_string(seed)),
              0)
        << testing::read_file(dir_ + "/log.txt");
    return testing::read_file(out + "/passkey.jsonl") + testing::read_file(out + "/debian_fields.jsonl");
  }
  static size_t count(const std::string& s, const std::string& what) {
    size_t n = 0;
    for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
    return n;
  }
  std::string dir_;
};

TEST_F(RecallTaskFiles, RowsAreAnswerableDeterministicAndLoadAsContainsTasks) {
  const std::string a = run(dir_ + "/a", 0), b = run(dir_ + "/b", 0), c = run(dir_ + "/c", 1);
  EXPECT_EQ(a, b) << "same inputs and seed give the same bytes";
  EXPECT_NE(a, c) << "another seed gives other rows";

  std::ifstream passkey(dir_ + "/a/passkey.jsonl");
  int rows = 0;
  for (std::string line; std::getline(passkey, line); ++rows) {
    const auto row = nlohmann::json::parse(line);
    const std::string ctx = row.at("context"), key = row.at("answer");
    EXPECT_EQ(key.size(), 5u);
    EXPECT_EQ(count(ctx, "The pass key is " + key + ". Remember it. " + key + " is the pass key."), 1u);
    EXPECT_EQ(count(ctx, key), 2u) << "the key appears only in the needle";
    EXPECT_TRUE(ctx.ends_with("\nWhat is the pass key? The pass key is"));
    EXPECT_GE(count(ctx, " ") + 1, 100u + 14u) << "100 words of prose plus needle and question";
  }
  EXPECT_EQ(rows, 40);

  std::ifstream fields(dir_ + "/a/debian_fields.jsonl");
  rows = 0;
  for (std::string line; std::getline(fields, line); ++rows) {
    const auto row = nlohmann::json::parse(line);
    const std::string ctx = row.at("context"), answer = row.at("answer"), field = row.at("field"),
                      pkg = row.at("package");
    EXPECT_TRUE(ctx.ends_with("\n\nPackage: " + pkg + "\n" + field + ":")) << ctx;
    // The asked record is in the context and holds the answer; no other record's value matches.
    const size_t record = ctx.find("Package: " + pkg + "\n");
    ASSERT_NE(record, std::string::npos);
    const size_t end = ctx.find("\n\n", record);
    EXPECT_NE(ctx.substr(record, end - record).find(field + ": " + answer + "\n"), std::string::npos);
    EXPECT_EQ(count(ctx, answer), 1u) << "answer '" << answer << "' is unambiguous";
    EXPECT_EQ(count(ctx, "Package: "), 6u) << "5 records and the question";
    EXPECT_EQ(ctx.find("long text left out"), std::string::npos) << "continuation lines dropped";
  }
  EXPECT_EQ(rows, 40);

  // Both files are `contains` tasks for `nha eval`.
  const TaskSpec spec = resolve_task("passkey=" + dir_ + "/a/passkey.jsonl:contains", "");
  EXPECT_EQ(spec.schema, Schema::Contains);
  EXPECT_EQ(spec.name, "passkey");
}

TEST_F(RecallTaskFiles, MissingInputsAreNamed) {
  EXPECT_NE(run_script("--prose " + dir_ + "/none.txt --records " + dir_ + "/status --out " + dir_ +
                       "/x"),
            0);
  const std::string log = testing::read_file(dir_ + "/log.txt");
  EXPECT_NE(log.find("none.txt"), std::string::npos) << log;
  EXPECT_NE(log.find("HINT"), std::string::npos) << log;
}

}  // namespace
}  // namespace nha::eval
