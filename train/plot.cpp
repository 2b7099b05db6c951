#include "train/plot.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/fileio.h"
#include "train/metrics.h"

namespace fs = std::filesystem;

namespace nha {

namespace {

// Tick spacing of 1, 2 or 5 x 10^k giving about `target` ticks over `range`.
double nice_step(double range, int target) {
  if (!(range > 0)) return 1;
  const double raw = range / target, mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double r = raw / mag;
  return (r < 1.5 ? 1 : r < 3.5 ? 2 : r < 7.5 ? 5 : 10) * mag;
}

std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}

std::string num(double v) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.1f", v);
  return b;
}

const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                         "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};

}  // namespace

RunCurve read_run_metrics(const std::string& run_or_file) {
  fs::path p(run_or_file);
  RunCurve c;
  if (fs::is_directory(p)) {
    c.name = fs::path(run_or_file).lexically_normal().filename().string();
    if (c.name.empty()) c.name = fs::path(run_or_file).lexically_normal().parent_path().filename().string();
    p /= "metrics.jsonl";
  } else {
    c.name = p.parent_path().filename().string();
  }
  NHA_CHECK(fs::exists(p)) << "no metrics file '" << p.string()
                           << "'. HINT: pass a run directory written by `nha train` (it holds "
                           << "metrics.jsonl) or the .jsonl file itself";
  std::ifstream in(p);
  std::map<double, double> train, val;  // by tokens: a resumed run's later record wins
  int64_t line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception&) {
      continue;  // a line cut short by a crash
    }
    if (!j.contains("type") || !j.contains("tokens") || !j.contains("loss") || !j["loss"].is_number())
      continue;
    const std::string type = j["type"].get<std::string>();
    const double tokens = j["tokens"].get<double>(), loss = j["loss"].get<double>();
    if (!std::isfinite(loss)) continue;
    if (type == "train") train[tokens] = loss;
    else if (type == "val") val[tokens] = loss;
  }
  c.train.assign(train.begin(), train.end());
  c.val.assign(val.begin(), val.end());
  return c;
}

std::string loss_plot_svg(const std::vector<RunCurve>& runs, const std::string& title) {
  const double W = 960, H = 560, L = 80, R = 230, T = 50, B = 64;
  const double pw = W - L - R, ph = H - T - B;
  double xmax = 0, ymin = std::numeric_limits<double>::infinity(), ymax = -ymin;
  for (const RunCurve& c : runs) {
    double run_max = 0;
    for (auto& p : c.train) run_max = std::max(run_max, p.first);
    for (auto& p : c.val) run_max = std::max(run_max, p.first);
    xmax = std::max(xmax, run_max);
    for (auto& p : c.train) {
      if (p.first < 0.05 * run_max && c.train.size() > 4) continue;
      ymin = std::min(ymin, p.second);
      ymax = std::max(ymax, p.second);
    }
    for (auto& p : c.val) {
      ymin = std::min(ymin, p.second);
      ymax = std::max(ymax, p.second);
    }
  }
  NHA_CHECK(std::isfinite(ymin)) << "no loss records to plot. HINT: the runs' metrics.jsonl have no "
                                 << "train/val records yet (they appear every logging.interval steps)";
  if (xmax <= 0) xmax = 1;
  if (ymax - ymin < 1e-6) {
    ymin -= 0.5;
    ymax += 0.5;
  }
  const double pad = 0.05 * (ymax - ymin);
  ymin -= pad;
  ymax += pad;
  const double xstep = nice_step(xmax, 6), ystep = nice_step(ymax - ymin, 6);
  xmax = std::ceil(xmax / xstep) * xstep;
  ymin = std::floor(ymin / ystep) * ystep;
  ymax = std::ceil(ymax / ystep) * ystep;
  auto X = [&](double x) { return L + pw * x / xmax; };
  auto Y = [&](double y) { return T + ph * (1 - (y - ymin) / (ymax - ymin)); };

  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" viewBox=\"0 0 " << W << " " << H << "\" font-family=\"sans-serif\" font-size=\"13\">\n";
  s << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  s << "<defs><clipPath id=\"plot\"><rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << pw
    << "\" height=\"" << ph << "\"/></clipPath></defs>\n";
  s << "<text x=\"" << L + pw / 2 << "\" y=\"" << T - 18 << "\" text-anchor=\"middle\" font-size=\"16\">"
    << escape(title) << "</text>\n";
  // Grid and ticks.
  for (double x = 0; x <= xmax + 1e-9 * xmax; x += xstep) {
    s << "<line x1=\"" << num(X(x)) << "\" y1=\"" << T << "\" x2=\"" << num(X(x)) << "\" y2=\"" << T + ph
      << "\" stroke=\"#e6e6e6\"/>\n";
    // "50.0k" -> "50k", "2.00M" -> "2M", "1.50M" -> "1.5M"
    std::string label = format_count(x);
    const size_t dot = label.find('.');
    if (dot != std::string::npos) {
      size_t end = dot + 1;
      while (end < label.size() && std::isdigit(static_cast<unsigned char>(label[end]))) ++end;
      size_t cut = end;
      while (cut > dot + 1 && label[cut - 1] == '0') --cut;
      if (cut == dot + 1) cut = dot;
      label.erase(cut, end - cut);
    }
    s << "<text x=\"" << num(X(x)) << "\" y=\"" << T + ph + 18 << "\" text-anchor=\"middle\">"
      << label << "</text>\n";
  }
  for (double y = ymin; y <= ymax + 1e-9; y += ystep) {
    s << "<line x1=\"" << L << "\" y1=\"" << num(Y(y)) << "\" x2=\"" << L + pw << "\" y2=\""
      << num(Y(y)) << "\" stroke=\"#e6e6e6\"/>\n";
    char label[32];
    std::snprintf(label, sizeof(label), ystep >= 1 ? "%.0f" : ystep >= 0.1 ? "%.1f" : "%.2f", y);
    s << "<text x=\"" << L - 8 << "\" y=\"" << num(Y(y) + 4) << "\" text-anchor=\"end\">" << label
      << "</text>\n";
  }
  s << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << pw << "\" height=\"" << ph
    << "\" fill=\"none\" stroke=\"black\"/>\n";
  s << "<text x=\"" << L + pw / 2 << "\" y=\"" << H - 20 << "\" text-anchor=\"middle\">tokens</text>\n";
  s << "<text transform=\"translate(" << 22 << "," << T + ph / 2
    << ") rotate(-90)\" text-anchor=\"middle\">loss (nats/token)</text>\n";
  // Curves.
  s << "<g clip-path=\"url(#plot)\" fill=\"none\" stroke-width=\"1.8\">\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const char* color = kColors[i % (sizeof(kColors) / sizeof(kColors[0]))];
    if (!runs[i].train.empty()) {
      s << "<polyline stroke=\"" << color << "\" points=\"";
      for (auto& p : runs[i].train) s << num(X(p.first)) << "," << num(Y(p.second)) << " ";
      s << "\"/>\n";
    }
    if (!runs[i].val.empty()) {
      s << "<polyline stroke=\"" << color << "\" stroke-dasharray=\"6,4\" points=\"";
      for (auto& p : runs[i].val) s << num(X(p.first)) << "," << num(Y(p.second)) << " ";
      s << "\"/>\n";
      for (auto& p : runs[i].val)
        s << "<circle cx=\"" << num(X(p.first)) << "\" cy=\"" << num(Y(p.second)) << "\" r=\"3.5\" fill=\""
          << color << "\" stroke=\"none\"/>\n";
    }
  }
  s << "</g>\n";
  // Legend.
  double ly = T + 10;
  for (size_t i = 0; i < runs.size(); ++i) {
    const char* color = kColors[i % (sizeof(kColors) / sizeof(kColors[0]))];
    const double lx = L + pw + 16;
    if (!runs[i].train.empty()) {
      s << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 28 << "\" y2=\"" << ly
        << "\" stroke=\"" << color << "\" stroke-width=\"2\"/>\n";
      s << "<text x=\"" << lx + 36 << "\" y=\"" << ly + 4 << "\">" << escape(runs[i].name)
        << " train</text>\n";
      ly += 22;
    }
    if (!runs[i].val.empty()) {
      s << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 28 << "\" y2=\"" << ly
        << "\" stroke=\"" << color << "\" stroke-width=\"2\" stroke-dasharray=\"6,4\"/>\n";
      s << "<circle cx=\"" << lx + 14 << "\" cy=\"" << ly << "\" r=\"3.5\" fill=\"" << color << "\"/>\n";
      s << "<text x=\"" << lx + 36 << "\" y=\"" << ly + 4 << "\">" << escape(runs[i].name)
        << " val</text>\n";
      ly += 22;
    }
  }
  s << "</svg>\n";
  return s.str();
}

void write_loss_plot(const std::vector<std::string>& runs, const std::string& out_path,
                     const std::string& title) {
  NHA_CHECK(!runs.empty()) << "nha plot: no runs given. HINT: nha plot runs/A runs/B --out loss.svg";
  std::vector<RunCurve> curves;
  for (const std::string& r : runs) curves.push_back(read_run_metrics(r));
  const std::string svg = loss_plot_svg(curves, title);
  write_file_atomic(out_path, svg);
}

}  // namespace nha
