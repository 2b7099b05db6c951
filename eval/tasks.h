// Evaluation tasks: JSONL files in a few schemas, scored with eval/loglik.h (docs/eval.md).
//
//   schema           row                                          metrics
//   multiple_choice  {"query", "choices": [..], "gold": i}        acc, acc_norm
//   winogrande       {"context_options": [..], "continuation",    acc (partial scoring: the shared
//                     "gold": i}                                   continuation after each option)
//   lambada          {"context", "continuation"}                  acc (greedy), ppl
//   contains         {"context", "answer": s | [s..]} (or          contains (greedy generation until
//                     "aliases": [..])                              a newline, <= 48 tokens, case-
//                                                                  insensitive substring match)
//   text             a plain text file                            ppl, bpb (sliding window)
//   mqar             an MQAR preset name (generated, no file)     acc (all settings), acc@L<L>-K<K>
//
// Task files are data: any file in one of these schemas can be evaluated by path. The standard
// names (piqa, hellaswag, arc_easy, arc_challenge, winogrande, lambada / lambada_openai,
// triviaqa_closed_sub, wikitext2) resolve to <data_dir>/<name>.jsonl with their schema.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "eval/loglik.h"

namespace nha::eval {

enum class Schema : uint8_t { MultipleChoice, Winogrande, Lambada, Contains, Text, Mqar };
const char* schema_name(Schema s);
Schema schema_from_name(const std::string& name);

struct TaskSpec {
  std::string name;     // shown in the report
  std::string path;     // the JSONL (or text) file; for mqar the preset name (data/mqar.h)
  Schema schema = Schema::MultipleChoice;
  std::string primary;  // the metric the paper reports for this task (acc, acc_norm, ...)
};

// "piqa" -> <data_dir>/piqa.jsonl; "name=path:schema" or "path:schema" -> that file (a path with
// a known extension and no schema: .txt is text, else refused with a hint).
TaskSpec resolve_task(const std::string& spec, const std::string& data_dir);

struct EvalOptions {
  ScoreOptions score;
  int64_t limit = 0;             // evaluate only the first `limit` rows (0: all)
  int64_t context_tokens = 0;    // contains: keep only the last N context tokens (0: all)
  int64_t max_new_tokens = 48;   // contains
  int64_t text_stride = 0;       // text: sliding-window stride (0: max_len / 2)
  // contains: how to generate greedily; empty = generate_greedy over the task's LogitsFn (the
  // whole prefix per token). run_tasks binds generate_greedy_cached (KV caches, NHA state).
  GenerateFn generate;
};

struct Metric {
  std::string name;
  double value = 0;
};

struct TaskResult {
  std::string task;
  std::string primary;
  std::vector<Metric> metrics;
  int64_t rows = 0;
  double seconds = 0;
  double metric(const std::string& name) const;  // fails when absent
};

TaskResult run_task(const TaskSpec& task, const LogitsFn& model, const data::Tokenizer& tokenizer,
                    const EvalOptions& options);

// ---- scoring pieces (exposed for tests) ---------------------------------------------------------
// The index of the largest value (the first on ties).
size_t argmax_index(const std::vector<double>& values);
// "contains": some answer occurs in the generated text, case-insensitively (ASCII).
bool contains_answer(const std::string& generated, const std::vector<std::string>& answers);
// Generated text up to (not including) the first newline.
std::string first_line(const std::string& text);

// Table (text), JSON and Markdown renderings of a report.
std::string format_table(const std::vector<TaskResult>& results);
std::string format_markdown(const std::vector<TaskResult>& results, const std::string& title);
std::string format_json(const std::vector<TaskResult>& results, const std::string& model);

}  // namespace nha::eval
