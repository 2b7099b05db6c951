// Fault injection for tests/multigpu (docs/distributed.md), plugged into the trainer through its
// before_step hook by `nha train` for the ranks of a data-parallel job: NHA_TEST_FAULT=
// exit:RANK:STEP ends that rank with status 7 before the step, hang:RANK:STEP makes it sleep
// forever there. Unset, it does nothing.
#pragma once
#include <cstdint>

namespace nha::apps {

void inject_test_fault(int rank, int64_t step);

}  // namespace nha::apps
