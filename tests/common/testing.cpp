#include "common/testing.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "data/text_source.h"

namespace nha::testing {

double rel_rms(const Tensor& out, const Tensor& ref) {
  EXPECT_EQ(out.shape(), ref.shape()) << "rel_rms of " << out.str() << " vs " << ref.str();
  std::vector<double> o = out.to_vector<double>(), r = ref.to_vector<double>();
  if (o.size() != r.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (size_t i = 0; i < o.size(); ++i) {
    if (!std::isfinite(o[i])) return std::numeric_limits<double>::infinity();
    num += (o[i] - r[i]) * (o[i] - r[i]);
    den += r[i] * r[i];
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  std::vector<double> x = a.to_vector<double>(), y = b.to_vector<double>();
  double m = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
    if (!std::isfinite(x[i]) || !std::isfinite(y[i])) return std::numeric_limits<double>::infinity();
    m = std::max(m, std::abs(x[i] - y[i]));
  }
  return m;
}

Tensor randn(const Shape& shape, uint64_t seed, DType dtype, double std) {
  Generator gen(seed);
  return Tensor::randn(shape, gen, std, dtype);
}

::testing::AssertionResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                                     std::vector<Tensor> inputs, const GradcheckOptions& options) {
  for (const Tensor& t : inputs)
    if (t.requires_grad() && t.dtype() != DType::F64)
      return ::testing::AssertionFailure() << "gradcheck needs f64 inputs, got " << t.str();

  // Analytic: L = sum(f(x) * w).
  for (Tensor& t : inputs)
    if (t.requires_grad()) t.mutable_grad() = Tensor();
  Tensor out = f(inputs);
  Tensor w = randn(out.shape(), options.seed, DType::F64);
  Tensor loss = sum(mul(out, w));
  loss.backward();

  auto evaluate = [&]() {
    autograd::NoGradGuard no_grad;
    Tensor y = f(inputs).contiguous();
    std::vector<double> yv = y.to_vector<double>(), wv = w.to_vector<double>();
    double l = 0;
    for (size_t i = 0; i < yv.size(); ++i) l += yv[i] * wv[i];
    return l;
  };

  ::testing::AssertionResult result = ::testing::AssertionSuccess();
  bool ok = true;
  for (size_t k = 0; k < inputs.size(); ++k) {
    Tensor& x = inputs[k];
    if (!x.requires_grad()) continue;
    if (!x.grad().defined()) {
      ok = false;
      result = ::testing::AssertionFailure() << "input " << k << " got no gradient";
      continue;
    }
    Tensor numeric = Tensor::zeros(x.shape(), DType::F64);
    double* p = x.data<double>();
    double* num = numeric.data<double>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double saved = p[i];
      p[i] = saved + options.step;
      const double lp = evaluate();
      p[i] = saved - options.step;
      const double lm = evaluate();
      p[i] = saved;
      num[i] = (lp - lm) / (2 * options.step);
    }
    const double err = rel_rms(x.grad(), numeric);
    if (!(err <= options.tolerance)) {
      if (ok) result = ::testing::AssertionFailure();
      ok = false;
      result << "input " << k << " " << x.str() << ": rel_rms(analytic, numeric) = " << err
             << " > " << options.tolerance << "; ";
    }
  }
  return result;
}

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no error was thrown; expected one mentioning '" << parts.at(0) << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg;
  }
}

std::string test_data(const std::string& relative) {
  return (std::filesystem::path(NHA_SOURCE_DIR) / "tests" / "data" / relative).string();
}

std::string read_zst_text(const std::string& path) {
  data::LineReader reader(path);
  std::string text, line;
  while (reader.next(line)) text += line + "\n";
  reader.close();
  return text;
}

std::string temp_dir(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path p = fs::temp_directory_path() / ("nha_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace nha::testing
