// The `nha` command: one binary, one subcommand per job. Each apps/cmd_*.cpp registers its own.
#include <CLI/CLI.hpp>

#include <iostream>

#include "apps/cli.h"
#include "core/error.h"

namespace nha::apps {
void register_data_commands(CLI::App& app);   // apps/cmd_data.cpp
void register_train_commands(CLI::App& app);  // apps/cmd_train.cpp
void register_eval_commands(CLI::App& app);   // apps/cmd_eval.cpp
void register_generate_commands(CLI::App& app);  // apps/cmd_generate.cpp
void register_interop_commands(CLI::App& app);  // apps/cmd_interop.cpp
}

int main(int argc, char** argv) {
  CLI::App app{"nha: train and evaluate Native Hybrid Attention language models"};
  app.require_subcommand(1);
  nha::apps::register_data_commands(app);
  nha::apps::register_train_commands(app);
  nha::apps::register_eval_commands(app);
  nha::apps::register_generate_commands(app);
  nha::apps::register_interop_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const nha::apps::ExitStatus& s) {
    return s.code;
  } catch (const nha::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {  // e.g. std::filesystem errors
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
