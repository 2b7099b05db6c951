#include "train/autocast.h"

namespace nha {

namespace {
thread_local bool g_enabled = false;
thread_local DType g_dtype = DType::F32;
}  // namespace

AutocastGuard::AutocastGuard(DType dtype) : prev_enabled_(g_enabled), prev_dtype_(g_dtype) {
  NHA_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F64)
      << "autocast: compute dtype must be f32, bf16 (or f64 in CPU tests), got " << dtype_name(dtype);
  g_enabled = dtype != DType::F32;
  g_dtype = dtype;
}

AutocastGuard::~AutocastGuard() {
  g_enabled = prev_enabled_;
  g_dtype = prev_dtype_;
}

bool autocast_enabled() { return g_enabled; }
DType autocast_dtype() { return g_enabled ? g_dtype : DType::F32; }

Tensor autocast(const Tensor& t) {
  if (!g_enabled || !t.defined()) return t;
  const DType d = t.dtype();
  if (d == g_dtype || !(d == DType::F32 || d == DType::BF16)) return t;
  return t.to(g_dtype);
}

}  // namespace nha
