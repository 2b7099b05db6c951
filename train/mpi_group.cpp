// Data-parallel training on CPUs over MPI: the communicator (ProcessGroup) and the gradient
// reducer of train/distributed.h for ranks that train on the CPU (docs/distributed.md). The same
// trainer, bucket layout, grad-ready hook and checkpoints as on GPUs; only the bytes move
// differently:
//   gradient bucket   MPI_Iallreduce(MPI_SUM) in place, started when the bucket is final during
//                     the last backward of a step (how much it overlaps depends on the MPI
//                     library's progress); finish() waits for all and scales by 1/world
//   host values       MPI_Allreduce(MPI_SUM) of doubles (loss, stop flag)
//   ZeRO-1            MPI_Ireduce_scatter_block per bucket instead (then 1/world on the shard),
//                     MPI_Iallgather in place of the updated parameters, MPI_Igather of the moments
//                     to rank 0 for a checkpoint
// Sums of 2 ranks are exact to reorder (a + b == b + a), and a scale by 1/2 is exact: 2 ranks give
// the same bits as 1 rank accumulating the same 2 micro-batches (tests/cpu/test_distributed_mpi.cpp).
// A watchdog thread ends the rank when a blocking MPI call is still waiting after
// train.dist_timeout_s (a rank that died or hangs); mpirun then ends the others.
#include "train/distributed.h"

#include <unistd.h>

#include <chrono>
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/clock.h"
#include "kernels/backend.h"
#include "train/bucket_reducer.h"
#include "train/mpi_check.h"

namespace nha::dist {

#ifdef NHA_WITH_MPI

namespace {

// Exit status of a rank that the watchdog ends (as with NCCL, docs/distributed.md).
constexpr int kMpiWatchdogExit = 3;

// Ends the process when one blocking MPI call (announced with Call) takes longer than
// timeout_s: the main thread is stuck inside MPI, so exiting is the only way out.
class HostWatchdog {
 public:
  HostWatchdog(int rank, double timeout_s)
      : rank_(rank), timeout_s_(timeout_s), thread_([this] { loop(); }) {}
  ~HostWatchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  // Watches a blocking call for its lifetime.
  class Call {
   public:
    Call(HostWatchdog& w, std::string what) : w_(w) {
      std::lock_guard<std::mutex> lock(w_.mu_);
      w_.what_ = std::move(what);
      w_.since_ = monotonic_seconds();
    }
    ~Call() {
      std::lock_guard<std::mutex> lock(w_.mu_);
      w_.what_.clear();
    }

   private:
    HostWatchdog& w_;
  };

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::milliseconds(100));
      if (stop_ || what_.empty() || monotonic_seconds() - since_ < timeout_s_) continue;
      std::fprintf(stderr,
                   "rank %d: %s did not finish within train.dist_timeout_s = %g s: another rank "
                   "has probably failed or hangs (see its error). Ending this rank.\n",
                   rank_, what_.c_str(), timeout_s_);
      std::fflush(stderr);
      _exit(kMpiWatchdogExit);
    }
  }

  const int rank_;
  const double timeout_s_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::string what_;  // the blocking call in progress, "" when none
  double since_ = 0;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members it reads
};

class MpiGroup final : public ProcessGroup {
 public:
  MpiGroup(const LaunchInfo& launch, double timeout_s) : launch_(launch) {
    int initialized = 0;
    MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      MPI_CHECK(MPI_Init(nullptr, nullptr));
      finalize_ = true;
    }
    int size = 0, rank = 0;
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size));
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    NHA_CHECK(size == launch.world_size && rank == launch.rank)
        << "MPI_COMM_WORLD says rank " << rank << " of " << size << " but the environment says "
        << launch.rank << " of " << launch.world_size << ". HINT: start the ranks with one mpirun";
    watchdog_ = std::make_unique<HostWatchdog>(launch.rank, timeout_s);
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_CHECK(MPI_Get_library_version(version, &len));
    library_ = std::string(version, size_t(len));
    library_ = library_.substr(0, library_.find_first_of(",\n"));  // "Open MPI v4.1.4"
  }

  ~MpiGroup() override {
    watchdog_.reset();
    // On the way out of an error other ranks may wait in a collective: leave MPI unfinalized, so
    // that mpirun sees this rank fail and ends the job (MPI_Finalize would wait for them).
    if (finalize_ && std::uncaught_exceptions() == 0) MPI_Finalize();
  }

  int rank() const override { return launch_.rank; }
  int world_size() const override { return launch_.world_size; }
  Device device() const override { return Device::cpu(); }
  std::string summary() const override {
    return std::to_string(launch_.world_size) + " ranks on the CPU (" +
           launcher_name(launch_.launcher) + ", " + library_ + ")";
  }

  std::vector<double> all_reduce_sum(std::vector<double> values, const std::string& what) override {
    HostWatchdog::Call call(*watchdog_, what);
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, values.data(), int(values.size()), MPI_DOUBLE, MPI_SUM,
                            MPI_COMM_WORLD));
    return values;
  }

  void barrier(const std::string& what) override {
    HostWatchdog::Call call(*watchdog_, what);
    MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
  }

  std::unique_ptr<GradReducer> grad_reducer(const std::vector<Tensor>& params,
                                            int64_t bucket_elements, bool zero) override;

  HostWatchdog& watchdog() { return *watchdog_; }

 private:
  LaunchInfo launch_;
  std::string library_;
  bool finalize_ = false;  // this process called MPI_Init
  std::unique_ptr<HostWatchdog> watchdog_;
};

// Each bucket summed in place by MPI_Iallreduce (ZeRO-1: this rank's slice summed into the shard by
// MPI_Ireduce_scatter_block) as soon as it is final; finish() waits for all of them and scales the
// sums by 1/world (the average).
class MpiGradReducer final : public BucketReducer {
 public:
  MpiGradReducer(MpiGroup& group, const std::vector<Tensor>& params, int64_t bucket_elements,
                 bool zero)
      : BucketReducer(params, Device::cpu(), bucket_elements, group.rank(), group.world_size(),
                      zero),
        group_(group) {
    for (size_t b = 0; b < num_buckets(); ++b)
      NHA_CHECK(bucket_size(b) <= int64_t(INT32_MAX))
          << "a gradient bucket of " << bucket_size(b) << " floats exceeds MPI's int count. "
          << "HINT: a smaller train.dist_bucket_mb";
  }

  std::string summary() const override {
    return layout_summary() + (zero() ? ", ZeRO-1: fp32 reduce-scatter (MPI_Ireduce_scatter_block "
                                        "sum, then 1/world) and all-gather of the parameters"
                                      : ", fp32 all-reduce (MPI_Iallreduce sum, then 1/world)");
  }

 private:
  void start_bucket(size_t b) override {
    MPI_Request& request = start(bucket_name(b));
    if (zero())
      MPI_CHECK(MPI_Ireduce_scatter_block(bucket_data(b),
                                          grad_shard().data<float>() + shard_offset(b),
                                          int(slice_size(b)), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                                          &request));
    else
      MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, bucket_data(b), int(bucket_size(b)), MPI_FLOAT,
                               MPI_SUM, MPI_COMM_WORLD, &request));
  }

  void wait_all() override {
    wait_started();
    Tensor& sums = zero() ? grad_shard() : grads().buffer();  // (total / world,) or (total,) f32
    backend_for(sums).scale(sums, sums, 1.0 / double(group_.world_size()));
  }

  // Each rank's slice of bucket b of `flat` sits at bucket_begin(b) + rank x slice_size(b).
  void all_gather_bucket(float* flat, size_t b) override {
    MPI_Request& request = start("the all-gather of parameter bucket " + std::to_string(b + 1));
    MPI_CHECK(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, flat + bucket_begin(b),
                             int(slice_size(b)), MPI_FLOAT, MPI_COMM_WORLD, &request));
  }

  void finish_all_gather() override { wait_started(); }

  // Rank 0 receives into `full` in place: its own slice is copied there first.
  void gather_buckets(const float* shard, float* full) override {
    for (size_t b = 0; b < num_buckets(); ++b) {
      const float* mine = shard + shard_offset(b);  // (slice_size(b),)
      MPI_Request& request = start("the gather of optimizer bucket " + std::to_string(b + 1) +
                                   " for the checkpoint");
      if (rank() == 0) {
        float* slices = full + bucket_begin(b);  // (world x slice_size(b),)
        std::copy(mine, mine + slice_size(b), slices);
        MPI_CHECK(MPI_Igather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, slices, int(slice_size(b)),
                              MPI_FLOAT, 0, MPI_COMM_WORLD, &request));
      } else {
        MPI_CHECK(MPI_Igather(mine, int(slice_size(b)), MPI_FLOAT, nullptr, 0, MPI_DATATYPE_NULL, 0,
                              MPI_COMM_WORLD, &request));
      }
    }
    wait_started();
  }

  // A new request, named for the watchdog.
  MPI_Request& start(std::string name) {
    names_.push_back(std::move(name));
    requests_.push_back(MPI_REQUEST_NULL);
    return requests_.back();
  }

  // Waits for every started request under the watchdog.
  void wait_started() {
    for (size_t r = 0; r < requests_.size(); ++r) {
      HostWatchdog::Call call(group_.watchdog(), names_[r]);
      MPI_CHECK(MPI_Wait(&requests_[r], MPI_STATUS_IGNORE));
    }
    requests_.clear();
    names_.clear();
  }

  MpiGroup& group_;
  std::vector<MPI_Request> requests_;  // the collectives started and not yet waited for, in order
  std::vector<std::string> names_;    // their names for the watchdog
};

std::unique_ptr<GradReducer> MpiGroup::grad_reducer(const std::vector<Tensor>& params,
                                                    int64_t bucket_elements, bool zero) {
  return std::make_unique<MpiGradReducer>(*this, params, bucket_elements, zero);
}

}  // namespace

std::unique_ptr<ProcessGroup> join_mpi_group(const LaunchInfo& launch, double timeout_s) {
  return std::make_unique<MpiGroup>(launch, timeout_s);
}

#else  // no MPI

std::unique_ptr<ProcessGroup> join_mpi_group(const LaunchInfo& launch, double) {
  NHA_FAIL() << "rank " << launch.rank << " of " << launch.world_size << " trains on the CPU, "
             << "which needs MPI, but this binary was built without it. HINT: "
             << "bash scripts/setup.sh --with-mpi, then rebuild";
}

#endif

}  // namespace nha::dist
