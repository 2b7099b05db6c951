// Element types and the bf16 storage type.
//
// f32 is the compute type of every CPU kernel and of GPU statistics; bf16 the GPU storage type of
// parameters and activations; i32/i64 hold token ids. f64 is CPU-only and exists so the reference
// kernels can be checked by float64 finite differences and against the float64 NHA golden files.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "core/error.h"

#if defined(__CUDACC__)
#define NHA_HOST_DEVICE __host__ __device__
#else
#define NHA_HOST_DEVICE
#endif

namespace nha {

enum class DType : uint8_t { F32, F64, BF16, I32, I64 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::I64: return "i64";
  }
  return "?";
}

inline bool is_floating(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16; }

inline DType dtype_from_name(const std::string& name) {
  if (name == "f32" || name == "fp32" || name == "float32") return DType::F32;
  if (name == "f64" || name == "fp64" || name == "float64") return DType::F64;
  if (name == "bf16" || name == "bfloat16") return DType::BF16;
  if (name == "i32" || name == "int32") return DType::I32;
  if (name == "i64" || name == "int64") return DType::I64;
  NHA_FAIL() << "unknown dtype '" << name << "'. HINT: use one of f32, f64, bf16, i32, i64";
}

// bfloat16: the upper 16 bits of an IEEE float. Conversion rounds to nearest even; NaN stays NaN.
struct bf16 {
  uint16_t bits = 0;

  bf16() = default;
  NHA_HOST_DEVICE explicit bf16(float f) : bits(round_from_float(f)) {}
  NHA_HOST_DEVICE explicit operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }

  NHA_HOST_DEVICE static uint16_t round_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
    return uint16_t((u + rounding_bias) >> 16);
  }
};

template <typename T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::F32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::F64; };
template <> struct dtype_of<bf16> { static constexpr DType value = DType::BF16; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::I32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::I64; };

}  // namespace nha
