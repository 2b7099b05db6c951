#include "core/device.h"

#ifdef NHA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace nha {

bool cuda_built() {
#ifdef NHA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef NHA_WITH_CUDA
  int n = 0;
  // No driver or no device is not an error here: the caller falls back to the CPU.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

}  // namespace nha
