// The CPU-testable parts of data-parallel training (train/distributed.h): the autograd
// grad-ready hook, the gradient bucket plan, the launch environment, the refusals of --gpus, and
// the split of a global batch over ranks. The NCCL paths run in tests/multigpu.
#include <map>

#include "common/testing.h"
#include "train/config.h"
#include "train/distributed.h"

namespace nha {
namespace {

// ---- grad-ready hook ------------------------------------------------------------------------------

TEST(GradReadyHook, FiresOncePerLeafWithTheSummedGradient) {
  // w is used twice (like a tied embedding): the hook must see the sum of both paths, once.
  Tensor w = Tensor::from_vector<double>({1, 2, 3}, {3}).set_requires_grad(true);
  Tensor b = Tensor::from_vector<double>({0.5, 0.5, 0.5}, {3}).set_requires_grad(true);
  std::map<const TensorImpl*, int> calls;
  std::vector<double> w_grad_seen;
  {
    autograd::GradReadyHookGuard guard([&](const Tensor& leaf) {
      ++calls[leaf.impl()];
      if (leaf.same(w)) w_grad_seen = leaf.grad().to_vector<double>();
    });
    Tensor y = sum(add(mul(w, w), mul(w, b)));  // dy/dw = 2w + b, dy/db = w
    y.backward();
  }
  EXPECT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[w.impl()], 1);
  EXPECT_EQ(calls[b.impl()], 1);
  EXPECT_EQ(w_grad_seen, (std::vector<double>{2.5, 4.5, 6.5}));

  // Outside the guard the hook is gone; a second backward accumulates as before.
  calls.clear();
  sum(mul(w, b)).backward();
  EXPECT_TRUE(calls.empty());
  EXPECT_EQ(w.grad().to_vector<double>(), (std::vector<double>{3.0, 5.0, 7.0}));
}

TEST(GradReadyHook, GuardsNestAndRestore) {
  Tensor w = Tensor::from_vector<double>({1, 2}, {2}).set_requires_grad(true);
  int outer = 0, inner = 0;
  autograd::GradReadyHookGuard a([&](const Tensor&) { ++outer; });
  {
    autograd::GradReadyHookGuard b([&](const Tensor&) { ++inner; });
    sum(w).backward();
  }
  sum(w).backward();
  EXPECT_EQ(inner, 1);
  EXPECT_EQ(outer, 1);
}

// ---- bucket plan ----------------------------------------------------------------------------------

TEST(BucketPlan, ReverseOrderAlignedAndCapped) {
  // Registration order: embedding-like 1000, then 3 small, then a head-like 1000.
  const std::vector<int64_t> numels = {1000, 10, 70, 5, 1000};
  const BucketPlan plan = plan_buckets(numels, /*bucket_elements=*/256, /*align=*/64);
  // Layout (reverse): p4 [0, 1024), p3 [1024, 1088), p2 [1088, 1216), p1 [1216, 1280), p0 [1280, 2304)
  EXPECT_EQ(plan.offset, (std::vector<int64_t>{1280, 1216, 1088, 1024, 0}));
  EXPECT_EQ(plan.total, 2304);
  // p4 alone exceeds the cap: its own bucket; p3..p1 fit in 256; p0 alone.
  ASSERT_EQ(plan.buckets.size(), 3u);
  EXPECT_EQ(plan.buckets[0].params, (std::vector<size_t>{4}));
  EXPECT_EQ(plan.buckets[1].params, (std::vector<size_t>{3, 2, 1}));
  EXPECT_EQ(plan.buckets[2].params, (std::vector<size_t>{0}));
  EXPECT_EQ(plan.bucket_of, (std::vector<size_t>{2, 1, 1, 1, 0}));
  // The buckets tile the buffer.
  int64_t pos = 0;
  for (const GradBucket& b : plan.buckets) {
    EXPECT_EQ(b.begin, pos);
    EXPECT_GT(b.end, b.begin);
    pos = b.end;
  }
  EXPECT_EQ(pos, plan.total);
  for (size_t i = 0; i < numels.size(); ++i) {
    EXPECT_EQ(plan.offset[i] % 64, 0);
    const GradBucket& b = plan.buckets[plan.bucket_of[i]];
    EXPECT_GE(plan.offset[i], b.begin);
    EXPECT_LE(plan.offset[i] + numels[i], b.end);
  }
}

TEST(BucketPlan, LargeCapGivesOneBucketAndEmptyModelNone) {
  const BucketPlan one = plan_buckets({3, 4, 5}, 1 << 20, 1);
  ASSERT_EQ(one.buckets.size(), 1u);
  EXPECT_EQ(one.total, 12);
  EXPECT_EQ(one.offset, (std::vector<int64_t>{9, 5, 0}));
  EXPECT_TRUE(plan_buckets({}, 100).buckets.empty());
}

TEST(BucketPlan, ShardSlicesSplitEveryBucketEqually) {
  // ZeRO-1 over 2 ranks: offsets aligned to 128, so every bucket splits into two slices of whole
  // multiples of 64 elements.
  const std::vector<int64_t> numels = {1000, 10, 70, 5, 1000};
  const BucketPlan plan = plan_buckets(numels, 256, flat_align(2));
  const auto s0 = shard_slices(plan, 0, 2), s1 = shard_slices(plan, 1, 2);
  ASSERT_EQ(s0.size(), plan.buckets.size());
  int64_t kept = 0;
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    const GradBucket& bucket = plan.buckets[b];
    EXPECT_EQ(s0[b].begin, bucket.begin);
    EXPECT_EQ(s0[b].size, s1[b].size);
    EXPECT_EQ(s1[b].begin, bucket.begin + s0[b].size);
    EXPECT_EQ(s1[b].begin + s1[b].size, bucket.end);
    EXPECT_EQ(s0[b].size % 64, 0);
    EXPECT_EQ(s0[b].shard_offset, kept);
    EXPECT_EQ(s1[b].shard_offset, kept);
    kept += s0[b].size;
  }
  EXPECT_EQ(2 * kept, plan.total);
  // One shard: the buckets themselves.
  const auto whole = shard_slices(plan, 0, 1);
  for (size_t b = 0; b < plan.buckets.size(); ++b)
    EXPECT_EQ(whole[b].size, plan.buckets[b].end - plan.buckets[b].begin);
}

// ---- launch environment ---------------------------------------------------------------------------

dist::EnvLookup env_of(const std::map<std::string, std::string>& vars) {
  return [vars](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

TEST(LaunchEnv, SingleGpusAndMpi) {
  const dist::LaunchInfo none = dist::launch_info_from_env(env_of({}));
  EXPECT_EQ(none.launcher, dist::Launcher::None);
  EXPECT_FALSE(none.distributed());

  // What --gpus gives its children parses back to the same rank.
  std::map<std::string, std::string> vars;
  for (const auto& [k, v] : dist::rank_environment(2, 4, "/run/.nccl-id.7")) vars[k] = v;
  const dist::LaunchInfo g = dist::launch_info_from_env(env_of(vars));
  EXPECT_EQ(g.launcher, dist::Launcher::Gpus);
  EXPECT_EQ(g.rank, 2);
  EXPECT_EQ(g.world_size, 4);
  EXPECT_EQ(g.local_rank, 2);
  EXPECT_EQ(g.rendezvous, "/run/.nccl-id.7");
  EXPECT_TRUE(g.distributed());

  const dist::LaunchInfo m = dist::launch_info_from_env(env_of(
      {{"OMPI_COMM_WORLD_SIZE", "16"}, {"OMPI_COMM_WORLD_RANK", "9"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}));
  EXPECT_EQ(m.launcher, dist::Launcher::Mpi);
  EXPECT_EQ(m.rank, 9);
  EXPECT_EQ(m.world_size, 16);
  EXPECT_EQ(m.local_rank, 1);
}

TEST(LaunchEnv, MalformedValuesAreRefused) {
  testing::expect_error([] { dist::launch_info_from_env(env_of({{"NHA_RANK", "x"}, {"NHA_WORLD_SIZE", "2"}})); },
               {"NHA_RANK", "not a non-negative integer", "HINT"});
  testing::expect_error([] {
    dist::launch_info_from_env(env_of({{"NHA_RANK", "2"}, {"NHA_WORLD_SIZE", "2"}, {"NHA_RENDEZVOUS", "f"}}));
  }, {"NHA_WORLD_SIZE", "HINT"});
  testing::expect_error([] { dist::launch_info_from_env(env_of({{"NHA_RANK", "1"}, {"NHA_WORLD_SIZE", "2"}})); },
               {"NHA_RENDEZVOUS"});
}

TEST(LaunchEnv, GpusRequestRefusals) {
  const dist::LaunchInfo single;
  dist::check_gpus_request(1, 0, single);  // one process: always fine (CPU or GPU)
  testing::expect_error([&] { dist::check_gpus_request(0, 8, single); }, {"--gpus 0", "HINT"});
  dist::LaunchInfo mpi;
  mpi.launcher = dist::Launcher::Mpi;
  mpi.world_size = 2;
  testing::expect_error([&] { dist::check_gpus_request(2, 8, mpi); }, {"mpirun", "HINT"});
  if (!dist::nccl_built()) {
    testing::expect_error([&] { dist::check_gpus_request(2, 8, single); }, {"NCCL", "HINT"});
  } else {
    dist::check_gpus_request(2, 2, single);
    testing::expect_error([&] { dist::check_gpus_request(4, 2, single); }, {"2 GPU(s) are visible", "--gpus 2"});
  }
}

TEST(LaunchEnv, JoiningWithoutNcclIsRefused) {
  if (dist::nccl_built()) GTEST_SKIP() << "this build has NCCL (the join needs GPUs: tests/multigpu)";
  dist::LaunchInfo g;
  g.launcher = dist::Launcher::Gpus;
  g.world_size = 2;
  g.rendezvous = "x";
  testing::expect_error([&] { dist::join_process_group(g, false, 10); }, {"without NCCL", "HINT"});
}

TEST(LaunchEnv, CpuRanksNeedMpirun) {
  dist::LaunchInfo g;
  g.launcher = dist::Launcher::Gpus;
  g.world_size = 2;
  g.rendezvous = "x";
  testing::expect_error([&] { dist::join_process_group(g, true, 10); },
                        {"communicate over MPI", "--ranks 2"});
}

// ---- split of the global batch --------------------------------------------------------------------

TEST(BatchSplit, EveryRankRunsWholeMicroBatches) {
  TrainConfig t;
  t.seq_len = 128;
  t.micro_batch = 4;
  t.global_batch_tokens = 128 * 32;  // 32 rows
  for (int world : {1, 2, 4, 8}) {
    t.check_world_size(world, "test.yaml");
    EXPECT_EQ(t.accumulation_steps(world) * t.micro_batch * world * t.seq_len, t.global_batch_tokens);
  }
  testing::expect_error([&] { t.check_world_size(3, "test.yaml"); },
               {"test.yaml", "train.global_batch_tokens", "x 3", "HINT", "global_batch_tokens=3072"});
  testing::expect_error([&] { t.check_world_size(16, "test.yaml"); }, {"HINT", "global_batch_tokens=8192"});
  // ZeRO-1 shards over ranks: one rank has nothing to shard.
  t.zero = 1;
  t.check_world_size(2, "test.yaml");
  testing::expect_error([&] { t.check_world_size(1, "test.yaml"); },
                        {"test.yaml", "train.zero is 1", "one rank", "HINT: --set train.zero=0"});
}

}  // namespace
}  // namespace nha
