// Evaluation: log-likelihood scoring math against hand-computed values, batching and truncation,
// greedy generation, the task metrics (acc vs acc_norm, LAMBADA, "contains", perplexity) on tiny
// hand-made task files with known answers, and the report formats.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/testing.h"
#include "data/tokenizer.h"
#include "eval/loglik.h"
#include "eval/runner.h"
#include "eval/tasks.h"

namespace nha::eval {
namespace {

namespace fs = std::filesystem;

// A bigram "model": logits[b, t, :] = table[ids[b, t], :] (f64, V x V). Exact log-probabilities
// are then log_softmax(table[prev])[next], computable by hand.
struct BigramModel {
  int64_t V;
  std::vector<double> table;  // [V, V]
  int64_t forwards = 0;
  explicit BigramModel(int64_t v, uint64_t seed) : V(v), table(size_t(v * v)) {
    Tensor t = testing::randn({v, v}, seed, DType::F64, 2.0);
    std::copy(t.data<double>(), t.data<double>() + v * v, table.begin());
  }
  double logprob(int32_t prev, int32_t next) const {
    const double* row = &table[size_t(prev * V)];
    double m = row[0], s = 0;
    for (int64_t c = 0; c < V; ++c) m = std::max(m, row[c]);
    for (int64_t c = 0; c < V; ++c) s += std::exp(row[c] - m);
    return row[next] - m - std::log(s);
  }
  int32_t greedy(int32_t prev) const {
    const double* row = &table[size_t(prev * V)];
    return int32_t(std::max_element(row, row + V) - row);
  }
  LogitsFn fn() {
    return [this](const Tensor& ids) {
      ++forwards;
      const int64_t B = ids.size(0), T = ids.size(1);
      Tensor out = Tensor::empty({B, T, V}, DType::F64);
      for (int64_t i = 0; i < B * T; ++i) {
        const int32_t id = ids.data<int32_t>()[i];
        std::copy(&table[size_t(id * V)], &table[size_t(id * V)] + V, out.data<double>() + i * V);
      }
      return out;
    };
  }
};

TEST(EvalLoglik, MatchesHandComputedBigramLogprobs) {
  BigramModel model(11, 1);
  const std::vector<LoglikRequest> reqs = {
      {{1, 2, 3}, {4, 5}}, {{7}, {7, 7, 7}}, {{9, 8, 7, 6, 5, 4}, {3}}, {{}, {2, 10}}};
  ScoreOptions opt;
  opt.batch_tokens = 8;  // forces several batches of different lengths
  const auto res = score_loglik(model.fn(), reqs, opt);
  ASSERT_EQ(res.size(), reqs.size());
  for (size_t r = 0; r < reqs.size(); ++r) {
    std::vector<int32_t> seq = reqs[r].context;
    seq.insert(seq.end(), reqs[r].continuation.begin(), reqs[r].continuation.end());
    double expect = 0;
    bool greedy = true;
    for (size_t i = reqs[r].context.empty() ? 1 : reqs[r].context.size(); i < seq.size(); ++i) {
      expect += model.logprob(seq[i - 1], seq[i]);
      greedy = greedy && model.greedy(seq[i - 1]) == seq[i];
    }
    EXPECT_NEAR(res[r].logprob, expect, 1e-12) << "request " << r;
    EXPECT_EQ(res[r].greedy, greedy) << "request " << r;
    // With no context the first continuation token has nothing to be predicted from.
    EXPECT_EQ(res[r].tokens,
              int64_t(reqs[r].continuation.size()) - (reqs[r].context.empty() ? 1 : 0));
  }
  EXPECT_GT(model.forwards, 1);
}

TEST(EvalLoglik, GreedyFlagAndLeftTruncation) {
  BigramModel model(7, 2);
  // A continuation that follows the argmax chain is greedy; one wrong token breaks it.
  std::vector<int32_t> chain = {3};
  for (int i = 0; i < 4; ++i) chain.push_back(model.greedy(chain.back()));
  std::vector<int32_t> broken = chain;
  broken[3] = (broken[3] + 1) % 7;
  ScoreOptions opt;
  auto res = score_loglik(model.fn(), {{{3}, {chain.begin() + 1, chain.end()}},
                                       {{3}, {broken.begin() + 1, broken.end()}}}, opt);
  EXPECT_TRUE(res[0].greedy);
  EXPECT_FALSE(res[1].greedy);
  // A bigram model only sees the previous token, so cutting the context from the left (max_len)
  // leaves the score unchanged: the cut keeps the continuation and the token before it.
  opt.max_len = 3;
  auto cut = score_loglik(model.fn(), {{{1, 2, 3, 4, 5, 6}, {1, 2}}}, opt);
  auto full = score_loglik(model.fn(), {{{1, 2, 3, 4, 5, 6}, {1, 2}}}, ScoreOptions{});
  EXPECT_NEAR(cut[0].logprob, full[0].logprob, 1e-12);
  // A continuation longer than the context: only its last max_len tokens are scored.
  auto longer = score_loglik(model.fn(), {{{1}, {1, 2, 3, 4}}}, opt);
  EXPECT_EQ(longer[0].tokens, 3);
  EXPECT_NEAR(longer[0].logprob, model.logprob(1, 2) + model.logprob(2, 3) + model.logprob(3, 4),
              1e-12);
}

TEST(EvalGenerate, GreedyFollowsArgmaxAndStops) {
  BigramModel model(9, 3);
  const auto out = generate_greedy(model.fn(), {{{4}}, {{1, 2}}, {{5, 5, 5}}}, 6,
                                   [](const std::vector<int32_t>& g) { return g.size() >= 4 && g[0] >= 0; },
                                   ScoreOptions{});
  const std::vector<std::vector<int32_t>> prompts = {{4}, {1, 2}, {5, 5, 5}};
  for (size_t r = 0; r < prompts.size(); ++r) {
    ASSERT_EQ(out[r].size(), 4u) << "stops once the predicate holds";
    int32_t prev = prompts[r].back();
    for (int32_t tok : out[r]) {
      EXPECT_EQ(tok, model.greedy(prev));
      prev = tok;
    }
  }
}

TEST(EvalMetrics, ContainsAndArgmax) {
  EXPECT_TRUE(contains_answer("The answer is PARIS.", {"paris"}));
  EXPECT_TRUE(contains_answer("it was onion", {"Garlic", "Onion"}));
  EXPECT_FALSE(contains_answer("london", {"paris", ""}));
  EXPECT_EQ(first_line("Paris\nand more"), "Paris");
  EXPECT_EQ(argmax_index({-3.0, -1.0, -1.0, -2.0}), 1u);
}

// ---- tasks on hand-made files with a tiny tokenizer ----------------------------------------------

class EvalTasks : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = (fs::temp_directory_path() / ("nha_eval_" + std::to_string(::getpid()))).string();
    fs::create_directories(dir_);
    std::ofstream text(dir_ + "/corpus.txt");
    for (int i = 0; i < 200; ++i)
      text << "the cat sat on the mat and the dog ran in the park number " << i << "\n";
    text.close();
    data::TokenizerTrainOptions o;
    o.vocab_size = 300;
    tokenizer_ = new data::Tokenizer(data::Tokenizer::train({dir_ + "/corpus.txt"},
                                                            dir_ + "/tok.model", o));
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    fs::remove_all(dir_);
  }
  static std::string write(const std::string& name, const std::string& body) {
    std::ofstream(dir_ + "/" + name) << body;
    return dir_ + "/" + name;
  }
  // Every token equally likely: loglik = -n_tokens * log V, so acc picks the choice with the
  // fewest tokens and acc_norm the one with the most bytes per token.
  static LogitsFn uniform() {
    const int64_t V = tokenizer_->vocab_size();
    return [V](const Tensor& ids) { return Tensor::zeros({ids.size(0), ids.size(1), V}, DType::F64); };
  }
  static inline std::string dir_;
  static inline data::Tokenizer* tokenizer_ = nullptr;
};

TEST_F(EvalTasks, MultipleChoiceAccVersusAccNorm) {
  // Known words tokenize into few tokens, an unseen word into many byte pieces; the expected
  // winners are computed from the tokenizer itself.
  const std::vector<std::string> choices = {" the cat", " zqxzqxzqx", " the"};
  std::vector<double> ll, ll_norm;
  for (const auto& c : choices) {
    const double n = double(tokenizer_->encode(c).size());
    ll.push_back(-n);
    ll_norm.push_back(-n / double(c.size()));
  }
  const size_t acc_pick = argmax_index(ll), norm_pick = argmax_index(ll_norm);
  ASSERT_NE(acc_pick, norm_pick) << "the test needs choices where the two metrics disagree";
  std::string rows;
  for (size_t gold : {acc_pick, norm_pick})
    rows += R"({"query": "where is the cat", "choices": [" the cat", " zqxzqxzqx", " the"], "gold": )" +
            std::to_string(gold) + "}\n";
  const TaskSpec spec = resolve_task("mc=" + write("mc.jsonl", rows) + ":multiple_choice", dir_);
  EXPECT_EQ(spec.name, "mc");
  const TaskResult r = run_task(spec, uniform(), *tokenizer_, EvalOptions{});
  EXPECT_DOUBLE_EQ(r.metric("acc"), 0.5);
  EXPECT_DOUBLE_EQ(r.metric("acc_norm"), 0.5);
  EXPECT_EQ(r.rows, 2);
}

// The standard sets vendored compressed in data/eval resolve to their .zst files, are whole
// (every row of data/eval/README.md's counts) and score through run_task.
TEST_F(EvalTasks, VendoredSetsAreFoundWholeAndScored) {
  const std::string data_dir = std::string(NHA_SOURCE_DIR) + "/data/eval";
  const std::pair<const char*, size_t> sets[] = {
      {"piqa", 1838},          {"hellaswag", 10042},          {"arc_easy", 2376},
      {"arc_challenge", 1172}, {"winogrande", 1267},          {"lambada", 5153},
      {"triviaqa_closed_sub", 3000}};
  for (const auto& [name, rows] : sets) {
    const TaskSpec spec = resolve_task(name, data_dir);
    EXPECT_TRUE(spec.path.ends_with(".jsonl.zst")) << spec.path;
    const std::string text = testing::read_zst_text(spec.path);
    EXPECT_EQ(size_t(std::count(text.begin(), text.end(), '\n')), rows) << spec.path;
    EvalOptions o;
    o.limit = 3;
    o.max_new_tokens = 2;
    EXPECT_EQ(run_task(spec, uniform(), *tokenizer_, o).rows, 3) << spec.path;
  }
}

TEST_F(EvalTasks, WinograndeLambadaContainsAndText) {
  const std::string wino = write("w.jsonl",
      R"({"context_options": ["the cat sat", "the zqxzqx sat"], "continuation": "on the mat", "gold": 0})" "\n");
  // Partial scoring: the continuation is identical after both options, so under the uniform
  // model both score the same and the first option wins.
  TaskResult w = run_task(resolve_task(wino + ":winogrande", dir_), uniform(), *tokenizer_, {});
  EXPECT_DOUBLE_EQ(w.metric("acc"), 1.0);

  // Uniform logits: argmax is token 0 (<unk>), never a real word, so acc = 0; ppl is
  // exp(n_tokens * log V) averaged per document.
  const std::string lam = write("l.jsonl", R"({"context": "the cat sat on the", "continuation": "mat"})" "\n");
  TaskResult l = run_task(resolve_task(lam + ":lambada", dir_), uniform(), *tokenizer_, {});
  EXPECT_DOUBLE_EQ(l.metric("acc"), 0.0);
  const double n = double(tokenizer_->encode(" mat").size());
  EXPECT_NEAR(std::log(l.metric("ppl")), n * std::log(double(tokenizer_->vocab_size())), 1e-9);

  // "contains": a model that always predicts the tokens of " cat\n" in turn generates " cat".
  const std::vector<int32_t> answer = tokenizer_->encode(" cat\nxyz");
  const int64_t V = tokenizer_->vocab_size();
  const int64_t prompt = int64_t(tokenizer_->encode("the dog ran").size());
  LogitsFn parrot = [&](const Tensor& ids) {
    const int64_t B = ids.size(0), T = ids.size(1);
    Tensor out = Tensor::zeros({B, T, V}, DType::F64);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        // The prediction at position t is the (t - prompt + 1)-th generated token.
        const int64_t k = std::clamp<int64_t>(t - prompt + 1, 0, int64_t(answer.size()) - 1);
        out.data<double>()[(b * T + t) * V + answer[size_t(k)]] = 5.0;
      }
    return out;
  };
  const std::string con = write("c.jsonl",
      R"({"context": "the dog ran", "answer": "CAT"})" "\n" R"({"context": "the dog ran", "answer": ["mat", "park"]})" "\n");
  TaskResult c = run_task(resolve_task(con + ":contains", dir_), parrot, *tokenizer_, {});
  EXPECT_DOUBLE_EQ(c.metric("contains"), 0.5);

  // Perplexity of a text under the uniform model is exactly V, whatever the windows.
  const std::string txt = write("t.txt", "the cat sat on the mat and the dog ran in the park\n");
  EvalOptions o;
  o.score.max_len = 4;
  o.text_stride = 3;
  TaskResult t = run_task(resolve_task(txt, dir_), uniform(), *tokenizer_, o);
  EXPECT_NEAR(t.metric("ppl"), double(V), 1e-6 * V);
  EXPECT_DOUBLE_EQ(t.metric("tokens"), double(tokenizer_->encode("the cat sat on the mat and the dog ran in the park\n").size()));
}

TEST_F(EvalTasks, BadInputsNameTheFileAndField) {
  const std::string bad = write("bad.jsonl", R"({"query": "q", "choices": ["a"]})" "\n");
  testing::expect_error(
      [&] { run_task(resolve_task(bad + ":multiple_choice", dir_), uniform(), *tokenizer_, {}); },
      {"bad.jsonl", "gold"});
  // A fractional or negative gold was truncated or wrapped around silently.
  for (const char* gold : {"1.7", "-1"}) {
    const std::string frac = write("frac.jsonl", std::string(R"({"query": "q", "choices": ["a", "b"], "gold": )") +
                                                     gold + "}\n");
    testing::expect_error(
        [&] { run_task(resolve_task(frac + ":multiple_choice", dir_), uniform(), *tokenizer_, {}); },
        {"frac.jsonl", "row 1", "'gold'", gold, "HINT"});
  }
  const std::string empty = write("empty.jsonl", R"({"context": "", "answer": "x"})" "\n");
  testing::expect_error(
      [&] { run_task(resolve_task(empty + ":contains", dir_), uniform(), *tokenizer_, {}); },
      {"empty.jsonl", "row 1", "'context' is empty", "HINT"});
  testing::expect_error([&] { resolve_task("no_such_task", dir_); }, {"no_such_task", "HINT"});
  testing::expect_error(
      [&] { run_task(resolve_task("piqa", dir_ + "/missing"), uniform(), *tokenizer_, {}); },
      {"piqa.jsonl", "HINT"});
}

// A tokenizer other than the one the training shards were made with is refused (issue 18: the
// perplexity changed silently).
TEST_F(EvalTasks, TokenizerMustMatchTheShardsManifest) {
  RunConfig c;
  c.data.train = dir_ + "/shards";
  fs::create_directories(c.data.train);
  const std::string tok = dir_ + "/tok.model";
  std::ofstream(c.data.train + "/manifest.json")
      << nlohmann::json{{"tokenizer", {{"name", tok}, {"hash", tokenizer_->hash_hex()}}}}.dump();
  EXPECT_EQ(load_tokenizer(c, "").hash_hex(), tokenizer_->hash_hex());
  EXPECT_EQ(load_tokenizer(c, tok).hash_hex(), tokenizer_->hash_hex());
  std::ofstream(c.data.train + "/manifest.json")
      << nlohmann::json{{"tokenizer", {{"name", tok}, {"hash", "fnv1a64:0000000000000000"}}}}.dump();
  testing::expect_error([&] { load_tokenizer(c, tok); },
                        {"tok.model", "fnv1a64:0000000000000000", "not the one", "HINT"});
}

TEST(EvalReport, TableMarkdownJson) {
  std::vector<TaskResult> rs = {{"piqa", "acc", {{"acc", 0.6}, {"acc_norm", 0.62}}, 10, 1.0},
                                {"hellaswag", "acc_norm", {{"acc", 0.3}, {"acc_norm", 0.4}}, 10, 2.0}};
  const std::string table = format_table(rs);
  EXPECT_NE(table.find("60.00"), std::string::npos);
  EXPECT_NE(table.find("50.00"), std::string::npos) << "average of the primary metrics";
  EXPECT_NE(format_markdown(rs, "m").find("| hellaswag | acc_norm (*) | 40.00 |"), std::string::npos);
  EXPECT_NE(format_json(rs, "m").find("\"average_primary_accuracy\": 0.5"), std::string::npos);
}

}  // namespace
}  // namespace nha::eval
