#include "eval/tasks.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "data/text_source.h"
#include "eval/mqar_eval.h"

namespace nha::eval {

namespace fs = std::filesystem;
using nlohmann::json;

const char* schema_name(Schema s) {
  switch (s) {
    case Schema::MultipleChoice: return "multiple_choice";
    case Schema::Winogrande: return "winogrande";
    case Schema::Lambada: return "lambada";
    case Schema::Contains: return "contains";
    case Schema::Text: return "text";
    case Schema::Mqar: return "mqar";
  }
  return "?";
}

Schema schema_from_name(const std::string& name) {
  for (Schema s : {Schema::MultipleChoice, Schema::Winogrande, Schema::Lambada, Schema::Contains,
                   Schema::Text, Schema::Mqar})
    if (name == schema_name(s)) return s;
  NHA_FAIL() << "unknown task schema '" << name
             << "'. HINT: use multiple_choice, winogrande, lambada, contains, text or mqar";
}

namespace {

// The standard tasks: file stem, schema, the metric the paper reports.
struct KnownTask {
  const char* name;
  const char* file;
  Schema schema;
  const char* primary;
};
constexpr KnownTask kKnownTasks[] = {
    {"piqa", "piqa.jsonl", Schema::MultipleChoice, "acc"},
    {"hellaswag", "hellaswag.jsonl", Schema::MultipleChoice, "acc_norm"},
    {"arc_easy", "arc_easy.jsonl", Schema::MultipleChoice, "acc"},
    {"arc_challenge", "arc_challenge.jsonl", Schema::MultipleChoice, "acc_norm"},
    {"winogrande", "winogrande.jsonl", Schema::Winogrande, "acc"},
    {"lambada", "lambada_openai.jsonl", Schema::Lambada, "acc"},
    {"lambada_openai", "lambada_openai.jsonl", Schema::Lambada, "acc"},
    {"triviaqa_closed_sub", "triviaqa_closed_sub.jsonl", Schema::Contains, "contains"},
    {"wikitext2", "wikitext2_test.txt", Schema::Text, "ppl"},
    {"mqar", "test", Schema::Mqar, "acc"},  // "file" is the preset: generated, not read
};

const char* default_primary(Schema s) {
  switch (s) {
    case Schema::MultipleChoice:
    case Schema::Winogrande:
    case Schema::Lambada: return "acc";
    case Schema::Contains: return "contains";
    case Schema::Text: return "ppl";
    case Schema::Mqar: return "acc";
  }
  return "acc";
}

// One JSON object per non-empty line (a .zst file decompressed on the fly); errors name file and
// line.
std::vector<json> read_jsonl(const std::string& path, int64_t limit) {
  NHA_CHECK(fs::is_regular_file(path))
      << "cannot open task file '" << path
      << "'. HINT: pass --data-dir or a path to an existing JSONL file";
  data::LineReader reader(path);
  std::vector<json> rows;
  std::string line;
  while (reader.next(line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      rows.push_back(json::parse(line));
    } catch (const json::exception& e) {
      NHA_FAIL() << path << ":" << reader.line_number() << ": not a JSON object (" << e.what()
                 << "). HINT: task files have one JSON object per line";
    }
    if (limit > 0 && int64_t(rows.size()) >= limit) break;
  }
  // Stopped at the limit, a .zst's decompressor is cut off mid-stream: only a whole read is checked.
  if (limit <= 0 || int64_t(rows.size()) < limit) reader.close();
  NHA_CHECK(!rows.empty()) << "task file '" << path << "' has no rows";
  return rows;
}

// A field of a row, with the file and row in the error.
template <typename T>
T field(const json& row, const char* key, const std::string& path, size_t i) {
  NHA_CHECK(row.contains(key)) << path << ": row " << i + 1 << " lacks the field '" << key
                               << "'. HINT: check the file's schema (docs/eval.md)";
  // nlohmann converts 1.7 to 1 and -1 to a huge size_t without a word: whole numbers only.
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    const json& v = row.at(key);
    NHA_CHECK(std::is_signed_v<T> ? v.is_number_integer() : v.is_number_unsigned())
        << path << ": row " << i + 1 << ": field '" << key << "' is " << v.dump() << ", not a "
        << (std::is_signed_v<T> ? "whole number" : "whole number >= 0")
        << ". HINT: check the file's schema (docs/eval.md)";
  }
  try {
    return row.at(key).get<T>();
  } catch (const json::exception& e) {
    NHA_FAIL() << path << ": row " << i + 1 << ": field '" << key << "' has the wrong type ("
               << e.what() << ")";
  }
}

// The continuation as scored: a space joins context and continuation unless one side already
// has whitespace at the seam (lm-evaluation-harness's target_delimiter " ").
std::string joined_continuation(const std::string& context, const std::string& continuation) {
  const bool seam_space = (!context.empty() && std::isspace((unsigned char)context.back())) ||
                          (!continuation.empty() && std::isspace((unsigned char)continuation[0]));
  return seam_space ? continuation : " " + continuation;
}

LoglikRequest make_request(const data::Tokenizer& tok, const std::string& context,
                           const std::string& continuation) {
  return {tok.encode(context), tok.encode(continuation)};
}

std::vector<Metric> score_multiple_choice(const std::vector<json>& rows, const std::string& path,
                                          bool winogrande, const LogitsFn& model,
                                          const data::Tokenizer& tok, const EvalOptions& opt) {
  std::vector<LoglikRequest> requests;
  std::vector<size_t> first, golds;
  std::vector<double> bytes;
  for (size_t i = 0; i < rows.size(); ++i) {
    first.push_back(requests.size());
    golds.push_back(field<size_t>(rows[i], "gold", path, i));
    if (winogrande) {  // partial scoring: the same continuation after each option
      const auto options = field<std::vector<std::string>>(rows[i], "context_options", path, i);
      const auto cont = field<std::string>(rows[i], "continuation", path, i);
      for (const std::string& ctx : options) {
        const std::string c = joined_continuation(ctx, cont);
        requests.push_back(make_request(tok, ctx, c));
        bytes.push_back(double(c.size()));
      }
    } else {
      const auto query = field<std::string>(rows[i], "query", path, i);
      for (const std::string& choice : field<std::vector<std::string>>(rows[i], "choices", path, i)) {
        const std::string c = joined_continuation(query, choice);
        requests.push_back(make_request(tok, query, c));
        bytes.push_back(double(c.size()));
      }
    }
    NHA_CHECK(golds.back() < requests.size() - first.back())
        << path << ": row " << i + 1 << ": gold " << golds.back() << " but only "
        << requests.size() - first.back() << " choices";
  }
  first.push_back(requests.size());
  const std::vector<LoglikResult> res = score_loglik(model, requests, opt.score);
  double acc = 0, acc_norm = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<double> ll, ll_norm;
    for (size_t r = first[i]; r < first[i + 1]; ++r) {
      ll.push_back(res[r].logprob);
      ll_norm.push_back(res[r].logprob / std::max(1.0, bytes[r]));
    }
    acc += argmax_index(ll) == golds[i];
    acc_norm += argmax_index(ll_norm) == golds[i];
  }
  const double n = double(rows.size());
  if (winogrande) return {{"acc", acc / n}};
  return {{"acc", acc / n}, {"acc_norm", acc_norm / n}};
}

// LAMBADA: acc = the whole target word is the greedy continuation; ppl = exp(-mean_docs
// log p(target)) (lm-evaluation-harness's per-document perplexity).
std::vector<Metric> score_lambada(const std::vector<json>& rows, const std::string& path,
                                  const LogitsFn& model, const data::Tokenizer& tok,
                                  const EvalOptions& opt) {
  std::vector<LoglikRequest> requests;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto ctx = field<std::string>(rows[i], "context", path, i);
    requests.push_back(
        make_request(tok, ctx, joined_continuation(ctx, field<std::string>(rows[i], "continuation",
                                                                             path, i))));
  }
  const std::vector<LoglikResult> res = score_loglik(model, requests, opt.score);
  double acc = 0, ll = 0;
  for (const LoglikResult& r : res) {
    acc += r.greedy;
    ll += r.logprob;
  }
  const double n = double(rows.size());
  return {{"acc", acc / n}, {"ppl", std::exp(-ll / n)}};
}

std::vector<std::string> answers_of(const json& row, const std::string& path, size_t i) {
  NHA_CHECK(row.contains("answer")) << path << ": row " << i + 1
                                    << " lacks 'answer'. HINT: contains rows are "
                                       "{\"context\": ..., \"answer\": \"...\" or [...]}";
  std::vector<std::string> answers;
  const json& a = row.at("answer");
  if (a.is_string())
    answers.push_back(a.get<std::string>());
  else
    answers = field<std::vector<std::string>>(row, "answer", path, i);
  if (row.contains("aliases"))
    for (const auto& alias : field<std::vector<std::string>>(row, "aliases", path, i))
      answers.push_back(alias);
  return answers;
}

// Recall from context: greedy generation until a newline (<= max_new_tokens), then a
// case-insensitive substring match of any answer.
std::vector<Metric> score_contains(const std::vector<json>& rows, const std::string& path,
                                   const LogitsFn& model, const data::Tokenizer& tok,
                                   const EvalOptions& opt) {
  std::vector<GenerateRequest> requests;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<int32_t> ids = tok.encode(field<std::string>(rows[i], "context", path, i));
    NHA_CHECK(!ids.empty()) << path << ": row " << i + 1 << ": field 'context' is empty"
                            << ". HINT: a contains task needs a context to continue (docs/eval.md)";
    if (opt.context_tokens > 0 && int64_t(ids.size()) > opt.context_tokens)
      ids.erase(ids.begin(), ids.end() - opt.context_tokens);
    requests.push_back({std::move(ids)});
  }
  const auto stop = [&](const std::vector<int32_t>& g) {
    return tok.decode(g).find('\n') != std::string::npos;
  };
  const auto generated =
      opt.generate ? opt.generate(requests, opt.max_new_tokens, stop, opt.score)
                   : generate_greedy(model, requests, opt.max_new_tokens, stop, opt.score);
  double hits = 0;
  for (size_t i = 0; i < rows.size(); ++i)
    hits += contains_answer(first_line(tok.decode(generated[i])), answers_of(rows[i], path, i));
  return {{"contains", hits / double(rows.size())}};
}

// Perplexity and bits per byte of a text file, sliding windows of max_len tokens advancing by
// `stride`: every token is scored once, with up to max_len - stride tokens of context. The first
// token is predicted after an EOS, the document boundary the models were trained with.
std::vector<Metric> score_text(const std::string& path, const LogitsFn& model,
                               const data::Tokenizer& tok, const EvalOptions& opt) {
  std::ifstream in(path, std::ios::binary);
  NHA_CHECK(in.good()) << "cannot open text file '" << path << "'";
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  NHA_CHECK(!text.empty()) << "text file '" << path << "' is empty";
  std::vector<int32_t> ids = {tok.eos_id()};
  tok.encode_append(text, ids);
  const int64_t L = opt.score.max_len;
  const int64_t stride = opt.text_stride > 0 ? std::min(opt.text_stride, L) : std::max<int64_t>(1, L / 2);
  std::vector<LoglikRequest> requests;
  const int64_t N = int64_t(ids.size());  // ids[0] is the EOS: tokens 1..N-1 are scored
  for (int64_t scored_end = 1; scored_end < N;) {
    const int64_t next = std::min(N, scored_end + (requests.empty() ? L : stride));
    const int64_t ctx_begin = std::max<int64_t>(0, next - 1 - L);
    requests.push_back({std::vector<int32_t>(ids.begin() + ctx_begin, ids.begin() + scored_end),
                        std::vector<int32_t>(ids.begin() + scored_end, ids.begin() + next)});
    scored_end = next;
  }
  double nll = 0;
  for (const LoglikResult& r : score_loglik(model, requests, opt.score)) nll -= r.logprob;
  const double tokens = double(N - 1);
  return {{"ppl", std::exp(nll / tokens)},
          {"bpb", nll / std::log(2.0) / double(text.size())},
          {"tokens", tokens}};
}

// Accuracy over all settings of the preset, then per setting ("acc@L64-K4").
std::vector<Metric> score_mqar(const std::string& preset, const LogitsFn& model,
                               const EvalOptions& opt, int64_t& examples) {
  const std::vector<MqarSettingResult> per_setting =
      evaluate_mqar(model, data::mqar_preset(preset), opt.score, opt.limit);
  std::vector<Metric> metrics = {{"acc", 0}};
  int64_t queries = 0, correct = 0;
  examples = 0;
  for (const MqarSettingResult& r : per_setting) {
    metrics.push_back({"acc@L" + std::to_string(r.seq_len) + "-K" + std::to_string(r.num_kv_pairs),
                       r.accuracy()});
    queries += r.queries;
    correct += r.correct;
    examples += r.examples;
  }
  metrics[0].value = queries > 0 ? double(correct) / double(queries) : 0.0;
  return metrics;
}

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower((unsigned char)c));
  return s;
}

}  // namespace

TaskSpec resolve_task(const std::string& spec, const std::string& data_dir) {
  for (const KnownTask& k : kKnownTasks)
    if (spec == k.name) {
      if (k.schema == Schema::Mqar) return {k.name, k.file, k.schema, k.primary};
      // The sets vendored in data/eval are compressed (FILE.zst); a plain FILE comes first.
      std::string path = (fs::path(data_dir) / k.file).string();
      if (!fs::exists(path) && fs::exists(path + ".zst")) path += ".zst";
      return {k.name, path, k.schema, k.primary};
    }
  // [name=]path[:schema]
  std::string name, rest = spec;
  if (const size_t eq = rest.find('='); eq != std::string::npos) {
    name = rest.substr(0, eq);
    rest = rest.substr(eq + 1);
  }
  std::string path = rest, schema;
  if (const size_t colon = rest.rfind(':'); colon != std::string::npos) {
    path = rest.substr(0, colon);
    schema = rest.substr(colon + 1);
  }
  if (name.empty()) name = fs::path(path).stem().string();
  if (schema.empty()) {
    NHA_CHECK(fs::path(path).extension() == ".txt")
        << "task '" << spec << "' is not a known task name and has no schema. HINT: known tasks: "
        << "piqa, hellaswag, arc_easy, arc_challenge, winogrande, lambada, triviaqa_closed_sub, "
        << "wikitext2, mqar; for your own file write PATH:SCHEMA (multiple_choice, winogrande, "
        << "lambada, contains, text), for an MQAR preset PRESET:mqar";
    schema = "text";
  }
  const Schema s = schema_from_name(schema);
  return {name, path, s, default_primary(s)};
}

double TaskResult::metric(const std::string& name) const {
  for (const Metric& m : metrics)
    if (m.name == name) return m.value;
  NHA_FAIL() << "task " << task << " has no metric '" << name << "'";
}

TaskResult run_task(const TaskSpec& task, const LogitsFn& model, const data::Tokenizer& tokenizer,
                    const EvalOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  TaskResult result{task.name, task.primary, {}, 0, 0};
  EvalOptions opt = options;
  if (opt.score.label.empty()) opt.score.label = task.name;
  if (task.schema == Schema::Text) {
    result.metrics = score_text(task.path, model, tokenizer, opt);
    result.rows = 1;
  } else if (task.schema == Schema::Mqar) {
    result.metrics = score_mqar(task.path, model, opt, result.rows);
  } else {
    const std::vector<json> rows = read_jsonl(task.path, opt.limit);
    result.rows = int64_t(rows.size());
    switch (task.schema) {
      case Schema::MultipleChoice:
      case Schema::Winogrande:
        result.metrics = score_multiple_choice(rows, task.path, task.schema == Schema::Winogrande,
                                               model, tokenizer, opt);
        break;
      case Schema::Lambada: result.metrics = score_lambada(rows, task.path, model, tokenizer, opt); break;
      case Schema::Contains: result.metrics = score_contains(rows, task.path, model, tokenizer, opt); break;
      case Schema::Text:
      case Schema::Mqar: break;
    }
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

size_t argmax_index(const std::vector<double>& values) {
  NHA_CHECK(!values.empty()) << "argmax of no values";
  return size_t(std::max_element(values.begin(), values.end()) - values.begin());
}

bool contains_answer(const std::string& generated, const std::vector<std::string>& answers) {
  const std::string g = lower(generated);
  for (const std::string& a : answers)
    if (!a.empty() && g.find(lower(a)) != std::string::npos) return true;
  return false;
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// ---- reports ------------------------------------------------------------------------------------

namespace {

// Accuracies as percentages (the papers' convention), perplexities as they are.
std::string shown(const Metric& m) {
  char buf[64];
  const bool fraction = m.name.starts_with("acc") || m.name == "contains";
  std::snprintf(buf, sizeof buf, fraction ? "%.2f" : "%.3f", fraction ? 100 * m.value : m.value);
  return buf;
}

// Mean of the primary metrics that are accuracies (the "avg" column of the paper's tables).
bool average_of_accuracies(const std::vector<TaskResult>& results, double* avg) {
  double sum = 0;
  int n = 0;
  for (const TaskResult& r : results)
    if (r.primary == "acc" || r.primary == "acc_norm" || r.primary == "contains") {
      sum += r.metric(r.primary);
      ++n;
    }
  if (n > 0) *avg = sum / n;
  return n > 0;
}

}  // namespace

std::string format_table(const std::vector<TaskResult>& results) {
  std::ostringstream o;
  char line[256];
  std::snprintf(line, sizeof line, "%-22s %-10s %10s %8s %9s\n", "task", "metric", "value", "rows",
                "seconds");
  o << line;
  for (const TaskResult& r : results)
    for (const Metric& m : r.metrics) {
      std::snprintf(line, sizeof line, "%-22s %-10s %10s %8lld %9.1f%s\n", r.task.c_str(),
                    m.name.c_str(), shown(m).c_str(), (long long)r.rows, r.seconds,
                    m.name == r.primary ? "  *" : "");
      o << line;
    }
  double avg = 0;
  if (average_of_accuracies(results, &avg)) {
    std::snprintf(line, sizeof line, "%-22s %-10s %10.2f\n", "average (*)", "acc", 100 * avg);
    o << line;
  }
  return o.str();
}

std::string format_markdown(const std::vector<TaskResult>& results, const std::string& title) {
  std::ostringstream o;
  o << "## " << title << "\n\n| task | metric | value | rows | seconds |\n|---|---|---|---|---|\n";
  for (const TaskResult& r : results)
    for (const Metric& m : r.metrics)
      o << "| " << r.task << " | " << m.name << (m.name == r.primary ? " (*)" : "") << " | "
        << shown(m) << " | " << r.rows << " | " << std::lround(r.seconds) << " |\n";
  double avg = 0;
  if (average_of_accuracies(results, &avg)) o << "| **average (*)** | acc | " << shown({"acc", avg}) << " | | |\n";
  o << "\nAccuracies in %; (*) marks the metric the NHA paper reports for the task.\n";
  return o.str();
}

std::string format_json(const std::vector<TaskResult>& results, const std::string& model) {
  json j;
  j["model"] = model;
  j["results"] = json::object();
  for (const TaskResult& r : results) {
    json t;
    for (const Metric& m : r.metrics) t[m.name] = m.value;
    t["primary"] = r.primary;
    t["rows"] = r.rows;
    t["seconds"] = r.seconds;
    j["results"][r.task] = t;
  }
  double avg = 0;
  if (average_of_accuracies(results, &avg)) j["average_primary_accuracy"] = avg;
  return j.dump(2) + "\n";
}

}  // namespace nha::eval
