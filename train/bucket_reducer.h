// What every gradient reducer of train/distributed.h shares, whatever carries the bytes (NCCL on
// GPUs, MPI on CPUs): the flat gradient buffer in buckets, counting which gradients of a bucket
// are final in the last backward of a step, and starting the buckets in the same order on every
// rank. A backend says how one bucket is averaged over the ranks (start_bucket) and how to wait
// for all of them (wait_all), and carries ZeRO-1's all-gather and gather.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "train/distributed.h"
#include "train/flat_grads.h"

namespace nha::dist {

class BucketReducer : public GradReducer {
 public:
  // Takes over the gradients of `params` (fp32 master weights on `device`); buckets of at most
  // bucket_elements. zero: ZeRO-1 over `world` ranks, this one being `rank` (see GradReducer).
  BucketReducer(const std::vector<Tensor>& params, Device device, int64_t bucket_elements,
                int rank, int world, bool zero);

  void begin(int64_t step) final;
  void grad_ready(const Tensor& leaf) final;
  void finish() final;
  void zero_grad() final { grads_.zero_grad(); }
  FlatGrads& grads() final { return grads_; }
  Tensor& grad_shard() final { return shard_; }
  void start_all_gather(Tensor& flat, size_t b) final;
  void gather_to_root(const Tensor& shard, Tensor& full) final;

 protected:
  // Starts averaging bucket b's gradients over the ranks (they are final): in place, or under
  // ZeRO-1 this rank's slice into grad_shard().
  virtual void start_bucket(size_t b) = 0;
  // Returns when every started bucket is averaged (or, on a GPU, makes the compute stream wait).
  virtual void wait_all() = 0;
  // The collectives of start_all_gather() (bucket b of `flat`) and gather_to_root() (every bucket),
  // arguments checked.
  virtual void all_gather_bucket(float* flat, size_t b) = 0;
  virtual void gather_buckets(const float* shard, float* full) = 0;

  bool zero() const { return zero_; }
  int rank() const { return rank_; }
  int world() const { return world_; }
  // Bucket b's gradients: (end - begin,) f32 of the flat buffer.
  float* bucket_data(size_t b);
  int64_t bucket_begin(size_t b) const { return plan_.buckets[b].begin; }
  int64_t bucket_size(size_t b) const;
  // ZeRO-1: elements of one rank's slice of bucket b, and where this rank's slices of bucket b
  // sit in a shard buffer.
  int64_t slice_size(size_t b) const { return bucket_size(b) / world_; }
  int64_t shard_offset(size_t b) const { return slices_[b].shard_offset; }
  size_t num_buckets() const { return plan_.buckets.size(); }
  // "the all-reduce of gradient bucket 3/9 of step 12" (reduce-scatter under ZeRO-1), for timeout
  // messages.
  std::string bucket_name(size_t b) const;
  // "9 gradient buckets of <= 25 MiB over 123 parameters"
  std::string layout_summary() const;

 private:
  const int rank_, world_;
  const bool zero_;
  FlatGrads grads_;               // f32 (plan_.total,): every gradient, bucket after bucket
  const BucketPlan& plan_;        // grads_.plan()
  std::vector<ShardSlice> slices_;  // (buckets,) this rank's slices (ZeRO-1), else empty
  Tensor shard_;                  // f32 (total / world,) ZeRO-1's averaged slices, else undefined
  double bucket_mib_ = 0;
  std::unordered_map<const TensorImpl*, size_t> index_;  // parameter -> index
  std::vector<int64_t> waiting_;  // per bucket: gradients not yet final in this backward
  size_t next_ = 0;               // buckets [0, next_) are started (in order on every rank)
  int64_t step_ = -1;             // the step being reduced; -1 outside begin() .. finish()
};

}  // namespace nha::dist
