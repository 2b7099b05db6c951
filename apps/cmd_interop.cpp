// Interoperability subcommands of `nha` (docs/interop.md): import (a Hugging Face Llama or
// our own safetensors directory -> a parameters-only .h5), convert (Transformer++ -> NHA), and
// the safetensors form of `nha export` (apps/cmd_train.cpp hands --format safetensors to
// export_safetensors_command).
#include <CLI/CLI.hpp>
#include <filesystem>
#include <iostream>
#include <memory>

#include "apps/cli.h"
#include "core/error.h"
#include "eval/runner.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/interop.h"

namespace fs = std::filesystem;

namespace nha::apps {

void export_safetensors_command(const std::string& checkpoint, const std::string& out_dir,
                                DType dtype) {
  const RunConfig run = parse_config(read_config_yaml(checkpoint), checkpoint + ":/config");
  ExportedConfigExtras extras;
  extras.dtype = dtype;
  // The tokenizer goes next to the weights when the run's shards name one that still exists
  // (load_tokenizer checks it is the one they were made with); its ids go into config.json.
  const std::string tokenizer_path = eval::recorded_tokenizer_path(run);
  if (!tokenizer_path.empty()) {
    const data::Tokenizer tok = eval::load_tokenizer(run, tokenizer_path);
    extras.bos_id = tok.bos_id();
    extras.eos_id = tok.eos_id();
  }
  const SafetensorsExport e = export_safetensors(checkpoint, out_dir, extras, tokenizer_path);
  std::cout << "wrote " << out_dir << "/model.safetensors (" << e.tensors << " tensors, "
            << (dtype == DType::BF16 ? "bf16" : "fp32") << ", " << e.model_type << " names) and "
            << "config.json" << (tokenizer_path.empty() ? "" : " and tokenizer.model") << " from "
            << checkpoint << "\n";
  if (tokenizer_path.empty())
    std::cout << "no tokenizer: the run's data.train manifest names none that exists; copy "
                 "yours to "
              << out_dir << "/tokenizer.model\n";
}

namespace {

// nha convert RUN_OR_CKPT --to nha [--window W] [--slots M] [--full-attention-every K] --out FILE
void register_convert(CLI::App& app) {
  auto src = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto to = std::make_shared<std::string>("nha");
  auto conversion = std::make_shared<NhaConversion>();
  CLI::App* c = app.add_subcommand(
      "convert", "turn a Transformer++ model into an NHA model (q/k/v/o and MLPs reused)");
  c->add_option("run_or_checkpoint", *src,
                "run directory (newest checkpoint), checkpoint or "
                "export .h5 of a Transformer++ model")
      ->required();
  c->add_option("--to", *to, "target architecture")
      ->check(CLI::IsMember({"nha"}))
      ->capture_default_str();
  c->add_option("--window", conversion->window, "sliding window w of the nha layers")
      ->check(kNonNegative)
      ->capture_default_str();
  c->add_option("--slots", conversion->slots, "memory slots M of the nha layers")
      ->check(kPositive)
      ->capture_default_str();
  c->add_option("--full-attention-every", conversion->full_attention_every,
                "layers K-1, 2K-1, ... stay full attention (0: none)")
      ->check(kNonNegative)
      ->capture_default_str();
  c->add_option("--seed", conversion->seed, "seed of the new slot-gate projections")
      ->capture_default_str();
  c->add_option("--out", *out, "output .h5 (parameters only, f32)")->required();
  c->callback([=] {
    const std::string ckpt = resolve_checkpoint(*src);
    convert_to_nha(ckpt, *out, *conversion);
    std::cout << "wrote " << *out << " (nha: window " << conversion->window << ", slots "
              << conversion->slots << ", full attention every " << conversion->full_attention_every
              << " layers; from " << ckpt << ")\n";
  });
}

}  // namespace

void register_interop_commands(CLI::App& app) {
  register_convert(app);
  // nha import DIR --out RUN_DIR_OR_FILE.h5
  auto dir = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  CLI::App* c = app.add_subcommand(
      "import",
      "read a Hugging Face Llama (or `nha export --format safetensors`) directory into "
      "a parameters-only .h5 for nha eval / generate");
  c->add_option("dir", *dir,
                "directory with config.json and model.safetensors (or shards + "
                "model.safetensors.index.json)")
      ->required();
  c->add_option("--out", *out,
                "output .h5 file, or a run directory (RUN/checkpoints/"
                "step_00000000.h5)")
      ->required();
  c->callback([=] {
    const SafetensorsImport r = import_safetensors(*dir, *out);
    std::cout << "wrote " << r.out_path << " (" << r.tensors << " parameters, "
              << (r.dtype == DType::BF16 ? "bf16" : "fp32") << ", from a " << r.model_type
              << " model in " << *dir << ")\n";
    if (fs::exists(fs::path(*dir) / "tokenizer.model"))
      std::cout << "its tokenizer: pass --tokenizer "
                << (fs::path(*dir) / "tokenizer.model").string() << " to nha eval / nha generate\n";
  });
}

}  // namespace nha::apps
