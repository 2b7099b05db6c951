// The watchdog of a data-parallel rank (docs/distributed.md): a thread that ends the process when
// a collective or a blocking NCCL call hangs past train.dist_timeout_s, or NCCL reports an error.
// Used by the NCCL communicator (train/nccl_group.cpp) only; it drives CUDA events itself.
#pragma once
#ifdef NHA_WITH_NCCL
#include <nccl.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/clock.h"
#include "kernels/cuda/cuda_common.h"

namespace nha::dist {

// Exit status of a rank that the watchdog ends (docs/distributed.md).
constexpr int kWatchdogExit = 3;

// Watches the collectives queued on the communication stream (an event recorded behind each)
// and blocking host calls into NCCL. Ends the process, after aborting the communicator, when one
// is still pending after `timeout_s` or when NCCL reports an asynchronous error. Ending the
// process is the only way out: the main thread may be blocked inside CUDA for good.
class Watchdog {
 public:
  Watchdog(int rank, int device, double timeout_s)
      : rank_(rank), device_(device), timeout_s_(timeout_s), thread_([this] { loop(); }) {}

  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    for (const Pending& p : pending_) cudaEventDestroy(p.event);
    for (cudaEvent_t e : spare_) cudaEventDestroy(e);
  }

  void set_comm(ncclComm_t comm) {
    std::lock_guard<std::mutex> lock(mu_);  // the loop uses comm_ under the same lock
    comm_ = comm;
  }

  // Records an event behind the work just queued on `stream` and watches it.
  void watch(cudaStream_t stream, std::string what) {
    cudaEvent_t e = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!spare_.empty()) {
        e = spare_.back();
        spare_.pop_back();
      }
    }
    if (e == nullptr) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventRecord(e, stream));
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back({e, std::move(what), monotonic_seconds()});
  }

  // Watches a blocking host call (communicator set-up and tear-down) while it lives.
  class HostCall {
   public:
    HostCall(Watchdog& w, std::string what) : w_(w) {
      std::lock_guard<std::mutex> lock(w_.mu_);
      w_.host_what_ = std::move(what);
      w_.host_since_ = monotonic_seconds();
    }
    ~HostCall() {
      std::lock_guard<std::mutex> lock(w_.mu_);
      w_.host_since_ = -1;
    }

   private:
    Watchdog& w_;
  };

 private:
  struct Pending {
    cudaEvent_t event;
    std::string what;
    double since;
  };

  void loop() {
    // Events and the communicator belong to the rank's device; the current device is per thread.
    if (cudaSetDevice(device_) != cudaSuccess) fail("cudaSetDevice failed in the watchdog thread");
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::milliseconds(100));
      if (stop_) break;
      const double now = monotonic_seconds();
      while (!pending_.empty()) {  // in stream order: the front completes first
        Pending& p = pending_.front();
        const cudaError_t q = cudaEventQuery(p.event);
        if (q == cudaSuccess) {
          spare_.push_back(p.event);
          pending_.pop_front();
          continue;
        }
        if (q != cudaErrorNotReady)
          fail(std::string("CUDA error ") + cudaGetErrorName(q) + " (" + cudaGetErrorString(q) +
               ") while waiting for " + p.what);
        if (now - p.since > timeout_s_) fail_timeout(p.what, now - p.since);
        break;
      }
      if (host_since_ >= 0 && now - host_since_ > timeout_s_) fail_timeout(host_what_, now - host_since_);
      if (comm_ != nullptr) {
        ncclResult_t async = ncclSuccess;
        if (ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess &&
            async != ncclInProgress)
          fail(std::string("NCCL reported ") + ncclGetErrorString(async) + ": " +
               ncclGetLastError(comm_) + ". HINT: another rank probably failed (see its error)");
      }
    }
  }

  [[noreturn]] void fail_timeout(const std::string& what, double waited) {
    char s[64];
    std::snprintf(s, sizeof(s), "%.0f s", waited);
    fail(what + " has not completed after " + s + " (train.dist_timeout_s = " +
         std::to_string(int64_t(timeout_s_)) + "): another rank probably died or hangs. HINT: "
         "look for the first failing rank's message; raise train.dist_timeout_s if ranks "
         "legitimately wait longer (e.g. for a slow checkpoint write on rank 0)");
  }

  [[noreturn]] void fail(const std::string& why) {
    std::fflush(stdout);
    std::fprintf(stderr, "rank %d (cuda:%d): watchdog: %s; aborting the NCCL communicator and "
                 "exiting with status %d\n", rank_, device_, why.c_str(), kWatchdogExit);
    std::fflush(stderr);
    if (comm_ != nullptr) ncclCommAbort(comm_);  // stops this rank's NCCL kernels and proxies
    std::_Exit(kWatchdogExit);
  }

  const int rank_, device_;
  const double timeout_s_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  ncclComm_t comm_ = nullptr;
  std::deque<Pending> pending_;      // collectives in stream order
  std::vector<cudaEvent_t> spare_;   // events of completed collectives, reused
  std::string host_what_;
  double host_since_ = -1;           // < 0: no host call watched
  std::thread thread_;               // last: starts after every member above exists
};

}  // namespace nha::dist
#endif  // NHA_WITH_NCCL
