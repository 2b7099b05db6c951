// Evaluation subcommands of `nha` (docs/eval.md):
//   nha eval RUN_OR_CKPT --tasks piqa,hellaswag,lambada [--data-dir DIR] [--tokenizer PATH]
//     prints a table like lm-evaluation-harness and writes eval.json + eval.md;
//   nha compare RUN_A RUN_B ...
//     prints the primary metric of every task side by side (Markdown).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/cli.h"
#include "core/fileio.h"
#include "eval/runner.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace nha::apps {

namespace {

struct EvalArgs {
  std::string model, tasks = "piqa,hellaswag,winogrande,arc_easy,arc_challenge,lambada";
  // The sets vendored compressed in the repository's data/eval (data/eval/README.md), found from
  // the repository root; NHA_EVAL_DATA names another directory, --data-dir overrides both.
  std::string data_dir = std::getenv("NHA_EVAL_DATA") ? std::getenv("NHA_EVAL_DATA") : "data/eval";
  std::string tokenizer, device = "auto", out;
  int64_t limit = 0, batch_tokens = 16384, max_len = 0, context_tokens = 0;
};

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

void run_eval(const EvalArgs& a) {
  const eval::LoadedModel m = eval::load_model(a.model, resolve_device(a.device));
  // MQAR is generated token ids: a model trained on it has no tokenizer, and needs none.
  bool needs_text = false;
  for (const std::string& t : split_commas(a.tasks))
    needs_text = needs_text || eval::resolve_task(t, a.data_dir).schema != eval::Schema::Mqar;
  const data::Tokenizer tok = needs_text
      ? eval::load_tokenizer(m.config, a.tokenizer)
      : data::Tokenizer();
  eval::EvalOptions o;
  o.score.device = m.device;
  o.score.batch_tokens = a.batch_tokens;
  o.score.max_len = a.max_len > 0 ? a.max_len : m.config.train.seq_len;
  o.limit = a.limit;
  o.context_tokens = a.context_tokens;
  std::fprintf(stderr, "eval: %s (step %lld, %lld tokens seen) on %s, context %lld\n",
               m.checkpoint.c_str(), (long long)m.step, (long long)m.tokens_seen,
               m.device.str().c_str(), (long long)o.score.max_len);
  const auto results = eval::run_tasks(m, tok, split_commas(a.tasks), a.data_dir, o);
  std::printf("%s", eval::format_table(results).c_str());
  const std::string out_dir =
      !a.out.empty() ? a.out
                     : (fs::is_directory(a.model) ? fs::path(a.model) / "eval"
                                                  : fs::path(m.checkpoint).parent_path() / "eval")
                           .string();
  write_file_atomic(out_dir + "/eval.json", eval::format_json(results, m.checkpoint));
  write_file_atomic(out_dir + "/eval.md", eval::format_markdown(results, m.checkpoint));
  std::printf("wrote %s/eval.json and eval.md\n", out_dir.c_str());
}

// Side-by-side table of the primary metric of every task over several runs' RUN/eval/eval.json.
void run_compare(const std::vector<std::string>& runs) {
  std::vector<std::string> tasks;                   // in first-seen order
  std::map<std::string, std::map<std::string, std::string>> cell;  // task -> run -> value
  std::map<std::string, std::string> primary;
  for (const std::string& run : runs) {
    const fs::path file = fs::is_directory(run) ? fs::path(run) / "eval" / "eval.json" : fs::path(run);
    std::ifstream in(file);
    NHA_CHECK(in.good()) << "cannot read '" << file.string()
                         << "'. HINT: run `nha eval " << run << "` first";
    const nlohmann::json j = nlohmann::json::parse(in);
    for (const auto& [task, r] : j.at("results").items()) {
      if (!cell.count(task)) tasks.push_back(task);
      primary[task] = r.at("primary").get<std::string>();
      const double v = r.at(primary[task]).get<double>();
      char buf[32];
      const bool pct = primary[task] != "ppl" && primary[task] != "bpb";
      std::snprintf(buf, sizeof buf, pct ? "%.2f" : "%.3f", pct ? 100 * v : v);
      cell[task][run] = buf;
    }
  }
  std::printf("| task | metric |");
  for (const std::string& run : runs) std::printf(" %s |", run.c_str());
  std::printf("\n|---|---|");
  for (size_t i = 0; i < runs.size(); ++i) std::printf("---|");
  std::printf("\n");
  for (const std::string& task : tasks) {
    std::printf("| %s | %s |", task.c_str(), primary[task].c_str());
    for (const std::string& run : runs)
      std::printf(" %s |", cell[task].count(run) ? cell[task][run].c_str() : "-");
    std::printf("\n");
  }
}

}  // namespace

void register_eval_commands(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  CLI::App* c = app.add_subcommand("eval", "evaluate a trained model on benchmark tasks");
  c->add_option("model", a->model, "run directory, checkpoint or export file (.h5)")->required();
  c->add_option("--tasks", a->tasks,
                "comma-separated task names (piqa, hellaswag, arc_easy, arc_challenge, winogrande, "
                "lambada, triviaqa_closed_sub, wikitext2) or PATH:SCHEMA")
      ->capture_default_str();
  c->add_option("--data-dir", a->data_dir,
                "directory of the standard task files, FILE or FILE.zst (default: $NHA_EVAL_DATA, "
                "else data/eval)")
      ->capture_default_str();
  c->add_option("--tokenizer", a->tokenizer, "tokenizer .model (default: the training shards')");
  c->add_option("--device", a->device, "auto | cpu | cuda | cuda:N")->capture_default_str();
  c->add_option("--limit", a->limit, "only the first N rows of each task (0: all)")
      ->check(kNonNegative);
  c->add_option("--batch-tokens", a->batch_tokens, "tokens per forward")
      ->check(kPositive)
      ->capture_default_str();
  c->add_option("--max-len", a->max_len, "model context (default: the run's train.seq_len)")
      ->check(kPositive);
  c->add_option("--context-tokens", a->context_tokens,
                "contains tasks: keep the last N context tokens (0: all)")
      ->check(kNonNegative);
  c->add_option("--out", a->out, "directory for eval.json / eval.md (default: RUN/eval)");
  c->callback([a] { run_eval(*a); });

  auto runs = std::make_shared<std::vector<std::string>>();
  CLI::App* cmp = app.add_subcommand("compare", "side-by-side table of several runs' eval results");
  cmp->add_option("runs", *runs, "run directories (RUN/eval/eval.json) or eval.json files")
      ->required();
  cmp->callback([runs] { run_compare(*runs); });
}

}  // namespace nha::apps
