// The `nha` command: one binary, one subcommand per job.
#include <CLI/CLI.hpp>

#include <iostream>

#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"nha: train and evaluate Native Hybrid Attention language models"};
  app.require_subcommand(1);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const nha::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
