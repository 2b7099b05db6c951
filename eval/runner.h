// Loading a trained model for evaluation or generation, and `nha eval`'s task loop.
//
//   LoadedModel m = load_model("runs/nha-20m", Device::cuda(0));   // newest checkpoint of a run
//   LoadedModel m = load_model("runs/nha-20m/checkpoints/step_00001000.h5", Device::cpu());
//   data::Tokenizer tok = load_tokenizer(m.config, "");
//   auto results = run_tasks(m, tok, {"piqa", "hellaswag"}, data_dir, options);
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "eval/tasks.h"
#include "layers/transformer.h"
#include "train/config.h"

namespace nha::eval {

struct LoadedModel {
  RunConfig config;                       // the run's resolved config (from the file)
  std::shared_ptr<LanguageModel> model;   // parameters loaded, on `device`
  std::string checkpoint;                 // the file the parameters came from
  int64_t step = 0, tokens_seen = 0;
  Device device;
  DType compute_dtype = DType::F32;       // bf16 autocast on the GPU, f32 on the CPU
};

// `path` is a run directory (its newest checkpoint), a checkpoint, or an `nha export` file.
LoadedModel load_model(const std::string& path, Device device);

// ids [B, T] -> logits [B, T, V] of the loaded model (under bf16 autocast on the GPU).
LogitsFn logits_fn(const LoadedModel& m);

// The tokenizer of a run: `explicit_path` when given, else the one the training shards were made
// with (data.train's manifest.json). Fails with a hint when it cannot be found, or when the
// manifest records another tokenizer's hash (another tokenizer gives other numbers silently).
data::Tokenizer load_tokenizer(const RunConfig& config, const std::string& explicit_path);
// The tokenizer file data.train's manifest.json names, or "" when it names none or it is gone.
std::string recorded_tokenizer_path(const RunConfig& config);

// Runs every task (names or PATH:SCHEMA specs, resolved against data_dir) and prints the table.
std::vector<TaskResult> run_tasks(const LoadedModel& m, const data::Tokenizer& tokenizer,
                                  const std::vector<std::string>& tasks,
                                  const std::string& data_dir, const EvalOptions& options);

}  // namespace nha::eval
