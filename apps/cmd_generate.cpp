// `nha generate RUN_OR_CKPT --prompt TEXT [--prompt ...] [--prompt-file FILE]`: text generation
// with caches (docs/eval.md "Generation"). All prompts are decoded as one batch; each prompt
// starts after an EOS, the document boundary the models were trained with.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "apps/cli.h"
#include "eval/generate.h"
#include "eval/runner.h"
#include "train/trainer.h"

namespace nha::apps {

namespace {

struct GenerateArgs {
  std::string model, prompt_file, tokenizer, device = "auto";
  std::vector<std::string> prompts, stops;
  eval::SamplingOptions sampling;
};

// --prompt values, then the non-empty lines of --prompt-file.
std::vector<std::string> collect_prompts(const GenerateArgs& a) {
  std::vector<std::string> prompts = a.prompts;
  if (!a.prompt_file.empty()) {
    std::ifstream in(a.prompt_file);
    NHA_CHECK(in.good()) << "cannot read the prompt file '" << a.prompt_file << "'";
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) prompts.push_back(line);
  }
  NHA_CHECK(!prompts.empty())
      << "nothing to generate from. HINT: give --prompt TEXT (repeatable) or --prompt-file FILE "
         "(one prompt per line)";
  return prompts;
}

// The text of new tokens up to the first stop string (the stop string and EOS not shown).
std::string completion_text(const data::Tokenizer& tok, std::vector<int32_t> ids,
                            const std::vector<std::string>& stops) {
  if (!ids.empty() && ids.back() == tok.eos_id()) ids.pop_back();
  std::string text = tok.decode(ids);
  for (const std::string& s : stops) text = text.substr(0, text.find(s));
  return text;
}

void run_generate(const GenerateArgs& a) {
  eval::validate(a.sampling);  // before the (slow) model load
  const std::vector<std::string> texts = collect_prompts(a);
  const eval::LoadedModel m = eval::load_model(a.model, resolve_device(a.device));
  const data::Tokenizer tok = eval::load_tokenizer(m.config, a.tokenizer);
  NHA_CHECK(tok.vocab_size() <= m.config.model.vocab_size)
      << "tokenizer has " << tok.vocab_size() << " ids but the model only "
      << m.config.model.vocab_size << ". HINT: pass the tokenizer the model was trained with";
  std::vector<std::vector<int32_t>> prompts;
  for (const std::string& t : texts) {
    prompts.push_back({tok.eos_id()});
    tok.encode_append(t, prompts.back());
  }
  eval::SamplingOptions o = a.sampling;
  o.eos_id = tok.eos_id();
  eval::StopFn stop;
  if (!a.stops.empty())
    stop = [&](const std::vector<int32_t>& g) {
      const std::string text = tok.decode(g);
      for (const std::string& s : a.stops)
        if (text.find(s) != std::string::npos) return true;
      return false;
    };
  std::fprintf(stderr, "generate: %s (step %lld) on %s, %zu prompt(s)\n", m.checkpoint.c_str(),
               (long long)m.step, m.device.str().c_str(), prompts.size());
  const eval::GenerationResult r =
      eval::generate(*m.model, prompts, o, stop, m.compute_dtype);
  for (size_t i = 0; i < texts.size(); ++i)
    std::printf("=== prompt %zu (%zu new tokens)\n%s%s\n", i + 1, r.tokens[i].size(),
                texts[i].c_str(), completion_text(tok, r.tokens[i], a.stops).c_str());
  std::printf("prefill: %lld tokens in %.3f s (%.0f tok/s); decode: %lld tokens in %.3f s "
              "(%.1f tok/s, %lld steps of %zu rows)\n",
              (long long)r.prompt_tokens, r.prefill_seconds,
              double(r.prompt_tokens) / std::max(r.prefill_seconds, 1e-9),
              (long long)(r.new_tokens - int64_t(prompts.size())), r.decode_seconds,
              double(r.new_tokens - int64_t(prompts.size())) / std::max(r.decode_seconds, 1e-9),
              (long long)r.steps, prompts.size());
}

}  // namespace

void register_generate_commands(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* c = app.add_subcommand("generate", "generate text from prompts with a trained model");
  c->add_option("model", a->model, "run directory, checkpoint or export file (.h5)")->required();
  c->add_option("--prompt", a->prompts, "prompt text (repeatable)");
  c->add_option("--prompt-file", a->prompt_file, "file with one prompt per line");
  c->add_option("--max-new-tokens", a->sampling.max_new_tokens, "new tokens per prompt at most")
      ->check(kNonNegative)
      ->capture_default_str();
  c->add_option("--temperature", a->sampling.temperature, "0 = greedy; > 0 samples")
      ->capture_default_str();
  c->add_option("--top-k", a->sampling.top_k, "sample from the k most likely tokens (0: all)")
      ->capture_default_str();
  c->add_option("--top-p", a->sampling.top_p, "nucleus sampling mass, in (0, 1]")
      ->capture_default_str();
  c->add_option("--seed", a->sampling.seed, "random seed of the sampler")->capture_default_str();
  c->add_option("--stop", a->stops, "stop a prompt once its text holds this string (repeatable)");
  c->add_option("--tokenizer", a->tokenizer, "tokenizer .model (default: the training shards')");
  c->add_option("--device", a->device, "auto | cpu | cuda | cuda:N")->capture_default_str();
  c->callback([a] { run_generate(*a); });
}

}  // namespace nha::apps
