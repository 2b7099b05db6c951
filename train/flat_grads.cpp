#include "train/flat_grads.h"

#include "core/error.h"

namespace nha {

BucketPlan plan_buckets(const std::vector<int64_t>& numels, int64_t bucket_elements, int64_t align) {
  NHA_CHECK(bucket_elements > 0 && align > 0)
      << "plan_buckets: bucket size " << bucket_elements << " and alignment " << align;
  BucketPlan plan;
  const size_t P = numels.size();
  plan.offset.assign(P, 0);
  plan.bucket_of.assign(P, 0);
  int64_t pos = 0;
  for (size_t k = 0; k < P; ++k) {
    const size_t i = P - 1 - k;  // reverse registration order: the backward's order
    const int64_t size = (numels[i] + align - 1) / align * align;
    // A new bucket when this gradient would take the current one past the cap (every bucket
    // holds at least one gradient, so a gradient larger than the cap gets a bucket of its own).
    if (plan.buckets.empty() || pos + size - plan.buckets.back().begin > bucket_elements) {
      if (!plan.buckets.empty()) plan.buckets.back().end = pos;
      plan.buckets.push_back({pos, pos, {}});
    }
    plan.offset[i] = pos;
    plan.bucket_of[i] = plan.buckets.size() - 1;
    plan.buckets.back().params.push_back(i);
    pos += size;
  }
  if (!plan.buckets.empty()) plan.buckets.back().end = pos;
  plan.total = pos;
  return plan;
}

int64_t flat_align(int shards) { return 64 * int64_t(shards); }

std::vector<ShardSlice> shard_slices(const BucketPlan& plan, int rank, int shards) {
  NHA_CHECK(shards >= 1 && rank >= 0 && rank < shards)
      << "shard_slices: rank " << rank << " of " << shards;
  std::vector<ShardSlice> slices;
  int64_t shard_offset = 0;
  for (const GradBucket& b : plan.buckets) {
    const int64_t size = b.end - b.begin;
    NHA_CHECK(size % shards == 0) << "internal: a bucket of " << size << " elements does not split "
                                  << "into " << shards << " equal slices";
    const int64_t slice = size / shards;
    slices.push_back({b.begin + rank * slice, slice, shard_offset});
    shard_offset += slice;
  }
  return slices;
}

FlatGrads::FlatGrads(const std::vector<Tensor>& params, int64_t bucket_elements, int64_t align)
    : params_(params) {
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    NHA_CHECK(p.defined() && is_floating(p.dtype()) && p.is_contiguous() &&
              p.dtype() == params_[0].dtype() && p.device() == params_[0].device())
        << "flat gradients: parameter " << i << " is " << (p.defined() ? p.str() : "undefined")
        << ", expected a contiguous tensor of the first one's dtype and device ("
        << params_[0].str() << ")";
    numels.push_back(p.numel());
  }
  plan_ = plan_buckets(numels, bucket_elements, align);
  const DType dtype = params_.empty() ? DType::F32 : params_[0].dtype();
  const Device device = params_.empty() ? Device::cpu() : params_[0].device();
  flat_ = Tensor::zeros({plan_.total}, dtype, device);  // (total,)
  for (size_t i = 0; i < params_.size(); ++i) {
    const Shape& shape = params_[i].shape();
    views_.push_back(make_view(flat_, shape, contiguous_strides(shape),
                               flat_.impl()->offset + plan_.offset[i]));
    params_[i].mutable_grad() = views_.back();
  }
}

void FlatGrads::zero_grad() {
  flat_.zero_();
  for (size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = views_[i];
}

bool FlatGrads::holds(size_t i) const {
  const Tensor& g = params_.at(i).grad();
  return g.defined() && g.impl()->storage == flat_.impl()->storage &&
         g.impl()->offset == views_[i].impl()->offset;
}

}  // namespace nha
