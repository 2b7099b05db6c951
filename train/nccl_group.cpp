// Data-parallel training over NCCL: the communicator (ProcessGroup) and the gradient reducer (see
// train/distributed.h and docs/distributed.md; the launch: train/launch.cpp; the watchdog:
// train/nccl_watchdog.h; the flat gradient layout: train/flat_grads.h).
#include "train/distributed.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "core/clock.h"
#include "core/fileio.h"
#include "train/bucket_reducer.h"

#ifdef NHA_WITH_NCCL
#include <nccl.h>

#include "kernels/cuda/cuda_common.h"
#include "train/nccl_watchdog.h"
#endif
#include "train/mpi_check.h"

namespace nha::dist {

// ---- NCCL ------------------------------------------------------------------------------------------

#ifdef NHA_WITH_NCCL

// Every NCCL call is checked; the message carries NCCL's own explanation of the last error.
#define NCCL_CHECK(call)                                                                        \
  do {                                                                                          \
    const ncclResult_t nha_nccl_ = (call);                                                      \
    if (nha_nccl_ != ncclSuccess)                                                               \
      NHA_FAIL() << "NCCL error " << ncclGetErrorString(nha_nccl_) << " in " #call << ": "      \
                 << ncclGetLastError(nullptr)                                                   \
                 << ". HINT: NCCL_DEBUG=WARN (or INFO) prints what NCCL saw; a failed or slow "  \
                    "rank shows its own error first";                                            \
  } while (0)


namespace {

// Rank 0's NCCL unique id for every rank.
ncclUniqueId exchange_unique_id(const LaunchInfo& launch, double timeout_s) {
  ncclUniqueId id{};
  if (launch.rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  if (launch.launcher == Launcher::Mpi) {
#ifdef NHA_WITH_MPI
    int size = 0;
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size));
    NHA_CHECK(size == launch.world_size) << "MPI_COMM_WORLD has " << size << " ranks but "
                                         << "OMPI_COMM_WORLD_SIZE says " << launch.world_size;
    MPI_CHECK(MPI_Bcast(&id, int(sizeof(id)), MPI_BYTE, 0, MPI_COMM_WORLD));
#endif
    return id;
  }
  // --gpus: rank 0 writes the id atomically (temp name + rename); the others poll for it.
  if (launch.rank == 0) {
    write_file_atomic(launch.rendezvous, std::string_view(id.internal, sizeof(id.internal)));
    return id;
  }
  const double deadline = monotonic_seconds() + timeout_s;
  for (;;) {
    std::ifstream in(launch.rendezvous, std::ios::binary);
    if (in && in.read(id.internal, sizeof(id.internal)) && in.gcount() == sizeof(id.internal)) return id;
    NHA_CHECK(monotonic_seconds() < deadline)
        << "rank 0 did not publish the NCCL id in '" << launch.rendezvous << "' within "
        << timeout_s << " s. HINT: rank 0 probably failed first (see its error above)";
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

class NcclGradReducer;

class NcclGroup final : public ProcessGroup {
 public:
  static constexpr size_t kMaxHostValues = 64;

  NcclGroup(const LaunchInfo& launch, double timeout_s) : launch_(launch) {
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    NHA_CHECK(launch.local_rank < count)
        << "rank " << launch.rank << " has local rank " << launch.local_rank << " and needs cuda:"
        << launch.local_rank << ", but " << count << " GPU(s) are visible. HINT: start at most "
        << count << " ranks per machine (--gpus, or mpirun --map-by ppr:" << count << ":node), or "
        << "check CUDA_VISIBLE_DEVICES";
    CUDA_CHECK(cudaSetDevice(launch.local_rank));
#ifdef NHA_WITH_MPI
    if (launch.launcher == Launcher::Mpi) {
      int initialized = 0;
      MPI_CHECK(MPI_Initialized(&initialized));
      if (!initialized) {
        MPI_CHECK(MPI_Init(nullptr, nullptr));
        mpi_finalize_ = true;
      }
    }
#endif
    watchdog_ = std::make_unique<Watchdog>(launch.rank, launch.local_rank, timeout_s);
    const ncclUniqueId id = exchange_unique_id(launch, timeout_s);
    {
      Watchdog::HostCall call(*watchdog_, "ncclCommInitRank (joining the other ranks)");
      NCCL_CHECK(ncclCommInitRank(&comm_, launch.world_size, id, launch.rank));
    }
    watchdog_->set_comm(comm_);
    // The highest priority: a bucket's reduction should not queue behind the backward's kernels,
    // or the last buckets would start late and the overlap would shrink.
    int least = 0, greatest = 0;
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_values_), kMaxHostValues * sizeof(double),
                             cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&device_values_), kMaxHostValues * sizeof(double)));
    int version = 0;
    NCCL_CHECK(ncclGetVersion(&version));
    nccl_version_ = std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) +
                    "." + std::to_string(version % 100);
  }

  ~NcclGroup() override {
    watchdog_->set_comm(nullptr);
    if (std::uncaught_exceptions() > 0) {
      // On the way out of an error, other ranks may be stuck in a collective: abort instead of
      // waiting for them, free nothing (cudaFree would wait for the device; the process is about
      // to exit), and leave MPI unfinalized so that mpirun notices the failure and ends the job.
      if (comm_ != nullptr) ncclCommAbort(comm_);
      watchdog_.reset();
      return;
    }
    if (comm_ != nullptr) {
      Watchdog::HostCall call(*watchdog_, "tearing down the NCCL communicator");
      cudaStreamSynchronize(stream_);
      ncclCommDestroy(comm_);
    }
    watchdog_.reset();
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (host_values_ != nullptr) cudaFreeHost(host_values_);
    if (device_values_ != nullptr) cudaFree(device_values_);
#ifdef NHA_WITH_MPI
    if (mpi_finalize_) MPI_Finalize();
#endif
  }

  int rank() const override { return launch_.rank; }
  int world_size() const override { return launch_.world_size; }
  Device device() const override { return Device::cuda(launch_.local_rank); }
  std::string summary() const override {
    return std::to_string(launch_.world_size) + " ranks (" + launcher_name(launch_.launcher) +
           ", NCCL " + nccl_version_ + ")";
  }

  std::vector<double> all_reduce_sum(std::vector<double> values, const std::string& what) override {
    const size_t n = values.size();
    NHA_CHECK(n >= 1 && n <= kMaxHostValues) << "all_reduce_sum of " << n << " values";
    cuda::DeviceGuard guard(launch_.local_rank);
    std::copy(values.begin(), values.end(), host_values_);
    CUDA_CHECK(cudaMemcpyAsync(device_values_, host_values_, n * sizeof(double),
                               cudaMemcpyHostToDevice, stream_));
    NCCL_CHECK(ncclAllReduce(device_values_, device_values_, n, ncclFloat64, ncclSum, comm_, stream_));
    watchdog_->watch(stream_, what);
    CUDA_CHECK(cudaMemcpyAsync(host_values_, device_values_, n * sizeof(double),
                               cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::copy(host_values_, host_values_ + n, values.begin());
    return values;
  }

  void barrier(const std::string& what) override { all_reduce_sum({0.0}, what); }

  std::unique_ptr<GradReducer> grad_reducer(const std::vector<Tensor>& params,
                                            int64_t bucket_elements, bool zero) override;

  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }
  Watchdog& watchdog() { return *watchdog_; }

 private:
  LaunchInfo launch_;
  std::string nccl_version_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;    // the communication stream: every collective of this rank
  double* host_values_ = nullptr;    // (kMaxHostValues,) pinned staging for all_reduce_sum
  double* device_values_ = nullptr;  // (kMaxHostValues,) reduced in place
  bool mpi_finalize_ = false;        // this process called MPI_Init
  std::unique_ptr<Watchdog> watchdog_;
};

// Each bucket averaged by ncclAllReduce(ncclAvg) (ZeRO-1: this rank's slice by ncclReduceScatter
// into the shard) on the communication stream, once the compute stream has produced its gradients;
// finish() makes the compute stream wait for the last one. The ZeRO-1 paths (reduce-scatter,
// all-gather, gather) compile but have not yet run on a GPU (docs/distributed.md).
class NcclGradReducer final : public BucketReducer {
 public:
  NcclGradReducer(NcclGroup& group, const std::vector<Tensor>& params, int64_t bucket_elements,
                  bool zero)
      : BucketReducer(params, group.device(), bucket_elements, group.rank(), group.world_size(),
                      zero),
        group_(group) {
    cuda::DeviceGuard guard(group_.device().index);
    CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }

  ~NcclGradReducer() override {
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
  }

  std::string summary() const override {
    return layout_summary() +
           (zero() ? ", ZeRO-1: fp32 reduce-scatter (ncclAvg) overlapped with the backward, "
                     "all-gather of the parameters"
                   : ", fp32 all-reduce (ncclAvg), overlapped with the backward");
  }

 private:
  void start_bucket(size_t b) override {
    cuda::DeviceGuard guard(group_.device().index);
    communication_waits_for_compute();
    float* base = bucket_data(b);  // (bucket_size(b),)
    if (zero())
      NCCL_CHECK(ncclReduceScatter(base, grad_shard().data<float>() + shard_offset(b),
                                   size_t(slice_size(b)), ncclFloat32, ncclAvg, group_.comm(),
                                   group_.stream()));
    else
      NCCL_CHECK(ncclAllReduce(base, base, size_t(bucket_size(b)), ncclFloat32, ncclAvg,
                               group_.comm(), group_.stream()));
    group_.watchdog().watch(group_.stream(), bucket_name(b));
  }

  void wait_all() override {
    cuda::DeviceGuard guard(group_.device().index);
    compute_waits_for_communication();
  }

  // In place: each rank's slice of bucket b sits at bucket_begin(b) + rank x slice_size(b).
  void all_gather_bucket(float* flat, size_t b) override {
    cuda::DeviceGuard guard(group_.device().index);
    communication_waits_for_compute();
    float* bucket = flat + bucket_begin(b);  // (world x slice_size(b),)
    NCCL_CHECK(ncclAllGather(bucket + rank() * slice_size(b), bucket, size_t(slice_size(b)),
                             ncclFloat32, group_.comm(), group_.stream()));
    group_.watchdog().watch(group_.stream(),
                            "the all-gather of parameter bucket " + std::to_string(b + 1));
  }

  void finish_all_gather() override {
    cuda::DeviceGuard guard(group_.device().index);
    compute_waits_for_communication();
  }

  // NCCL has no gather: rank 0 receives every other rank's slices (grouped point-to-point), its
  // own it copies.
  void gather_buckets(const float* shard, float* full) override {
    cuda::DeviceGuard guard(group_.device().index);
    communication_waits_for_compute();
    if (rank() == 0)
      for (size_t b = 0; b < num_buckets(); ++b)
        CUDA_CHECK(cudaMemcpyAsync(full + bucket_begin(b), shard + shard_offset(b),
                                   size_t(slice_size(b)) * sizeof(float), cudaMemcpyDeviceToDevice,
                                   group_.stream()));
    NCCL_CHECK(ncclGroupStart());
    for (size_t b = 0; b < num_buckets(); ++b) {
      const size_t n = size_t(slice_size(b));
      if (rank() != 0) {
        NCCL_CHECK(ncclSend(shard + shard_offset(b), n, ncclFloat32, 0, group_.comm(),
                            group_.stream()));
        continue;
      }
      float* slices = full + bucket_begin(b);  // (world x slice_size(b),)
      for (int r = 1; r < world(); ++r)
        NCCL_CHECK(ncclRecv(slices + r * n, n, ncclFloat32, r, group_.comm(), group_.stream()));
    }
    NCCL_CHECK(ncclGroupEnd());
    group_.watchdog().watch(group_.stream(),
                            "the gather of the optimizer moments for the checkpoint");
    CUDA_CHECK(cudaStreamSynchronize(group_.stream()));
  }

  // The communication stream starts after the compute stream's work so far.
  void communication_waits_for_compute() {
    CUDA_CHECK(cudaEventRecord(ready_, cuda::current_stream(group_.device().index)));
    CUDA_CHECK(cudaStreamWaitEvent(group_.stream(), ready_, 0));
  }

  // The compute stream goes on after the communication stream's work so far.
  void compute_waits_for_communication() {
    CUDA_CHECK(cudaEventRecord(done_, group_.stream()));
    CUDA_CHECK(cudaStreamWaitEvent(cuda::current_stream(group_.device().index), done_, 0));
  }

  NcclGroup& group_;
  cudaEvent_t ready_ = nullptr;  // compute stream -> communication stream, reused
  cudaEvent_t done_ = nullptr;   // communication stream -> compute stream, reused
};

std::unique_ptr<GradReducer> NcclGroup::grad_reducer(const std::vector<Tensor>& params,
                                                     int64_t bucket_elements, bool zero) {
  return std::make_unique<NcclGradReducer>(*this, params, bucket_elements, zero);
}

}  // namespace

std::unique_ptr<ProcessGroup> join_nccl_group(const LaunchInfo& launch, double timeout_s) {
  NHA_CHECK(launch.launcher != Launcher::Mpi || mpi_built())
      << "started by mpirun with " << launch.world_size << " ranks, but this binary was built "
      << "without MPI. HINT: install libopenmpi-dev and rebuild, or on one machine use "
      << "`nha train CONFIG --gpus " << launch.world_size << "` instead of mpirun";
  return std::make_unique<NcclGroup>(launch, timeout_s);
}

#else  // no NCCL

std::unique_ptr<ProcessGroup> join_nccl_group(const LaunchInfo& launch, double) {
  NHA_FAIL() << "this process is rank " << launch.rank << " of " << launch.world_size << " ("
             << launcher_name(launch.launcher) << "), but the binary was built without NCCL. HINT: "
             << "install the CUDA toolkit and NCCL (libnccl-dev) and rebuild";
}

#endif

}  // namespace nha::dist
