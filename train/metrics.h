// Training metrics: FLOPs per token (for MFU), memory, human-readable numbers, the JSONL log.
//
// FLOPs per token (fwd + bwd), the llm.c / PaLM convention extended to windowed and memory layers:
//   6 * N_matmul + 12 * d * sum over layers of span_l
// N_matmul = parameters that enter matrix products (all but the input embedding table, which is a
// lookup; it counts when tied to the LM head). span_l = keys a query attends to on average over the
// T positions of a sequence: (T+1)/2 for full causal attention (so 12*d*span = 6*T*d, the usual
// "6LTd"), ~w for a sliding window w, and for NHA/GSA the window span plus the m memory slots.
// MFU = FLOPs per token * tokens/s / peak; the peak is the H100/H200 dense bf16 figure 989e12.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "core/device.h"
#include "core/tensor.h"
#include "layers/model_config.h"

namespace nha {

inline constexpr double kGpuPeakFlops = 989e12;  // H100/H200 SXM dense bf16

// Average keys per query of one layer's mixer over a sequence of T tokens (see above).
double mixer_span(const MixerConfig& mixer, int64_t seq_len);
double flops_per_token(const ModelConfig& model, int64_t seq_len, int64_t matmul_params);

// Memory on `device`: on a GPU the CUDA caching allocator's bytes handed to tensors now and their
// high-water mark since the last reset_memory_peak() (activations of the forward/backward
// included; comparable with torch.cuda.max_memory_allocated); on the CPU the process's resident
// set (VmRSS) and its lifetime peak (VmHWM).
struct MemoryUsage {
  int64_t bytes = 0;
  int64_t peak = 0;
  const char* source = "rss";  // "cuda" or "rss"
};
MemoryUsage memory_usage(Device device);
void reset_memory_peak(Device device);  // CUDA: start a new high-water mark; CPU: nothing

// "1.23M", "45.6k", "512" ; "1h02m", "3m05s", "12s" ; "1.5 GiB", "300 MiB"
std::string format_count(double n);
std::string format_duration(double seconds);
std::string format_bytes(double bytes);

// Query positions of targets [B, T] (entries != data::kIgnoreIndex) and how many of them the
// argmax of logits [B, T, V] predicts (MQAR accuracy, in validation and in `nha eval`). Logits stay
// on their device; only the argmax comes back.
struct PredictionCount {
  int64_t queries = 0, correct = 0;
};
PredictionCount count_correct_predictions(const Tensor& logits, const Tensor& targets);

// Appends one JSON object per line to RUN_DIR/metrics.jsonl: each record is one write(2) to the
// file opened for appending, checked; a record the disk took only in part is cut off again and
// the error names the file, so the log never holds a half record (a full disk used to cut it
// silently).
class MetricsLog {
 public:
  MetricsLog() = default;
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  // Opens `path` for appending; with `truncate_after_step` >= 0 first drops the records whose
  // "step" is larger (a resumed run replaces what the interrupted run logged after its checkpoint).
  void open(const std::string& path, int64_t truncate_after_step = -1);
  void write(const nlohmann::json& record);
  bool is_open() const { return fd_ >= 0; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace nha
