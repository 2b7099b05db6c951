#include "autograd/autocast.h"

#include <algorithm>
#include <mutex>
#include <vector>

#include "autograd/ops.h"

namespace nha {

namespace {
thread_local bool g_enabled = false;
thread_local DType g_dtype = DType::F32;

// The registered WeightCopies sets (usually none or one: the trainer's AdamW). The lock guards the
// list; a set's entries are written by its owner before the forward passes that read them.
std::mutex g_copies_mutex;
std::vector<const WeightCopies*>& registered_copies() {
  static std::vector<const WeightCopies*> sets;
  return sets;
}
}  // namespace

AutocastGuard::AutocastGuard(DType dtype) : prev_enabled_(g_enabled), prev_dtype_(g_dtype) {
  NHA_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F64)
      << "autocast: compute dtype must be f32, bf16 (or f64 in CPU tests), got " << dtype_name(dtype);
  g_enabled = dtype != DType::F32;
  g_dtype = dtype;
}

AutocastGuard::~AutocastGuard() {
  g_enabled = prev_enabled_;
  g_dtype = prev_dtype_;
}

bool autocast_enabled() { return g_enabled; }
DType autocast_dtype() { return g_enabled ? g_dtype : DType::F32; }

Tensor autocast(const Tensor& t) {
  if (!g_enabled || !t.defined()) return t;
  const DType d = t.dtype();
  if (d == g_dtype || !(d == DType::F32 || d == DType::BF16)) return t;
  {
    std::lock_guard<std::mutex> lock(g_copies_mutex);
    for (const WeightCopies* set : registered_copies()) {
      const Tensor copy = set->find(t, g_dtype);
      if (copy.defined()) return cast_alias(t, copy);
    }
  }
  return t.to(g_dtype);
}

// ---- weight copies ------------------------------------------------------------------------------

WeightCopies::WeightCopies() {
  std::lock_guard<std::mutex> lock(g_copies_mutex);
  registered_copies().push_back(this);
}

WeightCopies::~WeightCopies() {
  std::lock_guard<std::mutex> lock(g_copies_mutex);
  std::vector<const WeightCopies*>& sets = registered_copies();
  sets.erase(std::remove(sets.begin(), sets.end(), this), sets.end());
}

void WeightCopies::add(const Tensor& master, const Tensor& copy) {
  NHA_CHECK(master.defined() && copy.defined() && master.dtype() == DType::F32 &&
            copy.shape() == master.shape() && copy.device() == master.device())
      << "WeightCopies: a copy " << (copy.defined() ? copy.str() : "undefined")
      << " must be shaped like its f32 master " << (master.defined() ? master.str() : "undefined");
  // Not current until the owner says so.
  entries_[master.impl()] = Entry{master, copy, nullptr, 0};
}

void WeightCopies::mark_current() {
  for (auto& [impl, e] : entries_) {
    e.storage = e.master.impl()->storage;
    e.version = e.storage->version();
  }
}

bool WeightCopies::Entry::fresh() const {
  return storage && master.impl()->storage == storage && storage->version() == version;
}

bool WeightCopies::current() const {
  return std::all_of(entries_.begin(), entries_.end(),
                     [](const auto& kv) { return kv.second.fresh(); });
}

Tensor WeightCopies::find(const Tensor& master, DType dtype) const {
  auto it = entries_.find(master.impl());
  if (it == entries_.end() || it->second.copy.dtype() != dtype || !it->second.fresh()) return {};
  return it->second.copy;
}

}  // namespace nha
