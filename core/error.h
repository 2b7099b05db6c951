// Errors that name what went wrong and where.
//
//   NHA_CHECK(d % heads == 0) << "model.d (" << d << ") must be divisible by model.heads ("
//                             << heads << "). HINT: pick heads from the divisors of d";
//
// throws nha::Error("core/foo.cpp:42: check failed: d % heads == 0: model.d (...) ...").
// User-facing messages end with a HINT on how to fix the input (llm.c habit).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace nha {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// Collects the message of a failed check; ErrorThrower turns it into an exception.
class ErrorBuilder {
 public:
  ErrorBuilder(const char* file, int line, const char* condition) {
    stream_ << file << ":" << line << ": ";
    if (condition) stream_ << "check failed: " << condition << ": ";
  }
  template <typename T>
  ErrorBuilder& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }
  std::string str() const { return stream_.str(); }

 private:
  std::ostringstream stream_;
};

// `thrower & builder << a << b`: operator& binds after every <<, so the message is complete.
struct ErrorThrower {
  [[noreturn]] void operator&(const ErrorBuilder& builder) const { throw Error(builder.str()); }
};

}  // namespace detail
}  // namespace nha

#define NHA_CHECK(cond) \
  if (cond) {           \
  } else                \
    ::nha::detail::ErrorThrower{} & ::nha::detail::ErrorBuilder(__FILE__, __LINE__, #cond)

// Unconditional error with the same formatting: NHA_FAIL() << "unknown dtype " << name;
#define NHA_FAIL() ::nha::detail::ErrorThrower{} & ::nha::detail::ErrorBuilder(__FILE__, __LINE__, nullptr)
