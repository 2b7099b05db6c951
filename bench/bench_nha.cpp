// NHA core benchmark: our Native Hybrid Attention core (kernels/cuda/nha.cu) forward and
// forward+backward time vs sequence length, next to our flash attention (full causal) at the same
// shape, so the linear-in-T memory branch can be compared with quadratic attention. The PyTorch
// SDPA peer at the same shapes is bench/nha_peer.py, run in the same GPU session
// (scripts/gpu-check.sh merges both into nha.json).
//
// Shapes: bf16, B*T = 65536 tokens, H = 8 heads of D = 128 (d = 1024), M = 64 slots, window 64
// (and window 0 = pure memory, the memory branch alone), T = 1k .. 64k.
// Timing: CUDA events around each call on the backend's stream, 3 warm-up calls, the median of
// `--iters` (default 10) timed calls. Inputs are random (gates from random gate logits).
// Writes JSON to argv[1] (default $OUT/bench_nha.json or ./bench_nha.json).
//
// Usage: bench_nha [out.json] [--iters N] [--max-t T]
#include <algorithm>
#include <cmath>
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
  std::printf("bench_nha: built without CUDA, nothing to measure\n");
  return 0;
#else
  using namespace nha;
  std::string path;
  int iters = 10;
  int64_t max_t = 65536;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc)
      iters = std::max(1, std::atoi(argv[++i]));
    else if (a == "--max-t" && i + 1 < argc)
      max_t = std::atoll(argv[++i]);
    else
      path = a;
  }
  if (path.empty()) {
    const char* out = std::getenv("OUT");
    path = std::string(out ? out : ".") + "/bench_nha.json";
  }
  if (cuda_device_count() == 0) {
    std::printf("bench_nha: no CUDA device\n");
    return 1;
  }
  const Device dev = Device::cuda(0);
  Backend& be = backend_for(dev);
  cudaStream_t stream = cuda::current_stream(0);
  const cudaDeviceProp& prop = cuda::device_properties(0);
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));

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

  const int64_t H = 8, D = 128, M = 64, W = 64, tokens = 65536;
  std::string json = "{\n  \"bench\": \"nha\",\n  \"gpu\": \"" + std::string(prop.name) +
                     "\",\n  \"commit\": \"" +
                     std::string(std::getenv("NHA_COMMIT") ? std::getenv("NHA_COMMIT") : "unknown") +
                     "\",\n  \"config\": {\"dtype\": \"bf16\", \"H\": 8, \"D\": 128, \"M\": 64, "
                     "\"window\": 64, \"tokens\": 65536, \"iters\": " + std::to_string(iters) +
                     ", \"warmup\": 3, \"stat\": \"median\", \"flash\": \"ours, full causal\"},\n"
                     "  \"results\": [\n";
  std::printf("%6s %4s | %9s %9s | %9s %9s | %9s %9s   (ms)\n", "T", "B", "nha fwd", "nha f+b",
              "mem fwd", "mem f+b", "flash fwd", "flash f+b");
  Generator gen(7);
  bool first = true;
  for (int64_t T = 1024; T <= max_t; T *= 2) {
    const int64_t B = std::max<int64_t>(1, tokens / T);
    const Shape shape{B, T, H, D}, gshape{B, T, H, M};
    auto rnd = [&](const Shape& s) { return Tensor::randn(s, gen, 1.0, DType::BF16, dev); };
    Tensor q = rnd(shape), k = rnd(shape), qr = rnd(shape), kr = rnd(shape), v = rnd(shape);
    Tensor dout = rnd(shape);
    Tensor f = Tensor::randn(gshape, gen, 2.0, DType::BF16, dev);
    Tensor g = Tensor::empty(gshape, DType::BF16, dev), s = Tensor::empty(gshape, DType::BF16, dev);
    be.nha_gate_forward(g, s, f);
    Tensor out = Tensor::empty(shape, DType::BF16, dev), lse = Tensor::empty({B, H, T}, DType::F32, dev);
    Tensor dq = Tensor::empty(shape, DType::BF16, dev), dk = Tensor::empty(shape, DType::BF16, dev);
    Tensor dqr = Tensor::empty(shape, DType::BF16, dev), dkr = Tensor::empty(shape, DType::BF16, dev);
    Tensor dv = Tensor::empty(shape, DType::BF16, dev);
    Tensor ds = Tensor::empty(gshape, DType::BF16, dev), dg = Tensor::empty(gshape, DType::BF16, dev);
    const double scale = 1.0 / std::sqrt(double(D));
    auto nha_f = [&](int64_t w) { be.nha_forward(out, lse, q, k, qr, kr, v, s, g, scale, w); };
    auto nha_b = [&](int64_t w) {
      be.nha_backward(dq, dk, dqr, dkr, dv, ds, dg, dout, q, k, qr, kr, v, s, g, out, lse, scale, w);
    };
    const double t_nf = time_ms([&] { nha_f(W); });
    const double t_nfb = time_ms([&] { nha_f(W); nha_b(W); });
    const double t_mf = time_ms([&] { nha_f(0); });
    const double t_mfb = time_ms([&] { nha_f(0); nha_b(0); });
    auto att_f = [&] { be.attention_forward(out, lse, q, k, v, scale, 0); };
    auto att_b = [&] { be.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, scale, 0); };
    const double t_af = time_ms(att_f);
    const double t_afb = time_ms([&] { att_f(); att_b(); });
    be.synchronize();
    std::printf("%6lld %4lld | %9.3f %9.3f | %9.3f %9.3f | %9.3f %9.3f\n", (long long)T,
                (long long)B, t_nf, t_nfb, t_mf, t_mfb, t_af, t_afb);
    std::fflush(stdout);
    char line[512];
    std::snprintf(line, sizeof(line),
                  "    {\"T\": %lld, \"B\": %lld, \"nha_fwd_ms\": %.3f, \"nha_fwdbwd_ms\": %.3f, "
                  "\"mem_fwd_ms\": %.3f, \"mem_fwdbwd_ms\": %.3f, \"flash_fwd_ms\": %.3f, "
                  "\"flash_fwdbwd_ms\": %.3f}",
                  (long long)T, (long long)B, t_nf, t_nfb, t_mf, t_mfb, t_af, t_afb);
    json += (first ? "" : ",\n") + std::string(line);
    first = false;
    std::ofstream(path) << json << "\n  ]\n}\n";  // after every T: a timeout keeps what was measured
  }
  std::printf("bench_nha: wrote %s\n", path.c_str());
  return 0;
#endif
}
