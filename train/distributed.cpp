// Data-parallel training over NCCL: launch, communicator, watchdog, gradient reducer (see
// train/distributed.h and docs/distributed.md; the flat gradient layout: train/flat_grads.h).
#include "train/distributed.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "core/fileio.h"

#ifdef NHA_WITH_NCCL
#include <nccl.h>

#include "kernels/cuda/cuda_common.h"
#endif
#ifdef NHA_WITH_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only: no deprecated C++ bindings to link
#include <mpi.h>
#endif

extern char** environ;

namespace fs = std::filesystem;

namespace nha::dist {

namespace {

double seconds_now() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

// An integer environment variable; `fallback` when unset. Refuses anything but a whole number.
int env_int(const EnvLookup& lookup, const char* name, int fallback) {
  const char* v = lookup(name);
  if (v == nullptr) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  NHA_CHECK(*v != '\0' && *end == '\0' && x >= 0 && x < (1 << 20))
      << "environment variable " << name << "='" << v << "' is not a non-negative integer. HINT: "
      << "it is set by `nha train --gpus N` or mpirun; do not set it by hand";
  return int(x);
}

}  // namespace

const char* launcher_name(Launcher launcher) {
  switch (launcher) {
    case Launcher::None: return "single process";
    case Launcher::Gpus: return "--gpus";
    case Launcher::Mpi: return "mpirun";
  }
  return "?";
}

// ---- who am I ------------------------------------------------------------------------------------

LaunchInfo launch_info_from_env(const EnvLookup& lookup) {
  LaunchInfo info;
  if (lookup(kEnvRank) != nullptr) {
    info.launcher = Launcher::Gpus;
    info.rank = env_int(lookup, kEnvRank, 0);
    info.world_size = env_int(lookup, kEnvWorldSize, 0);
    info.local_rank = env_int(lookup, kEnvLocalRank, info.rank);
    const char* rendezvous = lookup(kEnvRendezvous);
    info.rendezvous = rendezvous ? rendezvous : "";
    NHA_CHECK(info.world_size >= 1 && info.rank < info.world_size)
        << kEnvRank << "=" << info.rank << " needs " << kEnvWorldSize << " > " << info.rank
        << " (got " << info.world_size << "). HINT: these are set by `nha train --gpus N`";
    NHA_CHECK(!info.distributed() || !info.rendezvous.empty())
        << kEnvRendezvous << " is not set for rank " << info.rank
        << ". HINT: these are set by `nha train --gpus N`";
  } else if (lookup("OMPI_COMM_WORLD_SIZE") != nullptr) {
    info.launcher = Launcher::Mpi;
    info.world_size = env_int(lookup, "OMPI_COMM_WORLD_SIZE", 1);
    info.rank = env_int(lookup, "OMPI_COMM_WORLD_RANK", 0);
    info.local_rank = env_int(lookup, "OMPI_COMM_WORLD_LOCAL_RANK", 0);
    NHA_CHECK(info.world_size >= 1 && info.rank < info.world_size)
        << "OMPI_COMM_WORLD_RANK=" << info.rank << " is not below OMPI_COMM_WORLD_SIZE="
        << info.world_size;
  }
  return info;
}

LaunchInfo launch_info_from_env() {
  return launch_info_from_env([](const char* name) { return std::getenv(name); });
}

std::vector<std::pair<std::string, std::string>> rank_environment(int rank, int world_size,
                                                                  const std::string& rendezvous) {
  // One machine: the local rank is the rank.
  return {{kEnvRank, std::to_string(rank)},
          {kEnvWorldSize, std::to_string(world_size)},
          {kEnvLocalRank, std::to_string(rank)},
          {kEnvRendezvous, rendezvous}};
}

bool nccl_built() {
#ifdef NHA_WITH_NCCL
  return true;
#else
  return false;
#endif
}

bool mpi_built() {
#ifdef NHA_WITH_MPI
  return true;
#else
  return false;
#endif
}

void check_gpus_request(int gpus, int visible_gpus, const LaunchInfo& launch) {
  NHA_CHECK(gpus >= 1) << "--gpus " << gpus << ": need at least one GPU. HINT: --gpus 2";
  if (gpus == 1) return;
  NHA_CHECK(launch.launcher != Launcher::Mpi)
      << "--gpus " << gpus << " under mpirun: the ranks come from mpirun already. HINT: use either "
      << "`mpirun -np N nha train CONFIG` or `nha train CONFIG --gpus N`, not both";
  NHA_CHECK(nccl_built())
      << "--gpus " << gpus << " needs a build with CUDA and NCCL; this binary was built without "
      << (cuda_built() ? "NCCL" : "CUDA") << ". HINT: install the CUDA toolkit and NCCL "
      << "(libnccl-dev) and rebuild, or train on one device without --gpus";
  NHA_CHECK(gpus <= visible_gpus)
      << "--gpus " << gpus << " but " << visible_gpus << " GPU(s) are visible. HINT: use --gpus "
      << std::max(1, visible_gpus) << ", or check CUDA_VISIBLE_DEVICES";
}

// ---- --gpus N: the parent ------------------------------------------------------------------------

namespace {

constexpr int kMaxLocalRanks = 64;
// The children, for the signal handler (async-signal-safe: plain stores and kill()).
volatile pid_t g_children[kMaxLocalRanks];
volatile std::sig_atomic_t g_num_children = 0;

void forward_signal(int sig) {
  for (int i = 0; i < g_num_children; ++i)
    if (g_children[i] > 0) kill(g_children[i], sig);
}

std::vector<std::string> own_command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> args;
  for (std::string a; std::getline(in, a, '\0');) args.push_back(a);
  NHA_CHECK(!args.empty()) << "cannot read /proc/self/cmdline. HINT: --gpus needs Linux; on other "
                           << "systems launch the ranks with mpirun";
  return args;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" +
           strsignal(WTERMSIG(status)) + ")";
  return "stopped (status " + std::to_string(status) + ")";
}

}  // namespace

int run_local_ranks(int gpus, const std::string& run_dir) {
  NHA_CHECK(gpus >= 2 && gpus <= kMaxLocalRanks) << "--gpus " << gpus << ": 2 .. " << kMaxLocalRanks;
  const std::vector<std::string> args = own_command_line();
  fs::create_directories(run_dir);
  // Unique per launch (the parent's pid): a file left by an earlier launch is never read.
  const std::string rendezvous = (fs::path(run_dir) / (".nccl-id." + std::to_string(getpid()))).string();
  fs::remove(rendezvous);

  // Everything a child needs is built before fork(): between fork and exec only async-signal-safe
  // calls are allowed (this process may already run threads of the CUDA driver).
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<std::vector<std::string>> env_strings(static_cast<size_t>(gpus));
  std::vector<std::vector<char*>> envp(static_cast<size_t>(gpus));
  for (int r = 0; r < gpus; ++r) {
    const auto ours = rank_environment(r, gpus, rendezvous);
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv = *e;
      const bool replaced = std::any_of(ours.begin(), ours.end(), [&](const auto& p) {
        return kv.compare(0, p.first.size() + 1, p.first + "=") == 0;
      });
      if (!replaced) env_strings[r].push_back(kv);
    }
    for (const auto& [k, v] : ours) env_strings[r].push_back(k + "=" + v);
    for (const std::string& s : env_strings[r]) envp[r].push_back(const_cast<char*>(s.c_str()));
    envp[r].push_back(nullptr);
  }

  std::cout << "nha: starting " << gpus << " ranks on cuda:0.." << gpus - 1 << " (data parallel)"
            << std::endl;
  std::fflush(stdout);
  std::fflush(stderr);
  struct sigaction forwarding {}, old_int {}, old_term {};
  forwarding.sa_handler = forward_signal;
  sigemptyset(&forwarding.sa_mask);
  sigaction(SIGINT, &forwarding, &old_int);
  sigaction(SIGTERM, &forwarding, &old_term);

  const pid_t parent = getpid();
  g_num_children = 0;
  for (int r = 0; r < gpus; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      // A child gets its own process group: a terminal's Ctrl-C reaches only the parent, which
      // forwards it once to every rank (a second Ctrl-C would kill a rank mid-checkpoint).
      setpgid(0, 0);
      // If the parent dies (even by SIGKILL), the ranks must not train on without it.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);
      execve("/proc/self/exe", argv.data(), envp[size_t(r)].data());
      const char msg[] = "nha: execve(/proc/self/exe) failed for a rank\n";
      (void)!write(2, msg, sizeof(msg) - 1);
      _exit(127);
    }
    if (pid < 0) {
      const int err = errno;
      for (int i = 0; i < g_num_children; ++i) kill(g_children[i], SIGKILL);
      while (waitpid(-1, nullptr, 0) > 0) {
      }
      NHA_FAIL() << "fork() failed for rank " << r << ": " << std::strerror(err)
                 << ". HINT: check the process limit (ulimit -u) and free memory";
    }
    g_children[r] = pid;
    g_num_children = r + 1;
  }

  // Wait for every rank. The first one to fail stops the others: without it they would wait in
  // their next collective until the watchdog's timeout.
  int remaining = gpus, failed = -1, stopped = 0;
  std::string failure;
  double kill_at = -1;  // SIGKILL what is left at this time
  while (remaining > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid == 0 || (pid < 0 && errno == EINTR)) {
      if (kill_at > 0 && seconds_now() > kill_at) {
        for (int i = 0; i < gpus; ++i)
          if (g_children[i] > 0) kill(g_children[i], SIGKILL);
        kill_at = -1;
      }
      usleep(50 * 1000);
      continue;
    }
    if (pid < 0) break;  // no children left (should not happen while remaining > 0)
    int r = 0;
    while (r < gpus && g_children[r] != pid) ++r;
    if (r == gpus) continue;
    g_children[r] = 0;
    --remaining;
    // A rank stopped by the Ctrl-C/SIGTERM we forwarded exits 128 + signal after its checkpoint.
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (code == 128 + SIGINT || code == 128 + SIGTERM) stopped = code;
    const bool ok = code == 0 || code == stopped;
    if (!ok && failed < 0) {
      failed = r;
      failure = describe_status(status);
      std::fprintf(stderr, "nha: rank %d (pid %d) %s; stopping the other ranks\n", r, int(pid),
                   failure.c_str());
      for (int i = 0; i < gpus; ++i)
        if (g_children[i] > 0) kill(g_children[i], SIGTERM);
      kill_at = seconds_now() + 5.0;  // a rank blocked in NCCL cannot act on SIGTERM
    }
  }
  g_num_children = 0;
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  std::error_code ec;
  fs::remove(rendezvous, ec);
  NHA_CHECK(failed < 0) << "rank " << failed << " of " << gpus << " " << failure
                        << "; the other ranks were stopped. HINT: its own error is printed above "
                        << "(it names 'rank " << failed << "'); resume from the last checkpoint "
                        << "with --resume (on any number of GPUs)";
  return stopped;
}

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

#ifdef NHA_WITH_MPI
#define MPI_CHECK(call)                                                                         \
  do {                                                                                          \
    const int nha_mpi_ = (call);                                                                \
    if (nha_mpi_ != MPI_SUCCESS) {                                                              \
      char nha_msg_[MPI_MAX_ERROR_STRING];                                                      \
      int nha_len_ = 0;                                                                         \
      MPI_Error_string(nha_mpi_, nha_msg_, &nha_len_);                                          \
      NHA_FAIL() << "MPI error in " #call ": " << std::string(nha_msg_, size_t(nha_len_));      \
    }                                                                                           \
  } while (0)
#endif

namespace {

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
    pending_.push_back({e, std::move(what), seconds_now()});
  }

  // Watches a blocking host call (communicator set-up and tear-down) while it lives.
  class HostCall {
   public:
    HostCall(Watchdog& w, std::string what) : w_(w) {
      std::lock_guard<std::mutex> lock(w_.mu_);
      w_.host_what_ = std::move(what);
      w_.host_since_ = seconds_now();
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
      const double now = seconds_now();
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
  const double deadline = seconds_now() + timeout_s;
  for (;;) {
    std::ifstream in(launch.rendezvous, std::ios::binary);
    if (in && in.read(id.internal, sizeof(id.internal)) && in.gcount() == sizeof(id.internal)) return id;
    NHA_CHECK(seconds_now() < deadline)
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
                                            int64_t bucket_bytes) override;

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

class NcclGradReducer final : public GradReducer {
 public:
  NcclGradReducer(NcclGroup& group, const std::vector<Tensor>& params, int64_t bucket_bytes)
      : group_(group),
        grads_(checked_params(params, group.device()),
               std::max<int64_t>(1, bucket_bytes / int64_t(sizeof(float)))),
        plan_(grads_.plan()) {
    for (size_t i = 0; i < params.size(); ++i) index_[params[i].impl()] = i;
    bucket_mib_ = double(bucket_bytes) / double(1 << 20);
    waiting_.assign(plan_.buckets.size(), 0);
    cuda::DeviceGuard guard(group_.device().index);
    CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }

  ~NcclGradReducer() override {
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
  }

  void begin(int64_t step) override {
    for (size_t b = 0; b < plan_.buckets.size(); ++b)
      waiting_[b] = int64_t(plan_.buckets[b].params.size());
    next_ = 0;
    step_ = step;
  }

  void grad_ready(const Tensor& leaf) override {
    if (step_ < 0) return;  // outside begin() .. finish()
    auto it = index_.find(leaf.impl());
    if (it == index_.end()) return;  // a leaf that is not a parameter
    const size_t i = it->second;
    NHA_CHECK(grads_.holds(i))
        << "data parallel: the gradient of parameter " << i << " (" << leaf.str() << ") is no "
        << "longer a view of the bucket buffer. HINT: under data parallelism zero gradients with "
        << "GradReducer::zero_grad, not AdamW::zero_grad";
    const size_t b = plan_.bucket_of[i];
    NHA_CHECK(waiting_[b] > 0) << "internal: a gradient was reported final twice in one backward";
    if (--waiting_[b] == 0)
      while (next_ < plan_.buckets.size() && waiting_[next_] == 0) launch(next_++);
  }

  void finish() override {
    NHA_CHECK(step_ >= 0) << "internal: GradReducer::finish without begin";
    while (next_ < plan_.buckets.size()) launch(next_++);
    cuda::DeviceGuard guard(group_.device().index);
    CUDA_CHECK(cudaEventRecord(done_, group_.stream()));
    CUDA_CHECK(cudaStreamWaitEvent(cuda::current_stream(group_.device().index), done_, 0));
    step_ = -1;
  }

  void zero_grad() override { grads_.zero_grad(); }
  FlatGrads& grads() override { return grads_; }

  std::string summary() const override {
    std::ostringstream s;
    s << plan_.buckets.size() << " gradient buckets of <= " << bucket_mib_ << " MiB over "
      << index_.size() << " parameters, fp32 all-reduce (ncclAvg), overlapped with the backward";
    return s.str();
  }

 private:
  // The parameters, once checked to be what NCCL reduces here: fp32 master weights on the GPU.
  static const std::vector<Tensor>& checked_params(const std::vector<Tensor>& params,
                                                   Device device) {
    for (size_t i = 0; i < params.size(); ++i)
      NHA_CHECK(params[i].dtype() == DType::F32 && params[i].device() == device)
          << "data parallel: parameter " << i << " is " << params[i].str()
          << ", expected f32 on " << device.str() << " (fp32 master weights)";
    return params;
  }

  // Bucket b's gradients are final on the compute stream: average them over the ranks, in place,
  // on the communication stream once the compute stream has got there.
  void launch(size_t b) {
    const GradBucket& k = plan_.buckets[b];
    const int device = group_.device().index;
    cuda::DeviceGuard guard(device);
    CUDA_CHECK(cudaEventRecord(ready_, cuda::current_stream(device)));
    CUDA_CHECK(cudaStreamWaitEvent(group_.stream(), ready_, 0));
    float* base = grads_.buffer().data<float>() + k.begin;  // (end - begin,) the bucket
    NCCL_CHECK(ncclAllReduce(base, base, size_t(k.end - k.begin), ncclFloat32, ncclAvg,
                             group_.comm(), group_.stream()));
    group_.watchdog().watch(group_.stream(), "the all-reduce of gradient bucket " +
                                                 std::to_string(b + 1) + "/" +
                                                 std::to_string(plan_.buckets.size()) +
                                                 " of step " + std::to_string(step_));
  }

  NcclGroup& group_;
  FlatGrads grads_;               // f32 (plan_.total,): every gradient, bucket after bucket
  const BucketPlan& plan_;        // grads_.plan()
  double bucket_mib_ = 0;
  std::unordered_map<const TensorImpl*, size_t> index_;  // parameter -> index
  std::vector<int64_t> waiting_;  // per bucket: gradients not yet final in this backward
  size_t next_ = 0;               // buckets [0, next_) are started (in order on every rank)
  int64_t step_ = -1;             // the step being reduced; -1 outside begin() .. finish()
  cudaEvent_t ready_ = nullptr;   // compute stream -> communication stream, reused per bucket
  cudaEvent_t done_ = nullptr;    // communication stream -> compute stream, after the last bucket
};

std::unique_ptr<GradReducer> NcclGroup::grad_reducer(const std::vector<Tensor>& params,
                                                     int64_t bucket_bytes) {
  return std::make_unique<NcclGradReducer>(*this, params, bucket_bytes);
}

}  // namespace

std::unique_ptr<ProcessGroup> join_process_group(const LaunchInfo& launch, double timeout_s) {
  NHA_CHECK(launch.distributed()) << "internal: join_process_group for a single process";
  NHA_CHECK(launch.launcher != Launcher::Mpi || mpi_built())
      << "started by mpirun with " << launch.world_size << " ranks, but this binary was built "
      << "without MPI. HINT: install libopenmpi-dev and rebuild, or on one machine use "
      << "`nha train CONFIG --gpus " << launch.world_size << "` instead of mpirun";
  return std::make_unique<NcclGroup>(launch, timeout_s);
}

#else  // no NCCL

std::unique_ptr<ProcessGroup> join_process_group(const LaunchInfo& launch, double) {
  NHA_FAIL() << "this process is rank " << launch.rank << " of " << launch.world_size << " ("
             << launcher_name(launch.launcher) << "), but the binary was built without NCCL. HINT: "
             << "install the CUDA toolkit and NCCL (libnccl-dev) and rebuild";
}

#endif

}  // namespace nha::dist
