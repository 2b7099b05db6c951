// The optimizer: AdamW over a list of named parameters, and global gradient-norm clipping.
//
//   std::vector<ParamEntry> entries = {{"wte", wte, false}, {"blocks.0.wq", wq, true}, ...};
//   AdamW opt(entries, {.lr = 3e-4, .weight_decay = 0.01});
//   ... loss.backward();
//   double norm = clip_grad_norm(params, 1.0);
//   opt.step(lr_schedule(step));
//   opt.zero_grad();
//
// The trainer's form: flat gradients (FlatGrads, or the data-parallel reducer's) and a bf16
// compute copy of the fp32 masters for autocast:
//   AdamW opt(entries, options, DType::BF16);
//   FlatGrads grads(params, ...);
//   ... loss.backward();                      (accumulates into grads.buffer())
//   double norm = clip_grad_norm_flat(grads.buffer(), 1.0);
//   opt.step(lr);                              (one kernel: every parameter and its bf16 copy)
//   grads.zero_grad();
//
// ZeRO-1 (docs/distributed.md): rank r of N keeps the moments of slice r of every gradient bucket
// only and updates those elements of the parameters, from its averaged gradient shard:
//   AdamW opt(entries, options, DType::F32, {.rank = r, .shards = N, .bucket_elements = ...});
//   opt.step(lr, grad_shard, start_all_gather);  grad_shard (shard_elements(),): the reducer's
//                                                reduce-scatter; the all-gather of each bucket
//                                                starts once this rank's slice of it is updated
//   ... wait for the all-gathers, then opt.parameters_written()
#pragma once
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "train/flat_grads.h"

namespace nha {

class WeightCopies;

// One parameter handed to the optimizer. `name` keys its state in checkpoints; `decay` says
// whether weight decay applies (the usual choice: matrices yes, norms/biases/embeddings no).
struct ParamEntry {
  std::string name;
  Tensor param;
  bool decay = true;
};

// AdamW hyper-parameters. `lr` is the default for step(); a schedule passes its own to step(lr).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// Which part of the optimizer state this process keeps (ZeRO-1). shards 1: all of it.
struct OptimizerShard {
  int rank = 0;
  int shards = 1;
  // The gradient reducer's bucket size (elements): a rank owns slice `rank` of every bucket.
  int64_t bucket_elements = std::numeric_limits<int64_t>::max();
};

// AdamW (decoupled weight decay, bias-corrected; the math is Backend::adamw_step in
// kernels/backend.h) over flat buffers. The constructor moves the parameters into one flat buffer:
// each parameter becomes a view of it (Tensor::set_data: every handle to it, e.g. the module's,
// sees the same values at the new place), laid out like the flat gradient buffers
// (plan_buckets: reverse registration order, offsets aligned to 64 elements). The moments
// m and v are zero-initialized flat buffers of the parameters' dtype (f32; f64 for f64 parameters,
// so float64 tests stay exact), seen per parameter through m(i), v(i). All parameters share one
// device and dtype. One step counter is shared by all parameters (like llm.c): it counts calls to
// step(), and bias correction uses it also for a parameter that had no gradient in earlier steps.
// Sharded (shard.shards > 1, ZeRO-1): the layout is the reducer's (plan_buckets with
// shard.bucket_elements and flat_align(shards)); m and v hold slice shard.rank of every bucket,
// compactly (shard_elements(),), and step(lr, grads) updates only those elements.
class AdamW {
 public:
  // copy_dtype BF16 (f32 parameters only): also keep a flat bf16 copy of the parameters, written by
  // the update kernel, for autocast to use instead of casting every weight in every forward
  // (WeightCopies, autograd/autocast.h). Any other value: no copy.
  AdamW(std::vector<ParamEntry> params, AdamWOptions options, DType copy_dtype = DType::F32,
        OptimizerShard shard = {});
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // One update with learning rate `lr`, under autograd::NoGradGuard: increments the step counter,
  // then updates every parameter whose grad() is defined in one Backend::adamw_step_flat call
  // (weight decay options.weight_decay where entry.decay, else 0) and writes its bf16 copy.
  // Parameters without a gradient are left alone (their moments too). When every gradient is a
  // view of one buffer at this layout (FlatGrads, the data-parallel reducer) that buffer is
  // read as it is; other gradients are first gathered into a flat buffer of the optimizer's.
  // Parameters are updated in place (their storage version is bumped, so a graph that saved them
  // before the step refuses to run backward afterwards). Fails when a parameter is no longer a
  // view of the flat buffer (Module::to after the optimizer was made).
  void step(double lr);
  void step() { step(options_.lr); }
  // One update of every parameter from `grads`, laid out like the moments: the flat gradient
  // buffer (total,) unsharded, this rank's averaged gradient shard (shard_elements(),) sharded.
  // after_slice(k), when given, runs once the update of slices()[k] is queued, for every k in
  // order (ZeRO-1: starts the all-gather of bucket k while the next slices are updated).
  void step(double lr, const Tensor& grads,
            const std::function<void(size_t slice)>& after_slice = nullptr);
  // After the parameters were written outside step() (ZeRO-1: the all-gather of the other ranks'
  // slices): marks them written and rewrites the bf16 copy.
  void parameters_written();
  // Resets every parameter's grad to undefined (the next backward allocates it afresh).
  void zero_grad();

  // ---- state, for checkpoints ------------------------------------------------------------------
  const std::vector<ParamEntry>& params() const { return params_; }
  const AdamWOptions& options() const { return options_; }
  AdamWOptions& options() { return options_; }
  // Number of step() calls so far (0 before the first; the first step uses 1 in bias correction).
  int64_t step_count() const { return step_; }
  void set_step_count(int64_t step);
  // Moments of parameter i (same order as params()), views of the flat moments. Restore a
  // checkpoint with m(i).copy_(saved). Sharded: views of the full moments, which exist only
  // between allocate_full_moments() and release_full_moments().
  Tensor& m(size_t i) { return m_.at(i); }
  Tensor& v(size_t i) { return v_.at(i); }
  const Tensor& m(size_t i) const { return m_.at(i); }
  const Tensor& v(size_t i) const { return v_.at(i); }
  // (total,) every parameter, laid out like the flat gradients; params()[i] are its views.
  Tensor& flat_parameters() { return flat_; }
  // The bf16 copy of parameter i (a view of the flat copy); undefined without copies.
  const Tensor& copy(size_t i) const { return copy_.at(i); }
  // Index of the parameter named `name`; fails with a message when there is none.
  size_t index_of(const std::string& name) const;

  // ---- sharding (ZeRO-1) ------------------------------------------------------------------------
  bool sharded() const { return shards_ > 1; }
  // Elements of each moment this process keeps: total / shards.
  int64_t shard_elements() const { return m_flat_.numel(); }
  // Bytes of optimizer state this process keeps (m and v).
  int64_t state_bytes() const;
  // The moments this process keeps, (shard_elements(),): slice k of slices() at its shard_offset.
  Tensor& m_shard() { return m_flat_; }
  Tensor& v_shard() { return v_flat_; }
  const std::vector<ShardSlice>& slices() const { return slices_; }
  // Checkpoints of a sharded optimizer are unsharded (docs/checkpoint.md). Allocates the moments of
  // every parameter, full_m() and full_v() (total,) zero, and makes m(i), v(i) their views: to
  // save, fill them from every rank's shard; to load, read the file into them. Then
  // release_full_moments(keep_own_slices): with true (a load) this rank's slices are copied into
  // its shards first.
  void allocate_full_moments();
  Tensor& full_m() { return m_full_; }
  Tensor& full_v() { return v_full_; }
  void release_full_moments(bool keep_own_slices);

 private:
  // The gradient buffer [total] when every parameter's gradient is a view of one storage at the
  // flat layout, else undefined.
  Tensor flat_gradients() const;
  // The update of every parameter with with_grad[i] from `grads` (laid out like the moments):
  // one Backend::adamw_step_flat per slice this process owns.
  void update(double lr, const Tensor& grads, const std::vector<bool>& with_grad,
              const std::function<void(size_t slice)>& after_slice);
  // The update of slices_[k] (a step's segment table made).
  void update_slice(size_t k, double lr, const Tensor& grads);
  // (shape of parameter i) views of the (total,) buffer `flat`.
  Tensor view(const Tensor& flat, size_t i) const;
  void check_parameters_in_place() const;

  std::vector<ParamEntry> params_;
  AdamWOptions options_;
  std::vector<int64_t> offset_;   // (P,) first element of parameter i in every flat buffer
  int shards_ = 1;                // ranks the moments are sharded over (1: not sharded)
  std::vector<ShardSlice> slices_;  // the parts of flat_ this process updates, in order
  Tensor flat_;                   // (total,) the parameters; params_[i] are its views
  Tensor m_flat_, v_flat_;        // (total / shards,) the moments of slices_, compactly
  Tensor m_full_, v_full_;        // (total,) sharded only, around checkpoints; else undefined
  Tensor copy_flat_;              // (total,) bf16 copy of flat_, or undefined
  std::vector<Tensor> m_, v_, copy_;  // (P,) views of the flat buffers (copy_: undefined ones)
  Tensor grad_stage_;             // (total,) gathered gradients when they are not flat (lazy)
  std::vector<int64_t> segment_rows_;  // (S * 3,) host copy of segments_
  std::vector<std::pair<int64_t, int64_t>> slice_rows_;  // per slice: (first row, rows) of it
  Tensor segments_;               // [S, 3] i64 on the device: last step's (offset in its slice,
                                  // numel, decay), slice after slice
  std::unique_ptr<WeightCopies> copies_;  // registers the copies with autocast, or null
  int64_t step_ = 0;
};

// Global gradient-norm clipping (PyTorch's clip_grad_norm_). Returns the total L2 norm
// sqrt(sum over params of sum(grad^2)) of the gradients that are defined (Backend::sum_squares per
// tensor, summed in double; parameters without grad count as zero). When max_norm > 0 and
// norm > max_norm, scales every gradient in place by max_norm / (norm + 1e-6). max_norm <= 0:
// no clipping, only the norm. A non-finite norm is returned as is and nothing is scaled (the caller
// decides whether to skip the step).
double clip_grad_norm(const std::vector<Tensor>& params, double max_norm);
// The same over a flat gradient buffer (FlatGrads::buffer(): every gradient a view of it,
// the padding between them zero): one Backend::sum_squares over the buffer and, when clipping, one
// scale of it in place.
// Sharded gradients (ZeRO-1: each rank holds the averaged gradients of its slices):
// `sum_over_ranks` adds every rank's sum of squares (one all-reduce): the whole model's norm.
double clip_grad_norm_flat(Tensor& grads, double max_norm,
                           const std::function<double(double)>& sum_over_ranks = nullptr);

}  // namespace nha
