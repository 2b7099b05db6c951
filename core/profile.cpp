#include "core/profile.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace nha::profile {

namespace {
struct Registry {
  std::mutex mutex;
  std::unordered_map<const char*, Entry> by_name;  // keyed by the literal's address
};
Registry& registry() {
  static Registry r;
  return r;
}
std::atomic<bool>& flag() {
  static std::atomic<bool> on = [] {
    const char* v = std::getenv("NHA_PROFILE");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}
}  // namespace

bool enabled() { return flag().load(std::memory_order_relaxed); }
void set_enabled(bool on) { flag().store(on, std::memory_order_relaxed); }

void record(const char* name, double seconds) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  Entry& e = r.by_name[name];
  if (e.name.empty()) e.name = name;
  e.calls += 1;
  e.seconds += seconds;
}

std::vector<Entry> entries() {
  Registry& r = registry();
  std::vector<Entry> out;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    for (const auto& [_, e] : r.by_name) out.push_back(e);
  }
  std::sort(out.begin(), out.end(),
            [](const Entry& a, const Entry& b) { return a.seconds > b.seconds; });
  return out;
}

void reset() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.by_name.clear();
}

std::string table() {
  const std::vector<Entry> all = entries();
  double total = 0;
  for (const Entry& e : all) total += e.seconds;
  std::string out = "op                          calls    total ms   ms/call   share\n";
  char line[160];
  for (const Entry& e : all) {
    std::snprintf(line, sizeof line, "%-26s %7lld %11.1f %9.3f %6.1f%%\n", e.name.c_str(),
                  static_cast<long long>(e.calls), e.seconds * 1e3,
                  e.seconds * 1e3 / double(e.calls), total > 0 ? 100 * e.seconds / total : 0.0);
    out += line;
  }
  return out;
}

}  // namespace nha::profile
