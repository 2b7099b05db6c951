// Flat gradients: every parameter's gradient a view of one buffer, laid out in buckets. The
// single-process trainer uses it with one bucket (AdamW and clipping then run over one buffer);
// the data-parallel reducer (train/distributed.h) all-reduces it bucket by bucket.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace nha {

struct GradBucket {
  int64_t begin = 0, end = 0;   // element range [begin, end) of the flat gradient buffer
  std::vector<size_t> params;   // parameter indices, in layout order
};

struct BucketPlan {
  std::vector<int64_t> offset;     // (P,) element offset of parameter i's gradient in the buffer
  std::vector<size_t> bucket_of;   // (P,) bucket of parameter i
  std::vector<GradBucket> buckets; // consecutive ranges that tile [0, total)
  int64_t total = 0;               // elements of the flat buffer, padding included
};

// Lays out P gradients of numels[i] elements (registration order) in one flat buffer, in
// reverse order, each offset a multiple of `align` elements (aligned vector loads, and NCCL's
// fast path). A bucket takes parameters until the next one would take it past
// `bucket_elements`; a larger parameter gets a bucket of its own.
BucketPlan plan_buckets(const std::vector<int64_t>& numels, int64_t bucket_elements,
                        int64_t align = 64);

// The alignment (elements) of every offset of the flat layout when ZeRO-1 splits each bucket into
// `shards` equal slices (1: no sharding): 64 x shards, so that every bucket, whose ends are
// offsets, splits into slices of whole multiples of 64 elements.
int64_t flat_align(int shards);

// One slice of a bucket that a rank owns under ZeRO-1: flat elements [begin, begin + size), kept
// compactly at [shard_offset, shard_offset + size) of the rank's shard buffers.
struct ShardSlice {
  int64_t begin = 0, size = 0, shard_offset = 0;
};
// Slice `rank` of every bucket of `plan` split into `shards` equal parts (each bucket's size must
// be a multiple of shards: plan_buckets with align flat_align(shards)), in bucket order. With one
// shard: the buckets themselves.
std::vector<ShardSlice> shard_slices(const BucketPlan& plan, int rank, int shards);

// The gradients of `params` (contiguous tensors of one dtype on one device) as views of one flat
// buffer laid out by plan_buckets(numels, bucket_elements, align): the data-parallel reducer
// all-reduces it bucket by bucket, and single-process training uses it with one bucket. AdamW
// lays its flat parameters out the same way (train/optim.h), so it reads this buffer as it is,
// and clip_grad_norm_flat sees every gradient in one reduction. Every gradient is defined from the
// start (zeros): a parameter that gets no gradient in a step is updated with a zero gradient
// (its moments decay), as under data parallelism.
class FlatGrads {
 public:
  FlatGrads(const std::vector<Tensor>& params, int64_t bucket_elements, int64_t align = 64);
  // Zeroes the buffer (padding included) and makes every grad() its view again; the next
  // backward accumulates into it.
  void zero_grad();
  const BucketPlan& plan() const { return plan_; }
  Tensor& buffer() { return flat_; }  // (plan().total,) in the parameters' dtype
  // Whether parameter i's gradient is still its view of the buffer.
  bool holds(size_t i) const;

 private:
  std::vector<Tensor> params_;
  BucketPlan plan_;
  Tensor flat_;                // (plan_.total,) every gradient, bucket after bucket
  std::vector<Tensor> views_;  // (P,) flat_[offset_i, offset_i + numel_i) shaped like param i
};

}  // namespace nha
