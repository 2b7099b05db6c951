// A per-op wall-clock profile, on when the environment variable NHA_PROFILE is set (to anything but
// "0") at the first use. Each CPU backend op opens a scope:
//
//   void CpuBackend::gemm(...) { NHA_PROFILE_SCOPE("gemm"); ... }
//
// which adds its wall time and one call to the op's entry. Off, a scope costs one load and branch
// of a cached flag (no clock read, no lock). Times are inclusive: an op that calls another op
// (a GEMM inside nha_forward) counts that time in both rows. Scopes on OpenMP worker threads are
// not expected (ops are called from the main thread; their parallel regions are inside the scope).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace nha::profile {

struct Entry {
  std::string name;
  int64_t calls = 0;
  double seconds = 0;
};

// Whether NHA_PROFILE was set when first asked (read once), or what set_enabled said since.
bool enabled();
// Turns the profile on or off without the environment variable (tests).
void set_enabled(bool on);
// Adds one call of `seconds` to the entry `name` (a string literal: entries are keyed by pointer).
void record(const char* name, double seconds);
// The entries so far, by total time, largest first.
std::vector<Entry> entries();
void reset();
// The entries as a fixed-width table: op, calls, total ms, ms per call, share of the listed total.
std::string table();

class Scope {
 public:
  explicit Scope(const char* name) : name_(enabled() ? name : nullptr) {
    if (name_) start_ = std::chrono::steady_clock::now();
  }
  ~Scope() {
    if (name_)
      record(name_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace nha::profile

#define NHA_PROFILE_CONCAT2(a, b) a##b
#define NHA_PROFILE_CONCAT(a, b) NHA_PROFILE_CONCAT2(a, b)
#define NHA_PROFILE_SCOPE(name) \
  ::nha::profile::Scope NHA_PROFILE_CONCAT(nha_profile_scope_, __LINE__)(name)
