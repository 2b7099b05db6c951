// Data-parallel training over NCCL (docs/distributed.md).
//
// One process per GPU ("rank"); every rank holds the whole model and the whole AdamW state
// (plain data parallelism; ZeRO-1 below shards the AdamW moments) and reads its own rows of
// every global batch (data/loader.h: rank r of W takes rows [r B/W, (r+1) B/W)). One step:
//
//   backward of micro-batches 1 .. n-1     gradients accumulate locally (no communication)
//   backward of micro-batch n              each leaf's AccumulateGrad reports "final" through the
//                                          grad-ready hook (autograd/node.h); once every gradient
//                                          of a bucket is final, the bucket is averaged over the
//                                          ranks by ncclAllReduce(ncclAvg) on the communication
//                                          stream while the backward goes on (overlap)
//   finish()                               the compute stream waits for every bucket
//   loss, stop flag                        one small all-reduce: the guard and Ctrl-C decide alike
//   clip, guard, AdamW                     identical on every rank (identical averaged gradients)
// ZeRO-1 (train.zero = 1) replaces the all-reduce by a reduce-scatter (rank r receives the average
// of slice r of every bucket), each rank clips with the whole model's norm (one all-reduce of the
// sums of squares), updates its slices with its shard of the AdamW moments, and an all-gather of
// the parameters makes them whole again on every rank.
//
// Gradients are views of one flat fp32 buffer laid out bucket by bucket (FlatGrads,
// train/flat_grads.h), so the
// all-reduce works in place with no copy in or out. Parameters are laid out in reverse
// registration order: the backward produces the last layers' gradients first, so the first
// buckets fill first.
//
// Launch (apps/cmd_train.cpp):
//   nha train cfg.yaml --gpus N        this process starts N ranks of itself (fork + exec) and
//                                      waits; rank 0 publishes the NCCL id in a file
//   mpirun -np N nha train cfg.yaml    ranks from MPI, NCCL id by MPI_Bcast (builds with MPI only)
// A watchdog thread exits the rank when a collective is still pending after train.dist_timeout_s
// or NCCL reports an error; the --gpus parent stops all ranks when one fails and names it.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "train/flat_grads.h"

namespace nha::dist {

// ---- who am I ------------------------------------------------------------------------------------

enum class Launcher { None, Gpus, Mpi };
const char* launcher_name(Launcher launcher);

struct LaunchInfo {
  Launcher launcher = Launcher::None;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;      // GPU of this machine the rank uses: cuda:local_rank
  std::string rendezvous;  // --gpus: the file in which rank 0 publishes the NCCL unique id
  bool distributed() const { return world_size > 1; }
};

// Environment of a rank started by `--gpus N`.
inline constexpr const char* kEnvRank = "NHA_RANK";
inline constexpr const char* kEnvWorldSize = "NHA_WORLD_SIZE";
inline constexpr const char* kEnvLocalRank = "NHA_LOCAL_RANK";
inline constexpr const char* kEnvRendezvous = "NHA_RENDEZVOUS";

// Reads the launch from environment variables (`lookup` returns nullptr for unset ones):
// NHA_RANK/NHA_WORLD_SIZE/NHA_LOCAL_RANK/NHA_RENDEZVOUS (set by --gpus), else Open MPI's
// OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} (mpirun), else a single process. Malformed values are
// refused with the variable's name.
using EnvLookup = std::function<const char*(const char*)>;
LaunchInfo launch_info_from_env(const EnvLookup& lookup);
LaunchInfo launch_info_from_env();  // this process's environment

// The variables `--gpus` adds to the environment of child `rank`.
std::vector<std::pair<std::string, std::string>> rank_environment(int rank, int world_size,
                                                                  const std::string& rendezvous);

// What this binary can do.
bool nccl_built();
bool mpi_built();

// Refuses `--gpus gpus` when this build or machine cannot run it (CPU build, no NCCL, fewer GPUs
// visible, started under mpirun as well), with a hint. `visible_gpus` = cuda_device_count().
void check_gpus_request(int gpus, int visible_gpus, const LaunchInfo& launch);

// `--gpus N` in the parent: starts N copies of this process (the same command line, read from
// /proc/self/cmdline) with rank_environment(r, N, RUN_DIR/.nccl-id.<pid>), forwards Ctrl-C/SIGTERM
// to them, and waits. When a rank exits with an error or a signal, the others are stopped at once
// (SIGTERM, then SIGKILL after 5 s) and an error names the rank that failed first. Returns 0, or
// the status 128 + signal with which ranks stopped on a forwarded Ctrl-C/SIGTERM (after their
// checkpoint; not a failure).
int run_local_ranks(int gpus, const std::string& run_dir);

// `--ranks N` of a run on the CPU: replaces this process by `mpirun -np N` of the same command
// line (every rank sees --ranks N and joins over MPI), with OMP_NUM_THREADS = cores / N per rank.
// Does not return; fails with a hint when MPI or mpirun is missing.
[[noreturn]] void exec_mpirun_ranks(int ranks);

// ---- the communicator ----------------------------------------------------------------------------

class GradReducer;

// The ranks of one job and their NCCL communicator, communication stream and watchdog. Every
// collective runs on the communication stream, in program order, which is the same on every
// rank (NCCL requires that).
class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual Device device() const = 0;    // cuda:local_rank
  virtual std::string summary() const = 0;  // "2 ranks (--gpus, NCCL 2.28.9)" for the start-up log

  // Sums a few host values over the ranks (losses, token counts, flags); blocks until done. Every
  // rank gets the same sums. `what` names the reduction in timeout messages.
  virtual std::vector<double> all_reduce_sum(std::vector<double> values, const std::string& what) = 0;
  // Returns when every rank has called it.
  virtual void barrier(const std::string& what) = 0;

  // Takes over the gradients of `params` (fp32 tensors on device()): from now on each grad() is a
  // view of the reducer's flat buffer (see the top of this file), in buckets of at most
  // bucket_elements. zero: ZeRO-1, the buckets are reduce-scattered (see GradReducer).
  virtual std::unique_ptr<GradReducer> grad_reducer(const std::vector<Tensor>& params,
                                                    int64_t bucket_elements, bool zero) = 0;
};

// Joins the job described by `launch` (launch.distributed() must hold) with the communicator of
// the device the ranks train on, and starts its watchdog with `timeout_s`:
//   GPUs (cpu = false): NCCL (join_nccl_group), every rank on cuda:local_rank; started by --gpus
//                       or mpirun
//   CPUs (cpu = true):  MPI (join_mpi_group), every rank on the CPU; started by mpirun (or by
//                       `nha train --ranks N`, which runs mpirun)
// the way PyTorch has Gloo beside NCCL. Throws with a hint on a build without the one it needs.
std::unique_ptr<ProcessGroup> join_process_group(const LaunchInfo& launch, bool cpu,
                                                 double timeout_s);
// The two communicators: train/nccl_group.cpp, train/mpi_group.cpp.
std::unique_ptr<ProcessGroup> join_nccl_group(const LaunchInfo& launch, double timeout_s);
std::unique_ptr<ProcessGroup> join_mpi_group(const LaunchInfo& launch, double timeout_s);

// Averages the gradients over the ranks, bucket by bucket, during the last backward of a step.
// ZeRO-1 (zero = true): every bucket of W * c elements is cut into W slices of c, slice r belongs
// to rank r, and a bucket is reduce-scattered: rank r receives the average of its slice only, into
// grad_shard() at the slice's shard_offset (shard_slices, train/flat_grads.h). The flat layout is
// then aligned to flat_align(W), so that the slices are equal. As the update writes this rank's
// slice of each bucket of the parameters, start_all_gather() sends it to the other ranks (the
// all-gather of bucket b overlaps the update of the next slices).
class GradReducer {
 public:
  virtual ~GradReducer() = default;
  // Before the last micro-batch's backward of step `step`: every bucket waits for its gradients.
  virtual void begin(int64_t step) = 0;
  // The grad-ready hook: `leaf`'s gradient is final. Starts the all-reduce of every bucket that
  // is complete and whose predecessors have started (buckets start in order on every rank).
  virtual void grad_ready(const Tensor& leaf) = 0;
  // After that backward: starts the buckets still waiting (parameters that got no gradient
  // contribute zeros) and makes the compute stream wait for all of them.
  virtual void finish() = 0;
  // Zeroes the flat buffer (the next step accumulates into it); replaces AdamW::zero_grad.
  virtual void zero_grad() = 0;
  // The gradients it reduces (for clip_grad_norm_flat; under ZeRO-1 only this rank's
  // accumulation, averaged in grad_shard()).
  virtual FlatGrads& grads() = 0;

  // ---- ZeRO-1 -----------------------------------------------------------------------------------
  // (total / W,) the averaged gradients of this rank's slices after finish(); undefined without
  // ZeRO-1.
  virtual Tensor& grad_shard() = 0;
  // `flat` (total,) laid out like the gradients (the parameters): once this rank's slice of bucket
  // b is written (on a GPU: queued on the compute stream), starts giving every rank every rank's
  // slice of bucket b. Buckets in order 0, 1, ... on every rank.
  virtual void start_all_gather(Tensor& flat, size_t b) = 0;
  // Returns when every started all-gather is done (on a GPU: makes the compute stream wait).
  virtual void finish_all_gather() = 0;
  // `shard` (total / W,) of every rank into `full` (total,) on rank 0 (the others pass an
  // undefined `full`): the moments for an unsharded checkpoint. Blocks until done.
  virtual void gather_to_root(const Tensor& shard, Tensor& full) = 0;
  virtual std::string summary() const = 0;  // "9 buckets of <= 25 MiB over 124.3M gradients"
};

}  // namespace nha::dist
