// `nha plot RUN [RUN...] --out loss.svg`: train and validation loss against tokens seen, one colour
// per run, written as a self-contained SVG (no Python, no plotting library).
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace nha {

struct RunCurve {
  std::string name;                                // legend label (the run directory's name)
  std::vector<std::pair<double, double>> train;    // (tokens, loss) of "train" records
  std::vector<std::pair<double, double>> val;      // (tokens, loss) of "val" records
};

// Reads RUN_DIR/metrics.jsonl (or a metrics .jsonl file given directly).
RunCurve read_run_metrics(const std::string& run_or_file);

// The SVG text: axes with ticks, axis labels, a title, solid lines for train loss, dashed lines
// with dots for validation loss, and a legend. The y range leaves out the first 5% of each run's
// tokens (the initial drop from ln V would flatten everything else); points outside are clipped.
std::string loss_plot_svg(const std::vector<RunCurve>& runs, const std::string& title);

// read_run_metrics for each run, then writes the SVG to out_path (atomically).
void write_loss_plot(const std::vector<std::string>& runs, const std::string& out_path,
                     const std::string& title = "loss vs tokens");

}  // namespace nha
