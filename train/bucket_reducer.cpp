#include "train/bucket_reducer.h"

#include <algorithm>
#include <iomanip>
#include <sstream>

namespace nha::dist {

namespace {

// The parameters, once checked to be what the reducer averages: fp32 master weights on `device`.
const std::vector<Tensor>& checked_params(const std::vector<Tensor>& params, Device device) {
  for (size_t i = 0; i < params.size(); ++i)
    NHA_CHECK(params[i].dtype() == DType::F32 && params[i].device() == device)
        << "data parallel: parameter " << i << " is " << params[i].str() << ", expected f32 on "
        << device.str() << " (fp32 master weights)";
  return params;
}

}  // namespace

BucketReducer::BucketReducer(const std::vector<Tensor>& params, Device device,
                             int64_t bucket_elements, int rank, int world, bool zero)
    : rank_(rank),
      world_(world),
      zero_(zero),
      grads_(checked_params(params, device), bucket_elements, flat_align(zero ? world : 1)),
      plan_(grads_.plan()),
      bucket_mib_(double(bucket_elements) * sizeof(float) / double(1 << 20)) {
  for (size_t i = 0; i < params.size(); ++i) index_[params[i].impl()] = i;
  waiting_.assign(plan_.buckets.size(), 0);
  if (zero_) {
    slices_ = shard_slices(plan_, rank_, world_);
    shard_ = Tensor::zeros({plan_.total / world_}, DType::F32, device);  // (total / world,)
  }
}

void BucketReducer::begin(int64_t step) {
  for (size_t b = 0; b < plan_.buckets.size(); ++b)
    waiting_[b] = int64_t(plan_.buckets[b].params.size());
  next_ = 0;
  step_ = step;
}

void BucketReducer::grad_ready(const Tensor& leaf) {
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
    while (next_ < plan_.buckets.size() && waiting_[next_] == 0) start_bucket(next_++);
}

void BucketReducer::finish() {
  NHA_CHECK(step_ >= 0) << "internal: GradReducer::finish without begin";
  // Parameters that got no gradient in this backward contribute their zeros.
  while (next_ < plan_.buckets.size()) start_bucket(next_++);
  wait_all();
  step_ = -1;
}

float* BucketReducer::bucket_data(size_t b) {
  return grads_.buffer().data<float>() + plan_.buckets[b].begin;
}

int64_t BucketReducer::bucket_size(size_t b) const {
  return plan_.buckets[b].end - plan_.buckets[b].begin;
}

void BucketReducer::start_all_gather(Tensor& flat, size_t b) {
  NHA_CHECK(zero_) << "internal: start_all_gather without ZeRO-1";
  NHA_CHECK(flat.dtype() == DType::F32 && flat.numel() == plan_.total && flat.is_contiguous() &&
            b < plan_.buckets.size())
      << "internal: all-gather of bucket " << b << " of " << flat.str() << ", expected f32 ("
      << plan_.total << ",) in " << plan_.buckets.size() << " buckets";
  all_gather_bucket(flat.data<float>(), b);
}

void BucketReducer::gather_to_root(const Tensor& shard, Tensor& full) {
  NHA_CHECK(zero_) << "internal: gather_to_root without ZeRO-1";
  NHA_CHECK(shard.dtype() == DType::F32 && shard.numel() == shard_.numel() &&
            shard.is_contiguous() && (rank_ == 0) == full.defined() &&
            (!full.defined() || (full.dtype() == DType::F32 && full.numel() == plan_.total)))
      << "internal: gather_to_root of " << shard.str() << " into "
      << (full.defined() ? full.str() : "nothing") << " on rank " << rank_;
  gather_buckets(shard.data<float>(), full.defined() ? full.data<float>() : nullptr);
}

std::string BucketReducer::bucket_name(size_t b) const {
  return std::string(zero_ ? "the reduce-scatter" : "the all-reduce") + " of gradient bucket " +
         std::to_string(b + 1) + "/" + std::to_string(plan_.buckets.size()) + " of step " +
         std::to_string(step_);
}

std::string BucketReducer::layout_summary() const {
  std::ostringstream s;
  s << plan_.buckets.size() << " gradient buckets of <= " << std::setprecision(3) << bucket_mib_
    << " MiB over " << index_.size() << " parameters";
  return s.str();
}

}  // namespace nha::dist
