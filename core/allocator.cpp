#include "core/allocator.h"

#include <atomic>
#include <cstdlib>

namespace nha {
namespace {

constexpr size_t kCpuAlignment = 64;

class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t nbytes, int) override {
    size_t rounded = (nbytes + kCpuAlignment - 1) / kCpuAlignment * kCpuAlignment;
    void* p = std::aligned_alloc(kCpuAlignment, rounded == 0 ? kCpuAlignment : rounded);
    NHA_CHECK(p != nullptr) << "out of host memory allocating " << nbytes << " bytes";
    size_t now = in_use_ += nbytes;
    size_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return p;
  }
  void deallocate(void* ptr, size_t nbytes, int) override {
    std::free(ptr);
    in_use_ -= nbytes;
  }
  size_t bytes_in_use() const override { return in_use_; }
  size_t peak_bytes() const override { return peak_; }
  void reset_peak() override { peak_ = in_use_.load(); }

 private:
  std::atomic<size_t> in_use_{0};
  std::atomic<size_t> peak_{0};
};

Allocator*& registered(DeviceKind kind) {
  static CpuAllocator cpu;
  static Allocator* table[2] = {&cpu, nullptr};
  return table[static_cast<int>(kind)];
}

}  // namespace

Allocator& allocator_for(DeviceKind kind) {
  Allocator* a = registered(kind);
#ifdef NHA_WITH_CUDA
  if (a == nullptr && kind == DeviceKind::CUDA) a = registered(kind) = &cuda_allocator();
#endif
  NHA_CHECK(a != nullptr) << "no allocator for device kind " << int(kind)
                          << ". HINT: this binary was built without the CUDA backend "
                             "(configure with -DNHA_CUDA=ON on a machine with nvcc)";
  return *a;
}

Storage::Storage(size_t nbytes, Device device) : nbytes_(nbytes), device_(device) {
  data_ = allocator_for(device.kind).allocate(nbytes, device.index);
}

Storage::~Storage() { allocator_for(device_.kind).deallocate(data_, nbytes_, device_.index); }

}  // namespace nha
