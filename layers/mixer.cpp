#include "layers/mixer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "autograd/node.h"
#include "kernels/backend.h"

namespace nha {

std::vector<int64_t> MixerState::positions() const {
  std::vector<int64_t> p(start.size());
  for (size_t b = 0; b < start.size(); ++b) p[b] = pos - start[b];
  return p;
}

// ---- decode helpers -----------------------------------------------------------------------------

namespace decode {

DType state_dtype(const Tensor& weight) {
  return weight.dtype() == DType::F64 ? DType::F64 : DType::F32;
}

void check_step_input(const Tensor& x_t, const MixerState& st, int64_t d, const char* who) {
  NHA_CHECK(x_t.dim() == 3 && x_t.size(0) == st.batch && x_t.size(1) == 1 && x_t.size(2) == d)
      << who << " step: x_t must be [B, 1, d] = [" << st.batch << ", 1, " << d << "], got "
      << x_t.str() << ". HINT: feed one token per row and call; make the state for this batch";
}

int64_t begin_prefill(const std::vector<Tensor>& xs, MixerState& st, int64_t d, const char* who) {
  NHA_CHECK(st.pos == 0) << who << " prefill: the state has already taken " << st.pos
                         << " steps. HINT: prefill a fresh state (new_decode_state)";
  NHA_CHECK(int64_t(xs.size()) == st.batch)
      << who << " prefill: " << xs.size() << " prompts for a state of " << st.batch << " rows";
  int64_t L = 0;
  for (const Tensor& x : xs) {
    NHA_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) >= 1 && x.size(2) == d)
        << who << " prefill: every prompt must be [1, T, " << d << "] with T >= 1, got "
        << x.str();
    L = std::max(L, x.size(1));
  }
  for (size_t b = 0; b < xs.size(); ++b) st.start[b] = L - xs[b].size(1);
  st.pos = L;
  return L;
}

Tensor rope_rows(const Tensor& x, double base, const std::vector<int64_t>& positions) {
  const int64_t B = x.size(0);
  if (std::all_of(positions.begin(), positions.end(), [&](int64_t p) { return p == positions[0]; }))
    return rope(x, base, positions[0]);  // the common case (and the training forward's)
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());  // [B, T, H, D]
  for (int64_t b0 = 0, b1 = 0; b0 < B; b0 = b1) {
    b1 = b0 + 1;
    while (b1 < B && positions[size_t(b1)] == positions[size_t(b0)]) ++b1;
    out.slice(0, b0, b1).copy_(rope(x.slice(0, b0, b1), base, positions[size_t(b0)]));
  }
  return out;
}

void ring_write(Tensor& ring, int64_t first_step, const Tensor& values) {
  const int64_t cap = ring.size(0), n = values.size(1);
  NHA_CHECK(n <= cap) << "ring_write: " << n << " steps into a ring of " << cap;
  const Tensor steps = values.transpose(0, 1);  // [n, B, H, X]
  const int64_t slot = first_step % cap, first = std::min(n, cap - slot);
  ring.slice(0, slot, slot + first).copy_(steps.slice(0, 0, first));
  if (first < n) ring.slice(0, 0, n - first).copy_(steps.slice(0, first, n));  // wraps around
}

Tensor right_aligned_tail(const std::vector<Tensor>& rows, int64_t n) {
  int64_t L = 0;
  for (const Tensor& r : rows) L = std::max(L, r.size(1));
  Shape shape = rows.front().shape();
  shape[0] = int64_t(rows.size());
  shape[1] = n;
  Tensor out = Tensor::zeros(shape, rows.front().dtype(), rows.front().device());  // [B, n, H, X]
  for (size_t b = 0; b < rows.size(); ++b) {
    // Row b fills steps L - T .. L - 1; the tail (steps L - n .. L - 1) holds its last m tokens.
    const int64_t T = rows[b].size(1), m = std::min(T, n);
    out.slice(0, int64_t(b), int64_t(b) + 1).slice(1, n - m, n).copy_(rows[b].slice(1, T - m, T));
  }
  return out;
}

Tensor ring_heads(const Tensor& ring) {
  const int64_t cap = ring.size(0), B = ring.size(1), H = ring.size(2), X = ring.size(3);
  return ring.transpose(0, 1).transpose(1, 2).contiguous().reshape({B * H, cap, X});
}

Tensor ring_logits(const Tensor& q, const Tensor& k_ring, const MixerState& st, double scale) {
  const int64_t cap = k_ring.size(0), B = q.size(0), H = q.size(2), D = q.size(3);
  Backend& be = backend_for(q);
  Tensor z = Tensor::empty({B * H, 1, cap}, q.dtype(), q.device());
  be.gemm(z, q.contiguous().reshape({B * H, 1, D}), ring_heads(k_ring), false, true, scale, 0.0);
  // Slot j holds step s = the latest step <= t with s = j mod cap (s < 0: never written); it
  // belongs to row b when s >= start[b] (earlier steps are the row's left padding).
  const int64_t t = st.pos;
  std::vector<double> mask(size_t(B * cap));  // [B, cap]: 0 or -inf
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < cap; ++j) {
      const int64_t s = t - ((t - j) % cap + cap) % cap;
      mask[size_t(b * cap + j)] = s >= st.start[b] ? 0.0 : -std::numeric_limits<double>::infinity();
    }
  const Tensor row_mask = Tensor::from_vector<double>(mask, {B, cap}).to(q.dtype()).to(q.device());
  Tensor head_mask = Tensor::empty({B * H, 1, cap}, q.dtype(), q.device());
  be.broadcast_dim(head_mask, row_mask, B, H, cap);  // the row's mask for each of its heads
  be.add(z, z, head_mask, 1.0, 1.0);
  return z;
}

void ring_read(Tensor& out, const Tensor& p, const Tensor& v_ring, double beta) {
  backend_for(p).gemm(out, p, ring_heads(v_ring), false, false, 1.0, beta);
}

}  // namespace decode

}  // namespace nha
