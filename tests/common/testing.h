// Shared test helpers: relative RMS error, random tensors, float64 finite-difference gradient checks.
#pragma once
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "autograd/node.h"
#include "autograd/ops.h"
#include "core/random.h"
#include "core/tensor.h"

namespace nha::testing {

// ||out - ref|| / ||ref|| over all elements (both converted to double on the host).
// Returns +inf if any element of `out` is NaN/inf, so a NaN never passes a threshold.
double rel_rms(const Tensor& out, const Tensor& ref);
double max_abs_diff(const Tensor& a, const Tensor& b);

// Fresh N(0, std^2) f64/f32 tensor on the CPU from a per-test seed.
Tensor randn(const Shape& shape, uint64_t seed, DType dtype = DType::F64, double std = 1.0);

// Central finite differences in float64 of L = sum(f(inputs) * w) for a fixed random weight w,
// against the autograd gradients of every input that requires grad. Inputs must be f64.
// Reports each input whose gradient's rel_rms error exceeds `tolerance`.
struct GradcheckOptions {
  double step = 1e-6;
  double tolerance = 1e-6;
  uint64_t seed = 1234;
};
::testing::AssertionResult gradcheck(
    const std::function<Tensor(const std::vector<Tensor>&)>& f, std::vector<Tensor> inputs,
    const GradcheckOptions& options = {});

// Expects fn to throw an nha::Error whose message contains every string of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts);

// Path of a file vendored under tests/data/ (committed with the tests; tests/data/README.md).
std::string test_data(const std::string& relative);
// The text of a .zst file, decompressed the way `nha` reads compressed text (data::LineReader).
std::string read_zst_text(const std::string& path);

// A fresh, empty directory under the system temp dir, unique per process (ctest runs tests as
// separate processes, possibly in parallel): nha_test_<name>_<pid>.
std::string temp_dir(const std::string& name);
// The whole file as bytes ("" when it cannot be read).
std::string read_file(const std::string& path);

}  // namespace nha::testing
