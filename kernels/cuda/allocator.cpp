// The CUDA caching allocator and the per-device runtime state (streams, cuBLASLt, error word).
//
// Caching allocator: cudaMalloc/cudaFree synchronize the device and cost tens of microseconds, so
// freed blocks are kept in size-binned free lists and handed out again for requests of the same
// bin. In a training loop the same shapes repeat every step, so after the first step no call
// reaches cudaMalloc. Bins: sizes are rounded up to a multiple of 512 B below 1 MiB and of 2 MiB
// above; a request is served from the free list of exactly its bin (no splitting, no best-fit:
// simple, and fragmentation is bounded by the rounding). Blocks belong to (device, stream); the
// backend has one stream per device (current_stream), so a block freed while kernels that use it
// are still queued may be handed out at once: its next user is queued behind them on the same
// stream. When cudaMalloc fails, every cached block of the device is released and the call is
// retried once.
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernels/cuda/cuda_common.h"

namespace nha::cuda {

namespace {

constexpr int kMaxDevices = 64;

int checked_device_index(int device) {
  NHA_CHECK(device >= 0 && device < kMaxDevices) << "CUDA device index " << device << " out of range";
  return device;
}

}  // namespace

// ---- device guard, streams, properties ----------------------------------------------------------

DeviceGuard::DeviceGuard(int device) {
  CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
}

namespace {
struct DeviceState {
  std::once_flag once;
  cudaStream_t stream = nullptr;
  cudaDeviceProp props{};
  int32_t* error_host = nullptr;    // mapped pinned memory, 4 words
  int32_t* error_device = nullptr;  // its device alias
  std::once_flag blas_once;
  BlasLt blas;
};

std::array<DeviceState, kMaxDevices>& all_states() {
  static std::array<DeviceState, kMaxDevices>* states = new std::array<DeviceState, kMaxDevices>();
  return *states;
}
std::array<std::atomic<bool>, kMaxDevices> g_used{};

bool device_used(int device) { return g_used[device].load(); }

DeviceState& state(int device) {
  DeviceState& s = all_states()[checked_device_index(device)];
  std::call_once(s.once, [&] {
    g_used[device] = true;
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    NHA_CHECK(device < count) << "cuda:" << device << " requested but " << count
                              << " CUDA device(s) are visible. HINT: check CUDA_VISIBLE_DEVICES";
    DeviceGuard guard(device);
    CUDA_CHECK(cudaGetDeviceProperties(&s.props, device));
    CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&s.error_host), 4 * sizeof(int32_t),
                             cudaHostAllocMapped | cudaHostAllocPortable));
    for (int i = 0; i < 4; ++i) s.error_host[i] = 0;
    CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&s.error_device), s.error_host, 0));
  });
  return s;
}
}  // namespace

cudaStream_t current_stream(int device) { return state(device).stream; }

const cudaDeviceProp& device_properties(int device) { return state(device).props; }

BlasLt& blaslt(int device) {
  DeviceState& s = state(device);
  std::call_once(s.blas_once, [&] {
    DeviceGuard guard(device);
    CUBLAS_CHECK(cublasLtCreate(&s.blas.handle));
    s.blas.workspace_bytes = size_t(32) << 20;  // 32 MiB: what cuBLASLt asks for on Hopper
    CUDA_CHECK(cudaMalloc(&s.blas.workspace, s.blas.workspace_bytes));
  });
  return s.blas;
}

int32_t* device_error_word(int device) { return state(device).error_device; }

void check_device_errors(int device) {
  DeviceState& s = state(device);
  volatile int32_t* w = s.error_host;
  const int32_t code = w[0];
  if (code == kNoError) return;
  const int32_t row = w[1], value = w[2], limit = w[3];
  w[1] = 0;
  w[2] = 0;
  w[3] = 0;
  w[0] = 0;
  switch (code) {
    case kEmbeddingId:
      NHA_FAIL() << "embedding (cuda:" << device << "): id " << value << " at position " << row
                 << " is outside the vocabulary [0, " << limit
                 << "). HINT: check the tokenizer's vocab size against model.vocab";
    case kCrossEntropyTarget:
      NHA_FAIL() << "cross_entropy (cuda:" << device << "): target " << value << " at row " << row
                 << " is outside [0, " << limit
                 << ") and is not ignore_index. HINT: the vocab size of the data and of the model "
                    "must agree";
    default:
      NHA_FAIL() << "a CUDA kernel on cuda:" << device << " reported error code " << code;
  }
}

void synchronize_device(int device) {
  DeviceGuard guard(device);
  CUDA_CHECK(cudaStreamSynchronize(current_stream(device)));
  check_device_errors(device);
}

void synchronize_all_devices() {
  int count = 0;
  CUDA_CHECK(cudaGetDeviceCount(&count));
  for (int d = 0; d < count && d < kMaxDevices; ++d)
    if (device_used(d)) synchronize_device(d);
}

// ---- the caching allocator ----------------------------------------------------------------------

namespace {

constexpr size_t kSmallLimit = size_t(1) << 20;  // 1 MiB
constexpr size_t kSmallRound = 512;
constexpr size_t kLargeRound = size_t(2) << 20;  // 2 MiB

size_t bin_size(size_t nbytes) {
  if (nbytes == 0) nbytes = 1;
  const size_t r = nbytes <= kSmallLimit ? kSmallRound : kLargeRound;
  return (nbytes + r - 1) / r * r;
}

class CudaCachingAllocator final : public Allocator {
 public:
  void* allocate(size_t nbytes, int device) override {
    // NHA_CUDA_NO_CACHE=1: every block is an exact-size cudaMalloc, freed at once, so that
    // compute-sanitizer sees every out-of-bounds access (not only those past a cached bin).
    const size_t size = no_cache_ ? (nbytes == 0 ? 1 : nbytes) : bin_size(nbytes);
    std::lock_guard<std::mutex> lock(mutex_);
    PerDevice& d = devices_[checked_device_index(device)];
    void* p = nullptr;
    auto it = d.free.find(size);
    if (!no_cache_ && it != d.free.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      d.cached -= size;
    } else {
      p = malloc_with_retry(d, size, device, nbytes);
    }
    live_[p] = {size, device};
    in_use_ += nbytes;
    if (in_use_ > peak_) peak_ = in_use_;
    return p;
  }

  void deallocate(void* ptr, size_t nbytes, int device) override {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(ptr);
    NHA_CHECK(it != live_.end()) << "CUDA caching allocator: free of unknown pointer " << ptr;
    const size_t size = it->second.size;
    live_.erase(it);
    PerDevice& d = devices_[checked_device_index(device)];
    if (no_cache_) {
      DeviceGuard guard(device);
      CUDA_CHECK(cudaFree(ptr));  // synchronizes the device: no kernel still uses the block
      d.reserved -= size;
      in_use_ -= nbytes;
      return;
    }
    d.free[size].push_back(ptr);
    d.cached += size;
    in_use_ -= nbytes;
  }

  size_t bytes_in_use() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return in_use_;
  }
  size_t peak_bytes() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
  }
  void reset_peak() override {
    std::lock_guard<std::mutex> lock(mutex_);
    peak_ = in_use_;
  }

  // Number of cudaMalloc calls so far (tests check the steady state makes none).
  size_t malloc_calls() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return malloc_calls_;
  }

 private:
  struct PerDevice {
    std::unordered_map<size_t, std::vector<void*>> free;  // bin size -> cached blocks
    size_t cached = 0;                                   // bytes in the free lists
    size_t reserved = 0;                                 // bytes obtained from cudaMalloc
  };
  struct Live {
    size_t size;
    int device;
  };

  void* malloc_with_retry(PerDevice& d, size_t size, int device, size_t requested) {
    DeviceGuard guard(device);
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, size);
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear the sticky-free error state of the runtime API
      release_cached(d);
      err = cudaMalloc(&p, size);
    }
    if (err != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      NHA_FAIL() << "CUDA out of memory on cuda:" << device << " allocating " << requested
                 << " bytes (" << cudaGetErrorString(err) << "); in use by tensors " << in_use_
                 << " bytes, reserved " << d.reserved << " bytes, device free " << free_b << " of "
                 << total_b << ". HINT: lower the batch size or sequence length";
    }
    ++malloc_calls_;
    d.reserved += size;
    return p;
  }

  void release_cached(PerDevice& d) {
    CUDA_CHECK(cudaDeviceSynchronize());
    for (auto& [size, blocks] : d.free) {
      for (void* p : blocks) {
        CUDA_CHECK(cudaFree(p));
        d.reserved -= size;
      }
      blocks.clear();
    }
    d.cached = 0;
  }

  const bool no_cache_ = [] {
    const char* v = std::getenv("NHA_CUDA_NO_CACHE");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  mutable std::mutex mutex_;
  std::array<PerDevice, kMaxDevices> devices_;
  std::unordered_map<void*, Live> live_;
  size_t in_use_ = 0;
  size_t peak_ = 0;
  size_t malloc_calls_ = 0;
};

CudaCachingAllocator& the_allocator() {
  // Never destroyed: tensors with static storage may be freed after other statics are gone, and
  // their blocks simply go back to the (leaked) free lists.
  static CudaCachingAllocator* a = new CudaCachingAllocator();
  return *a;
}

}  // namespace

Allocator& caching_allocator() { return the_allocator(); }

size_t caching_allocator_malloc_calls() { return the_allocator().malloc_calls(); }

Scratch::Scratch(size_t nbytes, int device) : nbytes_(nbytes), device_(device) {
  ptr_ = the_allocator().allocate(nbytes, device);
}
Scratch::~Scratch() { the_allocator().deallocate(ptr_, nbytes_, device_); }

}  // namespace nha::cuda

namespace nha {
// Called by allocator_for(DeviceKind::CUDA) (core/allocator.cpp): referencing this function from
// the core pulls this object file out of the static library, so no static-initialization
// registration can be dropped by the linker.
Allocator& cuda_allocator() { return cuda::caching_allocator(); }
}  // namespace nha
