// The CUDA backend object, cross-device copies and synchronization.
#include "kernels/cuda/cuda_backend.h"

#include "kernels/cuda/cuda_common.h"

namespace nha {

// Called by backend_for(cuda:N) (kernels/backend.cpp), which registers it on first use.
Backend& cuda_backend() {
  static CudaBackend* backend = new CudaBackend();  // never destroyed (see the allocator)
  return *backend;
}

// Host <-> device copies are synchronous for the host side: the copy is queued on the device's
// stream behind every kernel already queued there (so it sees their results), and the call returns
// once it is complete, so the host buffer may be reused or freed at once. Device -> device copies
// on one device are asynchronous on the stream; across devices both streams are drained first.
void CudaBackend::copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                             size_t nbytes) {
  if (nbytes == 0) return;
  using namespace cuda;
  if (dst_device.is_cuda() && src_device.is_cuda()) {
    if (dst_device.index == src_device.index) {
      DeviceGuard guard(dst_device.index);
      CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice,
                                 current_stream(dst_device.index)));
    } else {
      synchronize_device(src_device.index);
      synchronize_device(dst_device.index);
      DeviceGuard guard(dst_device.index);
      CUDA_CHECK(cudaMemcpyPeerAsync(dst, dst_device.index, src, src_device.index, nbytes,
                                     current_stream(dst_device.index)));
      CUDA_CHECK(cudaStreamSynchronize(current_stream(dst_device.index)));
    }
    return;
  }
  NHA_CHECK(dst_device.is_cuda() || src_device.is_cuda())
      << "cuda backend asked to copy " << src_device.str() << " -> " << dst_device.str();
  const int dev = dst_device.is_cuda() ? dst_device.index : src_device.index;
  const cudaMemcpyKind kind =
      dst_device.is_cuda() ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  DeviceGuard guard(dev);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, kind, current_stream(dev)));
  CUDA_CHECK(cudaStreamSynchronize(current_stream(dev)));
  check_device_errors(dev);
}

void CudaBackend::synchronize() { cuda::synchronize_all_devices(); }

}  // namespace nha
