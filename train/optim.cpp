// AdamW over flat buffers and gradient clipping (see train/optim.h).
#include "train/optim.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "autograd/autocast.h"
#include "autograd/node.h"
#include "kernels/backend.h"
#include "train/flat_grads.h"

namespace nha {

AdamW::AdamW(std::vector<ParamEntry> params, AdamWOptions options, DType copy_dtype,
             OptimizerShard shard)
    : params_(std::move(params)), options_(options), shards_(shard.shards) {
  NHA_CHECK(options_.beta1 >= 0 && options_.beta1 < 1 && options_.beta2 >= 0 &&
            options_.beta2 < 1)
      << "AdamW: betas must be in [0, 1), got (" << options_.beta1 << ", " << options_.beta2
      << "). HINT: the usual values are beta1 = 0.9, beta2 = 0.95";
  NHA_CHECK(options_.eps > 0) << "AdamW: eps must be positive, got " << options_.eps;
  NHA_CHECK(options_.weight_decay >= 0)
      << "AdamW: weight_decay must be >= 0, got " << options_.weight_decay;
  std::set<std::string> names;
  std::set<const TensorImpl*> tensors;
  std::vector<int64_t> numels;
  for (const ParamEntry& e : params_) {
    NHA_CHECK(e.param.defined()) << "AdamW: parameter '" << e.name << "' is undefined";
    NHA_CHECK(is_floating(e.param.dtype()) && e.param.dtype() != DType::BF16)
        << "AdamW: parameter '" << e.name << "' is " << e.param.str() << ", expected f32 (or "
        << "f64). HINT: keep fp32 master weights; bf16 compute copies come from copy_dtype";
    NHA_CHECK(e.param.is_contiguous())
        << "AdamW: parameter '" << e.name << "' is a non-contiguous view " << e.param.str()
        << ". HINT: optimize the tensor that owns the memory, not a view of it";
    NHA_CHECK(names.insert(e.name).second)
        << "AdamW: parameter name '" << e.name << "' appears twice. HINT: names key the "
        << "optimizer state in checkpoints and must be unique";
    NHA_CHECK(tensors.insert(e.param.impl()).second)
        << "AdamW: parameter '" << e.name << "' is a tensor already given under another name";
    const Tensor& first = params_.front().param;
    NHA_CHECK(e.param.dtype() == first.dtype() && e.param.device() == first.device())
        << "AdamW: parameter '" << e.name << "' is " << e.param.str() << " but '"
        << params_.front().name << "' is " << first.str() << ". HINT: the parameters live in one "
        << "flat buffer: give one optimizer the parameters of one device and dtype";
    numels.push_back(e.param.numel());
  }
  const DType dtype = params_.empty() ? DType::F32 : params_.front().param.dtype();
  const Device device = params_.empty() ? Device::cpu() : params_.front().param.device();
  // The gradient buffers' layout, so that a flat gradient buffer lines up with the parameters
  // element for element. Unsharded one bucket will do (the buckets do not move the offsets);
  // sharded the reducer's buckets, since a rank owns a slice of each.
  const BucketPlan plan = plan_buckets(
      numels, sharded() ? shard.bucket_elements : std::numeric_limits<int64_t>::max(),
      flat_align(shards_));
  offset_ = plan.offset;
  slices_ = shard_slices(plan, shard.rank, shards_);
  const int64_t kept = plan.total / shards_;  // elements of each moment this process keeps
  flat_ = Tensor::zeros({plan.total}, dtype, device);  // (total,)
  m_flat_ = Tensor::zeros({kept}, dtype, device);      // (total / shards,)
  v_flat_ = Tensor::zeros({kept}, dtype, device);      // (total / shards,)
  const bool with_copy = copy_dtype == DType::BF16;
  NHA_CHECK(!with_copy || dtype == DType::F32)
      << "AdamW: a bf16 copy is kept of f32 parameters only, these are " << dtype_name(dtype);
  if (with_copy) {
    copy_flat_ = Tensor::empty({plan.total}, DType::BF16, device);  // (total,)
    copies_ = std::make_unique<WeightCopies>();
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor& p = params_[i].param;
    Tensor place = view(flat_, i);
    place.copy_(p);
    p.set_data(place);  // every handle to the parameter now sees the flat buffer
    m_.push_back(sharded() ? Tensor() : view(m_flat_, i));
    v_.push_back(sharded() ? Tensor() : view(v_flat_, i));
    copy_.push_back(with_copy ? view(copy_flat_, i) : Tensor());
  }
  if (with_copy) {
    backend_for(flat_).cast(copy_flat_, flat_);
    for (size_t i = 0; i < params_.size(); ++i) copies_->add(params_[i].param, copy_[i]);
    copies_->mark_current();
  }
}

AdamW::~AdamW() = default;

Tensor AdamW::flat_gradients() const {
  std::shared_ptr<Storage> storage;
  int64_t base = 0;  // element of the storage where the buffer starts
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& g = params_[i].param.grad();
    if (!g.defined() || !g.is_contiguous() || g.dtype() != flat_.dtype() ||
        g.device() != flat_.device())
      return {};
    const int64_t b = g.impl()->offset - offset_[i];
    if (i == 0) {
      storage = g.impl()->storage;
      base = b;
    } else if (g.impl()->storage != storage || b != base) {
      return {};
    }
  }
  if (!storage || base < 0 ||
      storage->nbytes() < size_t(base + flat_.numel()) * dtype_size(flat_.dtype()))
    return {};
  return make_view(params_.front().param.grad(), {flat_.numel()}, {1}, base);
}

Tensor AdamW::view(const Tensor& flat, size_t i) const {
  const Shape& shape = params_[i].param.shape();
  return make_view(flat, shape, contiguous_strides(shape), flat.impl()->offset + offset_[i]);
}

void AdamW::check_parameters_in_place() const {
  for (size_t i = 0; i < params_.size(); ++i) {
    const TensorImpl* p = params_[i].param.impl();
    NHA_CHECK(p->storage == flat_.impl()->storage && p->offset == flat_.impl()->offset + offset_[i])
        << "AdamW: parameter '" << params_[i].name << "' no longer lives in the optimizer's flat "
        << "buffer (its data was replaced, e.g. by Module::to). HINT: move or cast the model "
        << "before making the optimizer";
  }
}

void AdamW::step(double lr) {
  NHA_CHECK(!sharded()) << "AdamW: a sharded optimizer updates from this rank's gradient shard. "
                        << "HINT: call step(lr, grad_shard)";
  std::vector<bool> with_grad(params_.size());
  Tensor grads = flat_gradients();
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].param;
    const Tensor& g = p.grad();
    with_grad[i] = g.defined();
    if (!g.defined() || grads.defined()) continue;
    // Gather: the gradients are separate tensors (the per-tensor API, tests).
    NHA_CHECK(g.shape() == p.shape())
        << "AdamW: gradient of '" << params_[i].name << "' is " << g.str()
        << " but the parameter is " << p.str();
    if (!grad_stage_.defined())
      grad_stage_ = Tensor::zeros({flat_.numel()}, flat_.dtype(), flat_.device());  // (total,)
    view(grad_stage_, i).copy_(g);
  }
  update(lr, grads.defined() ? grads : grad_stage_, with_grad, nullptr);
}

void AdamW::step(double lr, const Tensor& grads,
                 const std::function<void(size_t slice)>& after_slice) {
  NHA_CHECK(grads.dim() == 1 && grads.numel() == m_flat_.numel() &&
            grads.dtype() == flat_.dtype() && grads.device() == flat_.device())
      << "AdamW: the gradients are " << grads.str() << ", expected " << dtype_name(flat_.dtype())
      << " (" << m_flat_.numel() << ",) on " << flat_.device().str()
      << (sharded() ? " (this rank's gradient shard)" : " (the flat gradient buffer)");
  update(lr, grads, std::vector<bool>(params_.size(), true), after_slice);
}

void AdamW::update(double lr, const Tensor& grads, const std::vector<bool>& with_grad,
                   const std::function<void(size_t slice)>& after_slice) {
  autograd::NoGradGuard no_grad;
  ++step_;
  check_parameters_in_place();
  // The segment table: (offset in the slice, numel, decay) of every parameter with a gradient, cut
  // to each slice this process owns.
  std::vector<int64_t> rows;
  std::vector<std::pair<int64_t, int64_t>> slice_rows;
  for (const ShardSlice& sl : slices_) {
    const int64_t first = int64_t(rows.size() / 3);
    for (size_t i = 0; i < params_.size(); ++i) {
      const int64_t lo = std::max(offset_[i], sl.begin);
      const int64_t hi = std::min(offset_[i] + params_[i].param.numel(), sl.begin + sl.size);
      if (with_grad[i] && lo < hi)
        rows.insert(rows.end(), {lo - sl.begin, hi - lo, params_[i].decay ? 1 : 0});
    }
    slice_rows.emplace_back(first, int64_t(rows.size() / 3) - first);
  }
  // The table moves to the device only when it changes (with flat gradients: once). Without rows
  // every slice is skipped, but after_slice still runs for each: a rank whose slices hold only
  // padding starts the same all-gathers as the others.
  if (rows != segment_rows_ || slice_rows != slice_rows_) {
    segment_rows_ = rows;
    slice_rows_ = slice_rows;
    segments_ = rows.empty() ? Tensor()
                             : Tensor::from_vector<int64_t>(rows, {int64_t(rows.size() / 3), 3},
                                                            flat_.device());
  }
  Backend& be = backend_for(flat_);
  // A master written since the copies were (a checkpoint load): all copies afresh, since the step
  // writes those of the updated parameters only.
  if (copies_ && !copies_->current()) be.cast(copy_flat_, flat_);
  for (size_t k = 0; k < slices_.size(); ++k) {
    update_slice(k, lr, grads);
    if (after_slice) after_slice(k);
  }
  // In-place writes: bump versions so saved-tensor checks see them.
  for (const Tensor* t : {&flat_, &m_flat_, &v_flat_, &copy_flat_})
    if (t->defined()) t->impl()->storage->bump_version();
  if (copies_ && !sharded()) copies_->mark_current();
}

void AdamW::update_slice(size_t k, double lr, const Tensor& grads) {
  const auto [first, n] = slice_rows_[k];  // its rows of segments_
  if (n == 0) return;
  const ShardSlice& sl = slices_[k];
  const int64_t a = sl.shard_offset, b = sl.shard_offset + sl.size;
  Tensor p = flat_.slice(0, sl.begin, sl.begin + sl.size);  // (size,)
  Tensor g = grads.slice(0, a, b);                          // (size,)
  Tensor m = m_flat_.slice(0, a, b);                        // (size,)
  Tensor v = v_flat_.slice(0, a, b);                        // (size,)
  // Sharded, parameters_written() rewrites the whole copy after the all-gather.
  Tensor copy = copies_ && !sharded() ? copy_flat_.slice(0, sl.begin, sl.begin + sl.size)
                                      : Tensor();  // (size,) bf16 or undefined
  backend_for(flat_).adamw_step_flat(p, g, m, v, copy, segments_.slice(0, first, first + n), lr,
                                     options_.beta1, options_.beta2, options_.eps,
                                     options_.weight_decay, step_);
}

void AdamW::parameters_written() {
  flat_.impl()->storage->bump_version();
  if (!copies_) return;
  backend_for(flat_).cast(copy_flat_, flat_);
  copy_flat_.impl()->storage->bump_version();
  copies_->mark_current();
}

int64_t AdamW::state_bytes() const {
  return int64_t(m_flat_.nbytes() + v_flat_.nbytes());
}

void AdamW::allocate_full_moments() {
  NHA_CHECK(sharded()) << "internal: full moments of an unsharded optimizer";
  m_full_ = Tensor::zeros({flat_.numel()}, flat_.dtype(), flat_.device());  // (total,)
  v_full_ = Tensor::zeros({flat_.numel()}, flat_.dtype(), flat_.device());  // (total,)
  for (size_t i = 0; i < params_.size(); ++i) {
    m_[i] = view(m_full_, i);
    v_[i] = view(v_full_, i);
  }
}

void AdamW::release_full_moments(bool keep_own_slices) {
  NHA_CHECK(m_full_.defined()) << "internal: release_full_moments without allocate_full_moments";
  if (keep_own_slices)
    for (const ShardSlice& sl : slices_) {
      const int64_t a = sl.shard_offset, b = sl.shard_offset + sl.size;
      m_flat_.slice(0, a, b).copy_(m_full_.slice(0, sl.begin, sl.begin + sl.size));
      v_flat_.slice(0, a, b).copy_(v_full_.slice(0, sl.begin, sl.begin + sl.size));
    }
  m_full_ = v_full_ = Tensor();
  for (size_t i = 0; i < params_.size(); ++i) m_[i] = v_[i] = Tensor();
}

void AdamW::zero_grad() {
  for (ParamEntry& e : params_) e.param.mutable_grad() = Tensor();
}

void AdamW::set_step_count(int64_t step) {
  NHA_CHECK(step >= 0) << "AdamW: step count must be >= 0, got " << step;
  step_ = step;
}

size_t AdamW::index_of(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].name == name) return i;
  NHA_FAIL() << "AdamW: no parameter named '" << name << "'";
}

double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  autograd::NoGradGuard no_grad;
  double total = 0;  // sum of squares over all gradients, in double
  for (const Tensor& p : params) {
    if (!p.defined() || !p.grad().defined()) continue;
    Tensor g = p.grad().contiguous();
    Tensor s = Tensor::empty({}, g.dtype() == DType::F64 ? DType::F64 : DType::F32, g.device());
    backend_for(g).sum_squares(s, g);
    total += s.item<double>();
  }
  const double norm = std::sqrt(total);
  if (max_norm > 0 && norm > max_norm) {  // false for NaN: a NaN norm scales nothing
    const double factor = max_norm / (norm + 1e-6);
    for (const Tensor& p : params) {
      if (!p.defined() || !p.grad().defined()) continue;
      Tensor g = p.grad();
      g.mul_(factor);  // mul_ refuses non-contiguous views; leaf grads are contiguous
    }
  }
  return norm;
}

double clip_grad_norm_flat(Tensor& grads, double max_norm,
                           const std::function<double(double)>& sum_over_ranks) {
  autograd::NoGradGuard no_grad;
  // The sum of all squares as one f64 scalar (both backends accumulate in f64).
  Tensor s = Tensor::empty({}, DType::F64, grads.device());
  backend_for(grads).sum_squares(s, grads);
  const double sum = s.item<double>();
  const double norm = std::sqrt(sum_over_ranks ? sum_over_ranks(sum) : sum);
  if (max_norm > 0 && norm > max_norm) grads.mul_(max_norm / (norm + 1e-6));  // not for NaN
  return norm;
}

}  // namespace nha
