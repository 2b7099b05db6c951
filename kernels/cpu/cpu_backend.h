// The CPU backend: the reference implementation of every op, in float32 and float64, threaded with
// OpenMP, GEMMs through OpenBLAS. One .cpp per op family defines its methods.
#pragma once
#include "kernels/backend.h"

namespace nha {

class CpuBackend final : public Backend {
 public:
  CpuBackend();
  const char* name() const override { return "cpu"; }

  // Every kernel of kernels/kernels.inc: `void name(...) override;`.
#define NHA_KERNEL(name, params) void name params override;
#include "kernels/kernels.inc"
#undef NHA_KERNEL
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
