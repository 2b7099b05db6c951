// CPU embedding lookup: forward (row gather) and backward (deterministic row scatter-add).
#include <algorithm>

#include "core/profile.h"
#include "kernels/cpu/cpu_backend.h"

namespace nha {

namespace {

// Every id in [0, V). Checked before the OpenMP loops: an exception must not leave a parallel
// region.
void check_ids_in_vocab(const Tensor& ids, int64_t V) {
  check_ids(ids, "embedding");
  for (int64_t n = 0; n < ids.numel(); ++n) {
    const int64_t id = id_at(ids, n);
    NHA_CHECK(id >= 0 && id < V) << "embedding: id " << id << " at position " << n
                                 << " is outside the vocabulary [0, " << V
                                 << "). HINT: check the tokenizer's vocab size against model.vocab";
  }
}

// Columns of dtable one thread owns in the backward.
constexpr int64_t kDtableColumnBlock = 64;

}  // namespace

// out[n, c] = table[ids[n], c]
//   table [V, C]; ids [N] (any shape with N elements, i32/i64); out [N, C]
void CpuBackend::embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) {
  NHA_PROFILE_SCOPE("embedding_forward");
  const int64_t V = table.size(0), C = table.size(1), N = ids.numel();
  NHA_CHECK(out.numel() == N * C) << "embedding: out " << out.str() << " does not hold "
                                  << N << " rows of " << C;
  check_ids_in_vocab(ids, V);
  dispatch_floating(table, "embedding_forward", [&]<typename T>() {
    const T* tab = table.data<T>();  // [V, C]
    T* y = out.data<T>();            // [N, C]
#pragma omp parallel for schedule(static) if (N * C > 65536)
    for (int64_t n = 0; n < N; ++n) {
      const T* src = tab + id_at(ids, n) * C;
      for (int64_t c = 0; c < C; ++c) y[n * C + c] = src[c];
    }
  });
}

// dtable[v, c] = sum_{n : ids[n] == v} dout[n, c]   (rows of unused ids are 0)
//   dout [N, C]; ids [N]; dtable [V, C]
// Threads own blocks of columns: each zeroes its block, then walks the tokens in order
// n = 0..N-1, so every sum is taken in the same order whatever the thread count (deterministic,
// no atomics).
void CpuBackend::embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  NHA_PROFILE_SCOPE("embedding_backward");
  const int64_t V = dtable.size(0), C = dtable.size(1), N = ids.numel();
  NHA_CHECK(dout.numel() == N * C) << "embedding backward: dout " << dout.str() << " does not hold "
                                   << N << " rows of " << C;
  check_ids_in_vocab(ids, V);
  dispatch_floating(dtable, "embedding_backward", [&]<typename T>() {
    const T* g = dout.data<T>();  // [N, C]
    T* dt = dtable.data<T>();     // [V, C]
    const int64_t blocks = (C + kDtableColumnBlock - 1) / kDtableColumnBlock;
#pragma omp parallel for schedule(static) if ((N + V) * C > 65536)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kDtableColumnBlock, c1 = std::min(C, c0 + kDtableColumnBlock);
      for (int64_t v = 0; v < V; ++v) std::fill(dt + v * C + c0, dt + v * C + c1, T(0));
      for (int64_t n = 0; n < N; ++n) {
        T* row = dt + id_at(ids, n) * C;
        for (int64_t c = c0; c < c1; ++c) row[c] += g[n * C + c];
      }
    }
  });
}

}  // namespace nha
