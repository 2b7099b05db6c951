// Checkpoints in HDF5 (docs/checkpoint.md has the layout for h5py users).
//
//   CKPT_DIR/step_00000100.h5
//     /params/<name>     f32, the parameter's shape; <name> is the Module name ("layers.3.mlp.up.weight")
//     /optim/m/<name>    f32 AdamW first moment     /optim/v/<name>  f32 second moment
//     /config            string: the resolved run config (YAML)
//     /loader_state      string: the data loader's state (JSON)
//     root attributes    format "nha-checkpoint-v1", step, tokens_seen, optim_step, rng_seed,
//                        rng_offset, loss_ema, loss_ema_count, bad_steps_in_row, param_names
// Export files (`nha export`) hold /params only (f32 or bf16) plus the config and attributes.
//
// Files carry an integrity seal in a 512-byte user block (core/fileio.h), checked before HDF5 reads
// them, and every dataset an `xxh64` checksum attribute, checked when it is read; counters,
// finiteness and AdamW's v >= 0 are validated on load (docs/checkpoint.md).
// Writes go to NAME.tmp.<pid> and are renamed to NAME when complete and closed: a file with a final
// name is always whole; on any error the temp file is removed. Every HDF5 call is checked and an
// error names the call, the file and the HDF5 message (file:line of the check).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "layers/module.h"

namespace nha {

class AdamW;

inline constexpr const char* kCheckpointFormat = "nha-checkpoint-v1";
inline constexpr const char* kExportFormat = "nha-params-v1";

// Everything besides tensors that a resume needs.
struct TrainState {
  int64_t step = 0;          // optimizer steps completed (skipped ones included)
  int64_t tokens_seen = 0;   // training tokens consumed
  int64_t optim_step = 0;    // AdamW's step counter (bias correction)
  uint64_t rng_seed = 0;     // the trainer's Generator
  uint64_t rng_offset = 0;
  double loss_ema = 0;       // spike guard: running mean of accepted losses
  int64_t loss_ema_count = 0;
  int64_t bad_steps_in_row = 0;
  std::string loader_state;  // JSON (data::LoaderState::to_json)
  std::string config_yaml;   // resolved config (to_yaml)
};

// Writes a full checkpoint (parameters + AdamW state + train state) atomically. `opt` may be null
// (then /optim is absent).
void save_checkpoint(const std::string& path, const std::vector<NamedParameter>& params,
                     const AdamW* opt, const TrainState& state);

// Loads a checkpoint into existing tensors (any device/dtype: values are copied and converted).
// The parameter names and shapes must match exactly; the error lists what is missing, extra or
// differently shaped. `opt` may be null (parameters only). Returns the train state.
TrainState load_checkpoint(const std::string& path, const std::vector<NamedParameter>& params,
                           AdamW* opt);

// Reads only the attributes, config and loader state (cheap). For an export file: its step,
// tokens_seen and config (the rest zero/empty).
TrainState read_train_state(const std::string& path);

// Every /params/<name> of a checkpoint or export file as f32 CPU tensors (bf16 converted exactly).
std::map<std::string, Tensor> read_parameters(const std::string& path);
// The resolved config YAML stored in a checkpoint or export file.
std::string read_config_yaml(const std::string& path);
// Copies every parameter of the file `path` into `params` (values converted to each tensor's dtype
// and device). Every name must be in the file with the same shape; the error names the one that
// is missing or differs.
void load_parameters_into(const std::string& path, const std::vector<NamedParameter>& params);

// Parameters-only file for evaluation or sharing: /params/<name> in f32 or bf16 (an HDF5 16-bit
// float type with bfloat16's bit layout: 1 sign, 8 exponent, 7 mantissa bits; h5py reads it
// exactly with ds.astype("f4")[:]), /config, attributes format "nha-params-v1", dtype, step,
// tokens_seen. Atomic like checkpoints.
void export_parameters(const std::string& checkpoint_path, const std::string& out_path,
                       DType dtype);
// The same file from parameters in memory (`nha import`, `nha convert`): `params` in this order,
// `config_yaml` the resolved run config that `nha eval` / `nha generate` build the model from.
void write_parameters(const std::string& out_path, const std::vector<NamedParameter>& params,
                      const std::string& config_yaml, DType dtype, int64_t step,
                      int64_t tokens_seen);

// Checkpoints of a directory: (step, path) sorted by step; only complete files named
// step_<digits>.h5 count (temp files never do).
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir);
// Deletes the temp files (step_*.h5.tmp.<pid>) that processes no longer running left in `dir`
// (killed while writing); returns their paths.
std::vector<std::string> remove_stale_temp_files(const std::string& dir);
// The newest checkpoint of `dir`, or "" when there is none.
std::string latest_checkpoint(const std::string& dir);
// The checkpoint a user means by `run_or_ckpt`: the file itself, or the newest checkpoint of a
// checkpoint directory or of RUN/checkpoints. Fails with a hint when there is none.
std::string resolve_checkpoint(const std::string& run_or_ckpt);
// The checkpoint file name of a step: DIR/step_00000100.h5.
std::string checkpoint_path(const std::string& dir, int64_t step);
// Deletes all but the newest `keep_last` checkpoints of `dir`; returns the paths removed.
std::vector<std::string> prune_checkpoints(const std::string& dir, int64_t keep_last);

// Test hook: the next save_checkpoint/export fails (throws) after writing this many datasets
// (-1: never). Used to check that a failed write leaves no file behind.
void set_checkpoint_failure_for_testing(int64_t fail_after_datasets);

}  // namespace nha
