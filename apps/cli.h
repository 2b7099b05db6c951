// Shared by the commands of `nha`: range checks for numeric options (CLI11's own PositiveNumber /
// NonNegativeNumber print their range as "0.000000 to 1797...(309 digits)"; these name it in
// integers) and the exit status a command may end with.
#pragma once
#include <CLI/CLI.hpp>

#include <cstdint>
#include <limits>

namespace nha::apps {

inline const CLI::Range kPositive{int64_t(1), std::numeric_limits<int64_t>::max(), "POSITIVE"};
inline const CLI::Range kNonNegative{int64_t(0), std::numeric_limits<int64_t>::max(), "NONNEGATIVE"};

// Thrown by a command's callback to end with an exit status other than 0 (success) or 1 (an
// error): `nha train` stopped by a signal exits 128 + the signal, as a shell reports it.
struct ExitStatus {
  int code;
};

}  // namespace nha::apps
