// What the scoring and generation loops of eval/ share when they batch requests: the order they
// take requests in and the progress line they print.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

namespace nha::eval {

// Prints "label: done/total requests, tokens/s, ETA" at most every 5 s (and at the end).
class Progress {
 public:
  Progress(std::string label, int64_t total) : label_(std::move(label)), total_(total) {}
  void update(int64_t done, int64_t tokens) {
    tokens_ += tokens;
    const double t = std::chrono::duration<double>(Clock::now() - start_).count();
    if (label_.empty() || (done < total_ && t - last_ < 5.0)) return;
    last_ = t;
    const double eta = done > 0 ? t * double(total_ - done) / double(done) : 0.0;
    std::fprintf(stderr, "%s: %lld/%lld requests, %.0f tok/s, %.0f s elapsed, ETA %.0f s\n",
                 label_.c_str(), (long long)done, (long long)total_, double(tokens_) / t, t, eta);
    std::fflush(stderr);
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::string label_;
  int64_t total_, tokens_ = 0;
  Clock::time_point start_ = Clock::now();
  double last_ = 0;
};

// Request order for batching: longest first, so each batch's padding is small and the first
// batch (the largest) shows at once whether memory suffices.
inline std::vector<size_t> longest_first(const std::vector<size_t>& lengths) {
  std::vector<size_t> order(lengths.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
  return order;
}

}  // namespace nha::eval
