// matmul and linear: forward and backward through Backend::gemm.
#include "autograd/autocast.h"
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::record;

namespace {

// Batched: c[b] = a[b] @ b[b];  da[b] = dc[b] @ b[b]^T;  db[b] = a[b]^T @ dc[b]
struct BmmBackward final : Node {
  SavedTensor a, b;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor dc = g[0].contiguous(), av = a.unpack(), bv = b.unpack();
    Tensor da, db;
    if (needs_grad(0)) {
      da = Tensor::empty(av.shape(), av.dtype(), av.device());
      backend_for(dc).gemm(da, dc, bv, false, true, 1.0, 0.0);
    }
    if (needs_grad(1)) {
      db = Tensor::empty(bv.shape(), bv.dtype(), bv.device());
      backend_for(dc).gemm(db, av, dc, true, false, 1.0, 0.0);
    }
    return {da, db};
  }
  std::string name() const override { return "BmmBackward"; }
  void release_saved() override { a.reset(); b.reset(); }
};

// y [R, N] = x [R, K] @ op(w);  w is [K, N] (matmul) or [N, K] (linear, transposed).
//   dx = dy @ op(w)^T;  dw = x^T @ dy (matmul)  or  dy^T @ x (linear)
struct MatmulBackward final : Node {
  SavedTensor x, w;
  bool w_transposed;  // linear: y = x w^T
  Shape x_shape;
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    Tensor xv = x.unpack(), wv = w.unpack();
    const int64_t rows = xv.size(0);
    Tensor dy = g[0].contiguous().detach().reshape({rows, -1});
    Tensor dx, dw;
    Backend& be = backend_for(dy);
    if (needs_grad(0)) {
      dx = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
      be.gemm(dx, dy, wv, false, !w_transposed, 1.0, 0.0);
      dx = dx.reshape(x_shape);
    }
    if (needs_grad(1)) {
      dw = Tensor::empty(wv.shape(), wv.dtype(), wv.device());
      if (w_transposed)
        be.gemm(dw, dy, xv, true, false, 1.0, 0.0);
      else
        be.gemm(dw, xv, dy, true, false, 1.0, 0.0);
    }
    return {dx, dw};
  }
  std::string name() const override { return w_transposed ? "LinearBackward" : "MatmulBackward"; }
  void release_saved() override { x.reset(); w.reset(); }
};

Tensor matmul_2d_weight(const Tensor& x, const Tensor& w, bool w_transposed) {
  ops_detail::check_same_device({x, w}, w_transposed ? "linear" : "matmul");
  NHA_CHECK(x.dim() >= 1 && w.dim() == 2) << (w_transposed ? "linear" : "matmul")
                                          << ": bad operands " << x.str() << ", " << w.str();
  const int64_t K = x.size(-1);
  const int64_t w_in = w_transposed ? w.size(1) : w.size(0);
  const int64_t N = w_transposed ? w.size(0) : w.size(1);
  NHA_CHECK(K == w_in) << (w_transposed ? "linear" : "matmul") << ": input features " << K
                       << " do not match the weight " << w.str();
  Tensor x2 = x.contiguous().detach().reshape({-1, K});
  Tensor wc = w.contiguous();
  Tensor y2 = Tensor::empty({x2.size(0), N}, x.dtype(), x.device());
  backend_for(x2).gemm(y2, x2, wc, false, w_transposed, 1.0, 0.0);
  Shape out_shape = x.shape();
  out_shape.back() = N;
  Tensor y = y2.reshape(out_shape);
  if (autograd::any_requires_grad({x, w})) {
    auto node = std::make_shared<MatmulBackward>();
    node->x = SavedTensor(x2, "matmul.x");
    node->w = SavedTensor(wc, "matmul.w");
    node->w_transposed = w_transposed;
    node->x_shape = x.shape();
    record(node, {x, w}, y);
  }
  return y;
}

}  // namespace

Tensor matmul(const Tensor& a_in, const Tensor& b_in) {
  // Mixed precision (autograd/autocast.h): both operands in the autocast dtype, differentiably.
  const Tensor a = autocast(a_in), b = autocast(b_in);
  if (b.dim() == 2) return matmul_2d_weight(a, b, false);
  NHA_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1))
      << "matmul: expected [B,M,K] @ [B,K,N] or [...,K] @ [K,N], got " << a.str() << " @ "
      << b.str();
  ops_detail::check_same_device({a, b}, "matmul");
  Tensor ac = a.contiguous(), bc = b.contiguous();
  Tensor c = Tensor::empty({a.size(0), a.size(1), b.size(2)}, a.dtype(), a.device());
  backend_for(ac).gemm(c, ac, bc, false, false, 1.0, 0.0);
  if (autograd::any_requires_grad({a, b})) {
    auto node = std::make_shared<BmmBackward>();
    node->a = SavedTensor(ac, "bmm.a");
    node->b = SavedTensor(bc, "bmm.b");
    record(node, {a, b}, c);
  }
  return c;
}

Tensor linear(const Tensor& x, const Tensor& weight) {
  // Mixed precision (autograd/autocast.h): the fp32 master weight is cast per call; its gradient
  // comes back through the cast as fp32.
  return matmul_2d_weight(autocast(x), autocast(weight), true);
}

}  // namespace nha
