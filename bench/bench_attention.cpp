// Attention kernel benchmark: our flash attention forward and forward+backward TFLOP/s for the
// shapes of bench/peer/attn_sdpa.py (causal, bf16, B*T = 65536, H = 12, D = 64, T = 1k..32k),
// so the two can be compared side by side in one GPU run (scripts/gpu-check.sh does that).
//
// Timing: CUDA events around each call on the backend's stream, 3 warm-up calls, the median of
// `--iters` (default 20) timed calls. FLOPs as attn_sdpa.py: fwd = 4 B H T^2 D / 2 (causal half),
// fwd+bwd = 3.5 x fwd. Inputs are random (never zeros). Writes JSON to argv[1] (default
// $OUT/bench_attention.json or ./bench_attention.json).
//
// Usage: bench_attention [out.json] [--iters N] [--window W]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/random.h"
#include "core/tensor.h"
#include "kernels/backend.h"

#ifdef NHA_WITH_CUDA
#include "kernels/cuda/cuda_common.h"
#endif

int main(int argc, char** argv) {
#ifndef NHA_WITH_CUDA
  std::printf("bench_attention: built without CUDA, nothing to measure\n");
  return 0;
#else
  using namespace nha;
  std::string path;
  int iters = 20;
  int64_t window = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc)
      iters = std::atoi(argv[++i]);
    else if (a == "--window" && i + 1 < argc)
      window = std::atoll(argv[++i]);
    else
      path = a;
  }
  if (path.empty()) {
    const char* out = std::getenv("OUT");
    path = std::string(out ? out : ".") + "/bench_attention.json";
  }
  if (cuda_device_count() == 0) {
    std::printf("bench_attention: no CUDA device\n");
    return 1;
  }
  const Device dev = Device::cuda(0);
  Backend& be = backend_for(dev);
  cudaStream_t stream = cuda::current_stream(0);
  const cudaDeviceProp& prop = cuda::device_properties(0);
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));

  // Median over `iters` timed runs of fn, in milliseconds.
  auto time_ms = [&](auto&& fn) {
    for (int i = 0; i < 3; ++i) fn();
    std::vector<float> ms;
    for (int i = 0; i < iters; ++i) {
      CUDA_CHECK(cudaEventRecord(start, stream));
      fn();
      CUDA_CHECK(cudaEventRecord(stop, stream));
      CUDA_CHECK(cudaEventSynchronize(stop));
      float t = 0;
      CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return double(ms[ms.size() / 2]);
  };

  std::string json = "{\n  \"bench\": \"attention\",\n  \"gpu\": \"" + std::string(prop.name) +
                     "\",\n  \"commit\": \"" +
                     std::string(std::getenv("NHA_COMMIT") ? std::getenv("NHA_COMMIT") : "unknown") +
                     "\",\n  \"config\": {\"causal\": true, \"dtype\": \"bf16\", \"H\": 12, \"D\": 64, "
                     "\"tokens\": 65536, \"window\": " + std::to_string(window) +
                     ", \"iters\": " + std::to_string(iters) + ", \"stat\": \"median\"},\n  \"results\": [\n";
  Generator gen(1);
  bool first = true;
  for (int64_t T : {1024, 2048, 4096, 8192, 16384, 32768}) {
    const int64_t B = std::max<int64_t>(1, 65536 / T), H = 12, D = 64;
    const Shape shape{B, T, H, D};
    Tensor q = Tensor::randn(shape, gen, 1.0, DType::BF16, dev);
    Tensor k = Tensor::randn(shape, gen, 1.0, DType::BF16, dev);
    Tensor v = Tensor::randn(shape, gen, 1.0, DType::BF16, dev);
    Tensor dout = Tensor::randn(shape, gen, 1.0, DType::BF16, dev);
    Tensor out = Tensor::empty(shape, DType::BF16, dev), lse = Tensor::empty({B, H, T}, DType::F32, dev);
    Tensor dq = Tensor::empty(shape, DType::BF16, dev), dk = Tensor::empty(shape, DType::BF16, dev),
           dv = Tensor::empty(shape, DType::BF16, dev);
    const double scale = 0.125;
    auto fwd = [&] { be.attention_forward(out, lse, q, k, v, scale, window); };
    auto bwd = [&] { be.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, scale, window); };
    const double t_fwd = time_ms(fwd);
    const double t_bwd = time_ms(bwd);
    const double t_all = time_ms([&] {
      fwd();
      bwd();
    });
    be.synchronize();
    // Causal FLOPs (attn_sdpa.py's convention); with a window only the band is computed, so the
    // figure is reported for the causal count and the window noted in the config.
    const double fl = 4.0 * B * H * double(T) * T * D / 2;
    char line[512];
    std::snprintf(line, sizeof(line),
                  "    {\"T\": %lld, \"B\": %lld, \"fwd_ms\": %.3f, \"bwd_ms\": %.3f, "
                  "\"fwdbwd_ms\": %.3f, \"fwd_tflops\": %.1f, \"fwdbwd_tflops\": %.1f}",
                  (long long)T, (long long)B, t_fwd, t_bwd, t_all, fl / t_fwd / 1e9,
                  3.5 * fl / t_all / 1e9);
    std::printf("%s\n", line + 4);
    std::fflush(stdout);
    json += (first ? "" : ",\n") + std::string(line);
    first = false;
  }
  json += "\n  ]\n}\n";
  std::ofstream(path) << json;
  std::printf("bench_attention: wrote %s\n", path.c_str());
  return 0;
#endif
}
