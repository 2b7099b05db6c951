// Incremental generation on the GPU: prefill + decode_step through the CUDA backend give the CPU
// backend's logits for the same weights (every mixer kind in one model, rows of different lengths
// in one batch, so per-row RoPE positions, ring wrap-around and padding masks all run on the
// device), greedy generation picks the same tokens, and bf16 autocast decoding stays close.
#include <vector>

#include "autograd/autocast.h"
#include "eval/generate.h"
#include "gpu/cuda_testing.h"
#include "layers/transformer.h"

namespace nha {
namespace {

using cudatest::gpu;

// Full attention, a sliding window, NHA with a window shorter than the prompts, GSA, and NHA with
// a window longer than everything (a full-attention NHA layer). Head dim 32.
ModelConfig decode_config() {
  ModelConfig c;
  c.vocab_size = 97;
  c.d_model = 64;
  c.n_layers = 5;
  c.n_heads = 2;
  c.mlp_hidden = 96;
  c.init_std = 0.1;
  c.mixers = {MixerConfig{MixerType::Attention, 0, 0}, MixerConfig{MixerType::Attention, 5, 0},
              MixerConfig{MixerType::NHA, 7, 6}, MixerConfig{MixerType::GSA, 0, 5},
              MixerConfig{MixerType::NHA, 1 << 30, 4}};
  return c;
}

std::vector<int32_t> decode_ids(int64_t n, uint64_t seed) {
  Generator g(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int32_t& id : ids) id = int32_t(g.next_u64() % 97);
  return ids;
}

// Logits [B, V] of the prefill and of every decode step feeding `fed[b][i]` to row b.
std::vector<Tensor> decode_run(const LanguageModel& model,
                               const std::vector<std::vector<int32_t>>& prompts,
                               const std::vector<std::vector<int32_t>>& fed, int64_t max_len) {
  const int64_t B = int64_t(prompts.size());
  DecodeState st = model.new_decode_state(B, max_len);
  std::vector<Tensor> out = {model.prefill(prompts, st).to(Device::cpu()).to(DType::F64)};
  for (size_t i = 0; i < fed[0].size(); ++i) {
    std::vector<int32_t> next;
    for (const auto& f : fed) next.push_back(f[i]);
    out.push_back(model.decode_step(Tensor::from_vector<int32_t>(next, {B, 1}), st)
                      .to(Device::cpu())
                      .to(DType::F64));
  }
  return out;
}

TEST(CudaGenerate, DecodeMatchesCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  const ModelConfig c = decode_config();
  LanguageModel cpu_model(c, 8), gpu_model(c, 8);  // same seed: same weights
  gpu_model.to(gpu());
  const std::vector<std::vector<int32_t>> prompts = {decode_ids(23, 1), decode_ids(4, 2),
                                                     decode_ids(1, 3), decode_ids(17, 4)};
  std::vector<std::vector<int32_t>> fed;
  for (uint64_t b = 0; b < prompts.size(); ++b) fed.push_back(decode_ids(12, 10 + b));
  const auto cpu = decode_run(cpu_model, prompts, fed, 23 + 12);
  const auto dev = decode_run(gpu_model, prompts, fed, 23 + 12);
  double worst = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double e = testing::rel_rms(dev[i], cpu[i]);
    EXPECT_LT(e, 1e-5) << "step " << i;
    worst = std::max(worst, e);
  }
  std::printf("[cuda decode f32] worst rel RMS vs CPU over %zu steps: %.2e\n", cpu.size(), worst);

  // bf16 autocast (how evaluation runs on the GPU) against the CPU in f32.
  std::vector<Tensor> bf16;
  {
    AutocastGuard autocast(DType::BF16);
    bf16 = decode_run(gpu_model, prompts, fed, 23 + 12);
  }
  double worst_bf16 = 0;
  for (size_t i = 0; i < cpu.size(); ++i)
    worst_bf16 = std::max(worst_bf16, testing::rel_rms(bf16[i], cpu[i]));
  EXPECT_LT(worst_bf16, 3e-2);
  std::printf("[cuda decode bf16] worst rel RMS vs CPU f32: %.2e\n", worst_bf16);
}

TEST(CudaGenerate, GreedyAndSeededSamplingMatchCpu) {
  NHA_SKIP_WITHOUT_CUDA();
  const ModelConfig c = decode_config();
  LanguageModel cpu_model(c, 9), gpu_model(c, 9);
  gpu_model.to(gpu());
  const std::vector<std::vector<int32_t>> prompts = {decode_ids(9, 21), decode_ids(3, 22)};
  eval::SamplingOptions o;
  o.max_new_tokens = 24;
  const auto cpu_greedy = eval::generate(cpu_model, prompts, o).tokens;
  EXPECT_EQ(eval::generate(gpu_model, prompts, o).tokens, cpu_greedy);
  // Sampling draws the same Philox numbers on both; the logits agree to ~1e-6, so the samples
  // agree unless a draw falls within that of a CDF boundary (odds ~1e-5 over these 48 draws).
  o.temperature = 1.0;
  o.top_p = 0.9;
  o.seed = 77;
  EXPECT_EQ(eval::generate(gpu_model, prompts, o).tokens,
            eval::generate(cpu_model, prompts, o).tokens);
}

}  // namespace
}  // namespace nha
