// exp over arrays for the CPU kernels' inner loops. std::exp is a library call that no loop around
// it can vectorize (glibc's vector variants need -ffast-math), and GCC does not vectorize an exp
// written out in C++ either: its clamps are float comparisons, which -ftrapping-math (the default)
// keeps as branches. So the float path is written with GCC vector extensions (4 floats: SSE2 on
// x86-64, NEON on arm64), Cephes' expf: within 2 ulp of the exact value (measured 1.4 ulp over
// [-87, 88]), 0 below e^-87 (denormal results are flushed, -inf gives 0), inf above e^88, NaN
// stays NaN. The double path is std::exp, so the f64 kernels (the tests' references) are unchanged.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

namespace nha {

namespace vec {
using f32x4 = float __attribute__((vector_size(16)));
using i32x4 = int32_t __attribute__((vector_size(16)));

inline f32x4 exp4(f32x4 x) {
  const f32x4 lo = x < -87.0f ? f32x4{} - 87.0f : x, xc = lo > 88.0f ? f32x4{} + 88.0f : lo;
  // x = n ln2 + r, |r| <= ln2 / 2; e^x = 2^n e^r, e^r a degree-7 polynomial.
  const f32x4 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const f32x4 r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 in two parts: n ln2 exact
  f32x4 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x4 bits = (__builtin_convertvector(n, i32x4) + 127) << 23;  // 2^n
  f32x4 out = p * std::bit_cast<f32x4>(bits);
  out = x < -87.0f ? f32x4{} : out;
  out = x > 88.0f ? f32x4{} + __builtin_inff() : out;
  return x != x ? x : out;
}
}  // namespace vec

// y[i] = exp(x[i] - shift), i < n (y may be x).
inline void exp_shifted(float* y, const float* x, float shift, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    vec::f32x4 v;
    std::memcpy(&v, x + i, sizeof v);
    v = vec::exp4(v - shift);
    std::memcpy(y + i, &v, sizeof v);
  }
  if (i < n) {  // the tail through a zero-padded vector
    vec::f32x4 v{};
    std::memcpy(&v, x + i, size_t(n - i) * sizeof(float));
    v = vec::exp4(v - shift);
    std::memcpy(y + i, &v, size_t(n - i) * sizeof(float));
  }
}
inline void exp_shifted(double* y, const double* x, double shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i] - shift);
}

// e [n] = exp(x - m), m = max(x) (n >= 1; e may be x): the stable softmax numerator. Returns m and
// sum(e), summed in double.
template <typename T>
std::pair<T, double> exp_minus_max(T* e, const T* x, int64_t n) {
  T m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  exp_shifted(e, x, m, n);
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += double(e[i]);
  return {m, sum};
}

}  // namespace nha
