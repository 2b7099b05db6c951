// CPU cross-entropy per row: losses forward, logits gradient backward (softmax never stored).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/vec_math.h"

namespace nha {

namespace {

// Every target is ignore_index or in [0, V). Checked before the OpenMP loops: an exception must
// not leave a parallel region.
void check_targets(const Tensor& targets, int64_t N, int64_t V, int64_t ignore_index) {
  check_ids(targets, "cross_entropy");
  NHA_CHECK(targets.numel() == N) << "cross_entropy: " << targets.str() << " targets for " << N
                                  << " rows of logits";
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = id_at(targets, n);
    NHA_CHECK(t == ignore_index || (t >= 0 && t < V))
        << "cross_entropy: target " << t << " at row " << n << " is outside [0, " << V
        << ") and is not ignore_index (" << ignore_index
        << "). HINT: the vocab size of the data and of the model must agree";
  }
}

}  // namespace

// losses[n] = logsumexp_c(logits[n,c]) - logits[n, targets[n]], or 0 where targets[n] == ignore
//   logits [N, V]; targets [N] (i32/i64); losses [N]
void CpuBackend::cross_entropy_forward(Tensor& losses, const Tensor& logits, const Tensor& targets,
                                       int64_t ignore_index) {
  NHA_PROFILE_SCOPE("cross_entropy_forward");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_targets(targets, N, V, ignore_index);
  dispatch_floating(logits, "cross_entropy_forward", [&]<typename T>() {
    const T* x = logits.data<T>();  // [N, V]
    T* l = losses.data<T>();        // [N]
#pragma omp parallel if (N * V > 16384)
    {
      static thread_local std::vector<T> e;  // one row's exps [V], kept across calls
      e.resize(size_t(V));
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t t = id_at(targets, n);
        if (t == ignore_index) {
          l[n] = T(0);
          continue;
        }
        // log sum_c exp(x_c) - x_t = m + log sum_c exp(x_c - m) - x_t
        const auto [m, sum] = exp_minus_max(e.data(), x + n * V, V);
        l[n] = T(double(m) + std::log(sum) - double(x[n * V + t]));
      }
    }
  });
}

// dlogits[n,c] = dlosses[n] * (exp(logits[n,c] - logsumexp_c'(logits[n,c'])) - [c == targets[n]]),
// and 0 on rows where targets[n] == ignore
//   logits, dlogits [N, V]; targets, dlosses [N]
void CpuBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& logits,
                                        const Tensor& targets, const Tensor& dlosses,
                                        int64_t ignore_index) {
  NHA_PROFILE_SCOPE("cross_entropy_backward");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_targets(targets, N, V, ignore_index);
  dispatch_floating(logits, "cross_entropy_backward", [&]<typename T>() {
    const T *x = logits.data<T>(), *dl = dlosses.data<T>();  // [N, V], [N]
    T* dx = dlogits.data<T>();                               // [N, V]
#pragma omp parallel for schedule(static) if (N * V > 16384)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t t = id_at(targets, n);
      T* row = dx + n * V;
      if (t == ignore_index) {
        std::fill(row, row + V, T(0));
        continue;
      }
      // One exp per logit (logsumexp then softmax took two): row first holds exp(x - max), then
      // the gradient, from the row's sum of those exps. (row may alias the logits.)
      const double sum = exp_minus_max(row, x + n * V, V).second, g = dl[n];
      const double p_t = double(row[t]) / sum;  // the target's term in double: p_t - 1 may cancel
      const T scale = T(g / sum);
#pragma omp simd
      for (int64_t c = 0; c < V; ++c) row[c] *= scale;
      row[t] = T(g * (p_t - 1));
    }
  });
}

}  // namespace nha
