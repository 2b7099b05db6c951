// CUDA embedding: forward (row gather) and backward (deterministic row sums, no float atomics).
//
// Backward: dtable[v, :] = sum_{n : ids[n] == v} dout[n, :].
//   1. keys[n] = ids[n] as i32 (invalid ids become V and are reported), vals[n] = n
//   2. stable radix sort of (key, n) pairs (CUB, shipped with the CUDA toolkit): equal ids end up
//      adjacent, in increasing n
//   3. dtable = 0; one block per (sorted position that starts a run of equal keys, 256-column
//      slice) adds the run's dout rows in sorted (= increasing n) order and writes the row once.
// Every output element is produced by one thread in a fixed order: bitwise reproducible.
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace nha {

using namespace cuda;

namespace {

__device__ __forceinline__ void report_error(int32_t* err, int32_t code, int64_t row,
                                             int64_t value, int64_t limit) {
  if (atomicCAS(err, 0, code) == 0) {
    err[1] = int32_t(row);
    err[2] = int32_t(value);
    err[3] = int32_t(limit);
    __threadfence_system();
  }
}

// out[n, c] = table[ids[n], c];  table [V, C], ids [N], out [N, C]. VEC elements per thread.
// An id outside [0, V) writes a NaN row and reports the error.
template <typename T, typename I, int VEC>
__global__ void embedding_forward_kernel(T* __restrict__ out, const T* __restrict__ table,
                                         const I* __restrict__ ids, int64_t N, int64_t V,
                                         int64_t C, int32_t* err) {
  const int64_t cv = C / VEC;  // packs per row
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < N * cv;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = idx / cv, c = (idx % cv) * VEC;
    const int64_t id = int64_t(ids[n]);
    Pack<T, VEC> v;
    if (id >= 0 && id < V) {
      v = load_pack<T, VEC>(table + id * C + c);
    } else {
      if (c == 0) report_error(err, kEmbeddingId, n, id, V);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = from_f32<T>(NAN);
    }
    store_pack<T, VEC>(out + n * C + c, v);
  }
}

// keys[n] = ids[n] (V when outside [0, V), reported), vals[n] = n
template <typename I>
__global__ void embedding_keys_kernel(int32_t* __restrict__ keys, int32_t* __restrict__ vals,
                                      const I* __restrict__ ids, int64_t N, int64_t V,
                                      int32_t* err) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N;
       n += int64_t(gridDim.x) * blockDim.x) {
    const int64_t id = int64_t(ids[n]);
    const bool ok = id >= 0 && id < V;
    if (!ok) report_error(err, kEmbeddingId, n, id, V);
    keys[n] = ok ? int32_t(id) : int32_t(V);
    vals[n] = int32_t(n);
  }
}

// Block (p, slice): if sorted position p starts a run of equal keys v < V, then for the columns
// c of the slice: dtable[v, c] = sum over the run r = p, p+1, .. of dout[vals[r], c] (in r order).
template <typename T>
__global__ void embedding_backward_kernel(T* __restrict__ dtable, const T* __restrict__ dout,
                                          const int32_t* __restrict__ keys,
                                          const int32_t* __restrict__ vals, int64_t N, int64_t V,
                                          int64_t C) {
  const int64_t p = blockIdx.x;
  const int32_t key = keys[p];
  if (key >= V || (p > 0 && keys[p - 1] == key)) return;  // not the start of a valid run
  const int64_t c = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
  for (int64_t r = p; r < N && keys[r] == key; ++r) acc += to_f32(dout[int64_t(vals[r]) * C + c]);
  dtable[int64_t(key) * C + c] = from_f32<T>(acc);
}

template <typename F>
void dispatch_ids(const Tensor& ids, const char* op, F&& fn) {
  switch (ids.dtype()) {
    case DType::I32: fn.template operator()<int32_t>(); return;
    case DType::I64: fn.template operator()<int64_t>(); return;
    default: NHA_FAIL() << op << ": ids must be i32 or i64, got " << ids.str();
  }
}

}  // namespace

void CudaBackend::embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) {
  const int dev = out.device().index;
  check_cuda_tensor(out, dev, "embedding_forward", "out");
  check_cuda_tensor(table, dev, "embedding_forward", "table");
  check_cuda_tensor(ids, dev, "embedding_forward", "ids");
  NHA_CHECK(table.dim() == 2) << "embedding: table must be [V, C], got " << table.str();
  const int64_t V = table.size(0), C = table.size(1), N = ids.numel();
  NHA_CHECK(out.numel() == N * C && out.dtype() == table.dtype())
      << "embedding: out " << out.str() << " does not hold " << N << " rows of " << C << " "
      << dtype_name(table.dtype());
  NHA_CHECK(V < (1LL << 31)) << "embedding: vocabulary of " << V << " rows is too large";
  if (N * C == 0) return;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  int32_t* err = device_error_word(dev);
  dispatch_f32_bf16(table, "embedding_forward", [&]<typename T>() {
    dispatch_ids(ids, "embedding_forward", [&]<typename I>() {
      const T* tab = static_cast<const T*>(table.data_ptr());
      T* o = static_cast<T*>(out.data_ptr());
      const I* id = static_cast<const I*>(ids.data_ptr());
      constexpr int V16 = kVec16<T>;
      if (C % V16 == 0 && aligned16(tab) && aligned16(o))
        embedding_forward_kernel<T, I, V16>
            <<<grid_for(N * C / V16, 256), 256, 0, st>>>(o, tab, id, N, V, C, err);
      else
        embedding_forward_kernel<T, I, 1>
            <<<grid_for(N * C, 256), 256, 0, st>>>(o, tab, id, N, V, C, err);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void CudaBackend::embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  const int dev = dtable.device().index;
  check_cuda_tensor(dtable, dev, "embedding_backward", "dtable");
  check_cuda_tensor(dout, dev, "embedding_backward", "dout");
  check_cuda_tensor(ids, dev, "embedding_backward", "ids");
  NHA_CHECK(dtable.dim() == 2) << "embedding backward: dtable must be [V, C], got "
                               << dtable.str();
  const int64_t V = dtable.size(0), C = dtable.size(1), N = ids.numel();
  NHA_CHECK(dout.numel() == N * C && dout.dtype() == dtable.dtype())
      << "embedding backward: dout " << dout.str() << " does not hold " << N << " rows of " << C
      << " " << dtype_name(dtable.dtype());
  NHA_CHECK(V < (1LL << 31) - 1 && N < (1LL << 31))
      << "embedding backward: V = " << V << ", N = " << N << " too large";
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream(dev);
  if (dtable.numel() > 0)
    CUDA_CHECK(cudaMemsetAsync(dtable.data_ptr(), 0, dtable.nbytes(), st));  // unused rows: 0
  if (N == 0 || C == 0) return;
  int32_t* err = device_error_word(dev);

  // keys/vals before and after the sort: [N] i32 each
  Scratch keys_in(size_t(N) * 4, dev), vals_in(size_t(N) * 4, dev);
  Scratch keys_out(size_t(N) * 4, dev), vals_out(size_t(N) * 4, dev);
  dispatch_ids(ids, "embedding_backward", [&]<typename I>() {
    embedding_keys_kernel<I><<<grid_for(N, 256), 256, 0, st>>>(
        keys_in.as<int32_t>(), vals_in.as<int32_t>(), static_cast<const I*>(ids.data_ptr()), N, V,
        err);
    CUDA_CHECK_LAUNCH();
  });
  int end_bit = 1;  // keys are in [0, V]
  while (end_bit < 31 && (int64_t(1) << end_bit) <= V) ++end_bit;
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in.as<int32_t>(),
                                             keys_out.as<int32_t>(), vals_in.as<int32_t>(),
                                             vals_out.as<int32_t>(), N, 0, end_bit, st));
  Scratch temp(temp_bytes, dev);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.get(), temp_bytes, keys_in.as<int32_t>(),
                                             keys_out.as<int32_t>(), vals_in.as<int32_t>(),
                                             vals_out.as<int32_t>(), N, 0, end_bit, st));
  dispatch_f32_bf16(dtable, "embedding_backward", [&]<typename T>() {
    constexpr int kThreads = 256;
    const dim3 grid(unsigned(N), unsigned((C + kThreads - 1) / kThreads));
    NHA_CHECK(grid.y <= 65535) << "embedding backward: C = " << C << " too large";
    embedding_backward_kernel<T><<<grid, kThreads, 0, st>>>(
        static_cast<T*>(dtable.data_ptr()), static_cast<const T*>(dout.data_ptr()),
        keys_out.as<int32_t>(), vals_out.as<int32_t>(), N, V, C);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace nha
