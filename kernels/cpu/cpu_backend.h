// The CPU backend: the reference implementation of every op, in float32 and float64, threaded with
// OpenMP, GEMMs through OpenBLAS. One .cpp per op family defines its methods.
#pragma once
#include "kernels/backend.h"

namespace nha {

class CpuBackend final : public Backend {
 public:
  CpuBackend();
  const char* name() const override { return "cpu"; }

  void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                  size_t nbytes) override;
  void copy_strided(Tensor& out, const Tensor& in) override;
  void fill(Tensor& out, double value) override;
  void cast(Tensor& out, const Tensor& in) override;
  void fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double std) override;
  void fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double lo, double hi) override;

  void add(Tensor& out, const Tensor& a, const Tensor& b, double alpha, double beta) override;
  void mul(Tensor& out, const Tensor& a, const Tensor& b) override;
  void scale(Tensor& out, const Tensor& a, double s) override;
  void sum_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n, int64_t inner) override;
  void broadcast_dim(Tensor& out, const Tensor& in, int64_t outer, int64_t n,
                     int64_t inner) override;
  void sum_squares(Tensor& out, const Tensor& x) override;

  void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
            double beta) override;

  void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) override;
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override;
  void rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                       double eps) override;
  void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x,
                        const Tensor& w, const Tensor& rstd) override;
  void add_rmsnorm_forward(Tensor& h, Tensor& out, Tensor& rstd, const Tensor& x,
                           const Tensor& delta, const Tensor& w, double eps) override;
  void add_rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& dh,
                            const Tensor& h, const Tensor& w, const Tensor& rstd) override;
  void rope(Tensor& out, const Tensor& x, double base, int64_t start_pos, bool inverse) override;
  void silu_forward(Tensor& out, const Tensor& x) override;
  void silu_backward(Tensor& dx, const Tensor& dout, const Tensor& x) override;
  void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up) override;
  void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate,
                       const Tensor& up) override;
  void softmax_forward(Tensor& out, const Tensor& x) override;
  void softmax_backward(Tensor& dx, const Tensor& dout, const Tensor& out) override;
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, double scale, int64_t window) override;
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          double scale, int64_t window) override;
  void nha_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& qr,
                   const Tensor& kr, const Tensor& v, const Tensor& s, const Tensor& g,
                   double scale, int64_t window) override;
  void nha_backward(Tensor& dq, Tensor& dk, Tensor& dqr, Tensor& dkr, Tensor& dv, Tensor& ds,
                    Tensor& dg, const Tensor& dout, const Tensor& q, const Tensor& k,
                    const Tensor& qr, const Tensor& kr, const Tensor& v, const Tensor& s,
                    const Tensor& g, const Tensor& out, const Tensor& lse, double scale,
                    int64_t window) override;
  void nha_gate_forward(Tensor& g, Tensor& s, const Tensor& f) override;
  void nha_gate_backward(Tensor& df, const Tensor& dg, const Tensor& ds, const Tensor& f) override;
  void argmax(Tensor& out, const Tensor& x) override;
  void cross_entropy_forward(Tensor& losses, const Tensor& logits, const Tensor& targets,
                             int64_t ignore_index) override;
  void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                              const Tensor& dlosses, int64_t ignore_index) override;
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr,
                  double beta1, double beta2, double eps, double weight_decay,
                  int64_t step) override;
  void adamw_step_flat(Tensor& params, const Tensor& grads, Tensor& m, Tensor& v, Tensor& copy,
                       const Tensor& segments, double lr, double beta1, double beta2, double eps,
                       double weight_decay, int64_t step) override;
};

// Calls fn.template operator()<T>() with T = float or double after the dtype of `t`.
// CPU kernels are written once as templates and instantiated through this.
template <typename F>
void dispatch_floating(const Tensor& t, const char* op, F&& fn) {
  switch (t.dtype()) {
    case DType::F32: fn.template operator()<float>(); return;
    case DType::F64: fn.template operator()<double>(); return;
    default:
      NHA_FAIL() << op << " on the cpu needs f32 or f64 tensors, got " << t.str()
                 << ". HINT: convert with .to(DType::F32)";
  }
}

// Reads token ids of either integer dtype as int64.
inline int64_t id_at(const Tensor& ids, int64_t i) {
  return ids.dtype() == DType::I32 ? int64_t(static_cast<const int32_t*>(ids.data_ptr())[i])
                                   : static_cast<const int64_t*>(ids.data_ptr())[i];
}
inline void check_ids(const Tensor& ids, const char* op) {
  NHA_CHECK(ids.dtype() == DType::I32 || ids.dtype() == DType::I64)
      << op << ": ids/targets must be i32 or i64, got " << ids.str();
}

}  // namespace nha
