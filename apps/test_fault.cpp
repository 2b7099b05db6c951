#include "apps/test_fault.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"

namespace nha::apps {

void inject_test_fault(int rank, int64_t step) {
  static const std::string spec = [] {
    const char* s = std::getenv("NHA_TEST_FAULT");
    return std::string(s ? s : "");
  }();
  if (spec.empty()) return;
  char kind[8] = {0};
  int fault_rank = -1;
  long long fault_step = -1;
  NHA_CHECK(std::sscanf(spec.c_str(), "%7[a-z]:%d:%lld", kind, &fault_rank, &fault_step) == 3 &&
            (std::strcmp(kind, "exit") == 0 || std::strcmp(kind, "hang") == 0))
      << "NHA_TEST_FAULT is '" << spec << "'. HINT: exit:RANK:STEP or hang:RANK:STEP";
  if (fault_rank != rank || fault_step != step) return;
  std::fprintf(stderr, "rank %d: NHA_TEST_FAULT: %s at step %lld\n", rank, kind, fault_step);
  std::fflush(stderr);
  if (std::strcmp(kind, "exit") == 0) std::_Exit(7);
  for (;;) pause();
}

}  // namespace nha::apps
