// Host-side CUDA plumbing shared by every file of the CUDA backend (and by benches/tests):
// checked calls, the current stream of a device, the device guard, cuBLASLt handles, scratch
// memory from the caching allocator, and the device error word that kernels use to report bad
// inputs (token ids out of range) without a synchronization.
//
// Plain C++ (no device code): .cpp files of the backend include it as well as the .cu files.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/allocator.h"
#include "core/error.h"
#include "core/tensor.h"

// Every CUDA runtime call is checked; a failure throws nha::Error("file:line: CUDA error ...").
#define CUDA_CHECK(call)                                                                     \
  do {                                                                                       \
    const cudaError_t nha_err_ = (call);                                                     \
    if (nha_err_ != cudaSuccess)                                                             \
      NHA_FAIL() << "CUDA error " << cudaGetErrorName(nha_err_) << " ("                      \
                 << cudaGetErrorString(nha_err_) << ") in " #call                            \
                 << ". HINT: run under compute-sanitizer to find the faulting kernel";        \
  } while (0)

// After every kernel launch: catches bad launch configurations at the launch site.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(call)                                                                   \
  do {                                                                                       \
    const cublasStatus_t nha_st_ = (call);                                                   \
    if (nha_st_ != CUBLAS_STATUS_SUCCESS)                                                    \
      NHA_FAIL() << "cuBLAS error " << int(nha_st_) << " (" << cublasGetStatusString(nha_st_) \
                 << ") in " #call;                                                           \
  } while (0)

namespace nha::cuda {

// Makes `device` current for the scope and restores the previous device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// The compute stream of a device: one non-blocking stream per device, created on first use.
// Every kernel, copy and cuBLASLt call of the backend runs on it, so work on one device is
// ordered and the caching allocator may reuse a freed block at once (stream order).
cudaStream_t current_stream(int device);

// cuBLASLt handle and its workspace for a device (created on first use, never freed).
struct BlasLt {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};
BlasLt& blaslt(int device);

// Device properties read once per device.
const cudaDeviceProp& device_properties(int device);

// The process-wide CUDA caching allocator (kernels/cuda/allocator.cpp).
Allocator& caching_allocator();

// A temporary device buffer from the caching allocator, returned when the object dies. Safe to
// drop right after queuing the kernels that use it: the next user of the block runs later on the
// same stream.
class Scratch {
 public:
  Scratch(size_t nbytes, int device);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t nbytes_ = 0;
  int device_ = 0;
};

// Kernels report invalid inputs (an id outside the vocabulary) through a word in mapped host
// memory instead of trapping; the host reads it whenever it synchronizes (synchronize(), copies to
// the host) and throws an nha::Error naming the op. Layout: {code, row, value, limit}.
enum ErrorCode : int32_t { kNoError = 0, kEmbeddingId = 1, kCrossEntropyTarget = 2 };
int32_t* device_error_word(int device);  // device pointer to pass to kernels
// Throws if a kernel on `device` recorded an error since the last check (and clears it).
// Only meaningful after the device's stream has been synchronized.
void check_device_errors(int device);

// Synchronizes the stream of `device` and then checks its error word.
void synchronize_device(int device);
// Same for every device this process has used.
void synchronize_all_devices();
// Number of cudaMalloc calls made by the caching allocator so far (tests: none in steady state).
size_t caching_allocator_malloc_calls();

// Checks shared by the backend methods.
inline void check_cuda_tensor(const Tensor& t, int device, const char* op, const char* what) {
  NHA_CHECK(t.device() == Device::cuda(device))
      << op << ": " << what << " is " << t.str() << ", expected a tensor on cuda:" << device;
  NHA_CHECK(t.is_contiguous()) << op << ": " << what << " " << t.str() << " must be contiguous";
}
inline void check_dtype_is(const Tensor& t, DType d, const char* op, const char* what) {
  NHA_CHECK(t.dtype() == d) << op << ": " << what << " must be " << dtype_name(d) << ", got "
                            << t.str();
}

// Grid size for a grid-stride loop over n items with `threads` per block.
inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65535LL * 16) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return unsigned(b);
}

}  // namespace nha::cuda
