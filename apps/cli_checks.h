// Range checks for numeric command-line options. CLI11's own PositiveNumber / NonNegativeNumber
// print their range as "0.000000 to 1797...(309 digits)"; these name it in integers.
#pragma once
#include <CLI/CLI.hpp>

#include <cstdint>
#include <limits>

namespace nha::apps {

inline const CLI::Range kPositive{int64_t(1), std::numeric_limits<int64_t>::max(), "POSITIVE"};
inline const CLI::Range kNonNegative{int64_t(0), std::numeric_limits<int64_t>::max(), "NONNEGATIVE"};

}  // namespace nha::apps
