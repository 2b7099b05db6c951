// Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11).
//
// A number is a pure function of (seed, counter): element i of a tensor filled at generator offset
// o uses counter o + i, so the CPU and every GPU thread produce the same values with no shared state,
// and a generator's whole state is two integers (cheap to checkpoint).
#pragma once
#include <cmath>
#include <cstdint>

#include "core/dtype.h"

namespace nha {

struct Philox4x32 {
  uint32_t c[4];

  // Ten rounds of the Philox bijection over the 128-bit counter, keyed by the 64-bit seed.
  NHA_HOST_DEVICE static Philox4x32 compute(uint64_t seed, uint64_t counter) {
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    uint32_t x0 = uint32_t(counter), x1 = uint32_t(counter >> 32), x2 = 0, x3 = 0;
    for (int round = 0; round < 10; ++round) {
      uint64_t p0 = uint64_t(0xD2511F53u) * x0;
      uint64_t p1 = uint64_t(0xCD9E8D57u) * x2;
      uint32_t y0 = uint32_t(p1 >> 32) ^ x1 ^ k0;
      uint32_t y1 = uint32_t(p1);
      uint32_t y2 = uint32_t(p0 >> 32) ^ x3 ^ k1;
      uint32_t y3 = uint32_t(p0);
      x0 = y0; x1 = y1; x2 = y2; x3 = y3;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    return {{x0, x1, x2, x3}};
  }
};

// Uniform in (0, 1]: 24 random bits, never 0 so log() below is finite.
NHA_HOST_DEVICE inline float uniform_from_bits(uint32_t bits) {
  return float((bits >> 8) + 1u) * (1.0f / 16777216.0f);
}

// Element `index` of a U[lo, hi) stream at (seed, offset).
NHA_HOST_DEVICE inline double philox_uniform(uint64_t seed, uint64_t counter, double lo, double hi) {
  Philox4x32 r = Philox4x32::compute(seed, counter);
  return lo + (hi - lo) * (1.0 - double(uniform_from_bits(r.c[0])));
}

// Element of a standard normal stream by Box-Muller on two uniforms of the same counter.
NHA_HOST_DEVICE inline double philox_normal(uint64_t seed, uint64_t counter) {
  Philox4x32 r = Philox4x32::compute(seed, counter);
  double u1 = uniform_from_bits(r.c[0]);
  double u2 = uniform_from_bits(r.c[1]);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// Host-side generator state: a seed and the next unused counter.
class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : seed_(seed) {}
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void set_state(uint64_t seed, uint64_t offset) { seed_ = seed; offset_ = offset; }
  // Reserves `n` counters and returns the first.
  uint64_t advance(uint64_t n) { uint64_t start = offset_; offset_ += n; return start; }
  // Convenience draws for host code (sampling, data shuffles).
  double uniform() { return philox_uniform(seed_, advance(1), 0.0, 1.0); }
  double normal() { return philox_normal(seed_, advance(1)); }
  uint64_t next_u64() {
    Philox4x32 r = Philox4x32::compute(seed_, advance(1));
    return (uint64_t(r.c[0]) << 32) | r.c[1];
  }

 private:
  uint64_t seed_ = 0;
  uint64_t offset_ = 0;
};

// While a SkipInitGuard is alive (on this thread), Tensor::randn and Tensor::rand return
// uninitialised tensors and only advance the generator (later draws are unchanged): for models
// whose weights are overwritten right away (loaded from a checkpoint) or only counted. Drawing the
// normals of a 125M model costs seconds on a fast CPU core and minutes on a small VM. Like
// PyTorch's skip_init / HF's no_init_weights.
class SkipInitGuard {
 public:
  SkipInitGuard();
  ~SkipInitGuard();
  SkipInitGuard(const SkipInitGuard&) = delete;
  SkipInitGuard& operator=(const SkipInitGuard&) = delete;

 private:
  bool prev_;
};

}  // namespace nha
