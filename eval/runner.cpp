#include "eval/runner.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autograd/autocast.h"
#include "autograd/node.h"
#include "core/random.h"
#include "eval/generate.h"
#include "train/checkpoint.h"

namespace nha::eval {

namespace fs = std::filesystem;

LoadedModel load_model(const std::string& path, Device device) {
  LoadedModel m;
  m.checkpoint = resolve_checkpoint(path);
  m.config = parse_config(read_config_yaml(m.checkpoint), m.checkpoint + ":/config");
  const TrainState state = read_train_state(m.checkpoint);
  m.step = state.step;
  m.tokens_seen = state.tokens_seen;
  {
    SkipInitGuard loaded_next;  // every parameter is overwritten below (a missing one is an error)
    m.model = std::make_shared<LanguageModel>(m.config.model, m.config.train.seed);
  }
  load_parameters_into(m.checkpoint, m.model->named_parameters());
  m.model->to(device);
  m.device = device;
  m.compute_dtype = device.is_cuda() ? DType::BF16 : DType::F32;
  return m;
}

LogitsFn logits_fn(const LoadedModel& m) {
  return [model = m.model, dtype = m.compute_dtype](const Tensor& ids) {
    AutocastGuard autocast(dtype);
    return model->forward(ids);
  };
}

namespace {

// data.train's manifest.json: the shards' {name, hash} of the tokenizer (null when there is none).
nlohmann::json recorded_tokenizer(const fs::path& manifest) {
  if (manifest.parent_path().empty() || !fs::exists(manifest)) return nullptr;
  std::ifstream in(manifest);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  return !j.is_discarded() && j.contains("tokenizer") ? j["tokenizer"] : nlohmann::json();
}

}  // namespace

std::string recorded_tokenizer_path(const RunConfig& config) {
  const nlohmann::json recorded =
      recorded_tokenizer(fs::path(config.data.train) / "manifest.json");
  if (recorded.contains("name") && fs::exists(recorded["name"].get<std::string>()))
    return recorded["name"].get<std::string>();
  return "";
}

data::Tokenizer load_tokenizer(const RunConfig& config, const std::string& explicit_path) {
  const fs::path manifest = fs::path(config.data.train) / "manifest.json";
  const nlohmann::json recorded = recorded_tokenizer(manifest);
  const std::string path = explicit_path.empty() ? recorded_tokenizer_path(config) : explicit_path;
  NHA_CHECK(!path.empty()) << "cannot find the tokenizer of this model (looked in "
                           << manifest.string() << "). HINT: pass --tokenizer PATH/TO/tokenizer.model";
  data::Tokenizer tok = data::Tokenizer::load(path);
  if (recorded.contains("hash")) {
    const std::string want = recorded["hash"].get<std::string>();
    NHA_CHECK(tok.hash_hex() == want)
        << "tokenizer '" << path << "' (" << tok.hash_hex() << ") is not the one the model's "
        << "training shards were made with (" << manifest.string() << " records " << want
        << "): its numbers would not be comparable. HINT: pass that tokenizer ("
        << recorded.value("name", std::string("see the manifest")) << ")";
  }
  return tok;
}

std::vector<TaskResult> run_tasks(const LoadedModel& m, const data::Tokenizer& tokenizer,
                                  const std::vector<std::string>& tasks,
                                  const std::string& data_dir, const EvalOptions& options) {
  // No results would replace the eval.json of an earlier evaluation with nothing.
  NHA_CHECK(!tasks.empty()) << "no task to evaluate (--tasks is empty). HINT: e.g. --tasks "
                            << "piqa,lambada (docs/eval.md lists them)";
  NHA_CHECK(tokenizer.vocab_size() <= m.config.model.vocab_size)
      << "tokenizer has " << tokenizer.vocab_size() << " ids but the model only "
      << m.config.model.vocab_size << ". HINT: pass the tokenizer the model was trained with";
  const LogitsFn model = logits_fn(m);
  EvalOptions opt = options;
  if (!opt.generate)
    opt.generate = [&m](const std::vector<GenerateRequest>& requests, int64_t max_new_tokens,
                        const StopFn& stop, const ScoreOptions& score) {
      return generate_greedy_cached(*m.model, m.compute_dtype, requests, max_new_tokens, stop,
                                    score);
    };
  std::vector<TaskResult> results;
  for (const std::string& t : tasks) {
    const TaskSpec spec = resolve_task(t, data_dir);
    std::fprintf(stderr, "eval: %s (%s, %s)\n", spec.name.c_str(), schema_name(spec.schema),
                 spec.path.c_str());
    results.push_back(run_task(spec, model, tokenizer, opt));
    const TaskResult& r = results.back();
    std::fprintf(stderr, "eval: %s %s = %.4f (%lld rows, %.1f s)\n", r.task.c_str(),
                 r.primary.c_str(), r.metric(r.primary), (long long)r.rows, r.seconds);
  }
  return results;
}

}  // namespace nha::eval
