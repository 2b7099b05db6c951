// Data-parallel launch: who this process is (environment of `--gpus N` or mpirun) and, for
// `nha train --gpus N`, the parent that starts the ranks and waits for them (train/distributed.h,
// docs/distributed.md).
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/clock.h"
#include "train/distributed.h"

extern char** environ;

namespace fs = std::filesystem;

namespace nha::dist {

namespace {

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

std::unique_ptr<ProcessGroup> join_process_group(const LaunchInfo& launch, bool cpu,
                                                 double timeout_s) {
  NHA_CHECK(launch.distributed()) << "internal: join_process_group for a single process";
  if (!cpu) return join_nccl_group(launch, timeout_s);
  NHA_CHECK(launch.launcher == Launcher::Mpi)
      << "rank " << launch.rank << " of " << launch.world_size << " was started by "
      << launcher_name(launch.launcher) << " to train on the CPU, but CPU ranks communicate over "
      << "MPI. HINT: `nha train CONFIG --ranks " << launch.world_size << "` (or mpirun -np "
      << launch.world_size << " nha train CONFIG) with train.device=cpu; --gpus is for GPUs";
  return join_mpi_group(launch, timeout_s);
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

void exec_mpirun_ranks(int ranks) {
  NHA_CHECK(ranks >= 2) << "internal: exec_mpirun_ranks(" << ranks << ")";
  NHA_CHECK(mpi_built()) << "--ranks " << ranks << " on the CPU runs the ranks under mpirun, but "
                         << "this binary was built without MPI. HINT: bash scripts/setup.sh "
                         << "--with-mpi, then rebuild";
  std::vector<std::string> args = own_command_line();  // nha train CONFIG ... --ranks N
  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  NHA_CHECK(len > 0) << "cannot read /proc/self/exe: " << std::strerror(errno);
  args[0] = std::string(exe, size_t(len));
  // One core's share of OpenMP threads per rank, and no binding: a rank bound to one core would
  // run all its threads there.
  const long cores = std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
  std::vector<std::string> cmd = {"mpirun", "-np", std::to_string(ranks), "--oversubscribe",
                                  "--bind-to", "none", "-x",
                                  "OMP_NUM_THREADS=" + std::to_string(std::max(1L, cores / ranks))};
  if (geteuid() == 0) cmd.push_back("--allow-run-as-root");  // Open MPI refuses root otherwise
  cmd.insert(cmd.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : cmd) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(stdout);
  execvp("mpirun", argv.data());
  NHA_FAIL() << "cannot run mpirun: " << std::strerror(errno) << ". HINT: bash scripts/setup.sh "
             << "--with-mpi installs Open MPI (openmpi-bin)";
}

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
      if (kill_at > 0 && monotonic_seconds() > kill_at) {
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
      kill_at = monotonic_seconds() + 5.0;  // a rank blocked in NCCL cannot act on SIGTERM
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

}  // namespace nha::dist
