#include "train/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <filesystem>
#include <sstream>
#include <vector>

#include "autograd/ops.h"
#include "core/allocator.h"
#include "core/error.h"
#include "core/fileio.h"
#include "data/loader.h"

namespace nha {

double mixer_span(const MixerConfig& m, int64_t seq_len) {
  const double T = double(std::max<int64_t>(seq_len, 1));
  // Mean over t in [0, T) of min(t + 1, w): keys visible to query t inside a window w.
  auto window_span = [T](double w) {
    if (w <= 0 || w >= T) return (T + 1) / 2;
    return (w * (w + 1) / 2 + (T - w) * w) / T;
  };
  switch (m.type) {
    case MixerType::Attention: return window_span(double(m.window));
    case MixerType::NHA:
    case MixerType::GSA:
      return (m.window > 0 ? window_span(double(m.window)) : 0.0) + double(m.slots);
  }
  return window_span(0);
}

double flops_per_token(const ModelConfig& model, int64_t seq_len, int64_t matmul_params) {
  double span = 0;
  for (int64_t l = 0; l < model.n_layers; ++l) span += mixer_span(model.mixer(l), seq_len);
  return 6.0 * double(matmul_params) + 12.0 * double(model.d_model) * span;
}

MemoryUsage memory_usage(Device device) {
  MemoryUsage u;
  if (device.is_cuda()) {
    Allocator& a = allocator_for(DeviceKind::CUDA);
    u.bytes = int64_t(a.bytes_in_use());
    u.peak = int64_t(a.peak_bytes());
    u.source = "cuda";
    return u;
  }
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return u;
  char line[256];
  while (std::fgets(line, sizeof(line), f)) {
    long long kb = 0;
    if (std::sscanf(line, "VmRSS: %lld kB", &kb) == 1) u.bytes = kb * 1024;
    if (std::sscanf(line, "VmHWM: %lld kB", &kb) == 1) u.peak = kb * 1024;
  }
  std::fclose(f);
  return u;
}

void reset_memory_peak(Device device) {
  if (device.is_cuda()) allocator_for(DeviceKind::CUDA).reset_peak();
}

std::string format_count(double n) {
  char buf[32];
  const double a = std::fabs(n);
  if (a >= 1e9) std::snprintf(buf, sizeof(buf), "%.2fG", n / 1e9);
  else if (a >= 1e6) std::snprintf(buf, sizeof(buf), "%.2fM", n / 1e6);
  else if (a >= 1e3) std::snprintf(buf, sizeof(buf), "%.1fk", n / 1e3);
  else std::snprintf(buf, sizeof(buf), "%.0f", n);
  return buf;
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  const long long t = (long long)std::llround(s);
  if (t >= 3600) std::snprintf(buf, sizeof(buf), "%lldh%02lldm", t / 3600, (t / 60) % 60);
  else if (t >= 60) std::snprintf(buf, sizeof(buf), "%lldm%02llds", t / 60, t % 60);
  else std::snprintf(buf, sizeof(buf), "%llds", t);
  return buf;
}

std::string format_bytes(double b) {
  char buf[32];
  if (b >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof(buf), "%.2f GiB", b / (1024.0 * 1024 * 1024));
  else std::snprintf(buf, sizeof(buf), "%.0f MiB", b / (1024.0 * 1024));
  return buf;
}

void MetricsLog::open(const std::string& path, int64_t truncate_after_step) {
  path_ = path;
  if (truncate_after_step >= 0 && std::filesystem::exists(path)) {
    std::vector<std::string> keep;
    {
      std::ifstream in(path);
      for (std::string line; std::getline(in, line);) {
        if (line.empty()) continue;
        try {
          nlohmann::json j = nlohmann::json::parse(line);
          if (j.contains("step") && j["step"].get<int64_t>() > truncate_after_step) continue;
        } catch (const std::exception&) {
          continue;  // a line cut short by a crash
        }
        keep.push_back(line);
      }
    }
    std::string kept;
    for (const std::string& l : keep) kept += l + "\n";
    write_file_atomic(path, kept);  // a crash now must not lose the records kept
  }
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  NHA_CHECK(fd_ >= 0) << "cannot open '" << path << "' for writing: " << std::strerror(errno)
                      << ". HINT: check that the run directory (logging.run_dir) is writable";
}

MetricsLog::~MetricsLog() {
  if (fd_ >= 0) ::close(fd_);
}

void MetricsLog::write(const nlohmann::json& record) {
  if (fd_ < 0) return;
  const std::string line = record.dump() + "\n";
  const off_t before = ::lseek(fd_, 0, SEEK_END);
  ssize_t w;
  do {
    w = ::write(fd_, line.data(), line.size());
  } while (w < 0 && errno == EINTR);
  if (w == ssize_t(line.size())) return;
  const int err = w < 0 ? errno : ENOSPC;
  if (w > 0 && before >= 0) (void)!::ftruncate(fd_, before);  // drop the partial record
  NHA_FAIL() << "writing a record to '" << path_ << "' failed: " << std::strerror(err)
             << " (the records before it are kept). HINT: is the disk full? Free space and "
             << "continue with --resume";
}

PredictionCount count_correct_predictions(const Tensor& logits, const Tensor& targets) {
  NHA_CHECK(logits.dim() == 3 && targets.dim() == 2 && logits.size(0) == targets.size(0) &&
            logits.size(1) == targets.size(1))
      << "count_correct_predictions: logits " << shape_str(logits.shape()) << " and targets "
      << shape_str(targets.shape()) << " do not match ([B, T, V] and [B, T])";
  const std::vector<int64_t> predicted =
      argmax(logits.reshape({-1, logits.size(2)})).to(Device::cpu()).to_vector<int64_t>();
  const std::vector<int32_t> target = targets.to(Device::cpu()).to_vector<int32_t>();
  PredictionCount c;
  for (size_t i = 0; i < target.size(); ++i) {
    if (target[i] == data::kIgnoreIndex) continue;
    ++c.queries;
    c.correct += predicted[i] == target[i];
  }
  return c;
}


}  // namespace nha
