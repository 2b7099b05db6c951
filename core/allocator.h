// Device memory: one Allocator per device kind. The CPU allocator hands out 64-byte aligned blocks
// (cache lines, AVX-512 loads); the CUDA backend registers its caching allocator at start-up.
#pragma once
#include <cstddef>
#include <memory>

#include "core/device.h"

namespace nha {

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t nbytes, int device_index) = 0;
  virtual void deallocate(void* ptr, size_t nbytes, int device_index) = 0;
  // Bytes currently handed out and the peak since start (or the last reset).
  virtual size_t bytes_in_use() const = 0;
  virtual size_t peak_bytes() const = 0;
  virtual void reset_peak() = 0;
};

Allocator& allocator_for(DeviceKind kind);
#ifdef NHA_WITH_CUDA
// The CUDA caching allocator (kernels/cuda/allocator.cpp). allocator_for(DeviceKind::CUDA)
// registers it on first use: calling it from here makes the static-library linker keep the CUDA
// objects, which a static-initialization registration alone would not guarantee.
Allocator& cuda_allocator();
#endif

// A block of device memory shared by every tensor that views it. `version` counts in-place writes:
// autograd records it when a tensor is saved for backward and refuses to use the tensor if it
// changed (PyTorch's SavedVariable check).
class Storage {
 public:
  Storage(size_t nbytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }
  uint64_t version() const { return version_; }
  void bump_version() { ++version_; }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
  uint64_t version_ = 0;
};

}  // namespace nha
