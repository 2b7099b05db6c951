#include "train/bucket_reducer.h"

#include <algorithm>
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
                             int64_t bucket_bytes)
    : grads_(checked_params(params, device),
             std::max<int64_t>(1, bucket_bytes / int64_t(sizeof(float)))),
      plan_(grads_.plan()),
      bucket_mib_(double(bucket_bytes) / double(1 << 20)) {
  for (size_t i = 0; i < params.size(); ++i) index_[params[i].impl()] = i;
  waiting_.assign(plan_.buckets.size(), 0);
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

std::string BucketReducer::bucket_name(size_t b) const {
  return "the all-reduce of gradient bucket " + std::to_string(b + 1) + "/" +
         std::to_string(plan_.buckets.size()) + " of step " + std::to_string(step_);
}

std::string BucketReducer::layout_summary() const {
  std::ostringstream s;
  s << plan_.buckets.size() << " gradient buckets of <= " << bucket_mib_ << " MiB over "
    << index_.size() << " parameters";
  return s.str();
}

}  // namespace nha::dist
