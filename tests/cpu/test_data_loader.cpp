// Data, loader side, on synthetic shards (no tokenizer needed): windows, determinism, rank split,
// resume, epoch coverage, validation iteration, refusals.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "common/testing.h"
#include "data/loader.h"
#include "data/shards.h"

namespace fs = std::filesystem;

namespace nha::data {
namespace {

constexpr int64_t kVocab = 1000;
constexpr int32_t kEos = 2;

// Token at global position p of the synthetic corpus (never EOS; EOS is placed at document ends).
uint32_t synthetic_token(int64_t p) { return uint32_t(3 + (p * 7919) % (kVocab - 3)); }

// Writes `docs_per_shard` documents of lengths 5..120 per shard. Returns the shard paths.
std::vector<std::string> make_shards(const std::string& dir, const std::string& split, int shards,
                                     int docs_per_shard, const std::string& hash = "fnv1a64:test",
                                     int64_t vocab = kVocab) {
  fs::create_directories(dir);
  std::vector<std::string> paths;
  int64_t p = 0;
  for (int s = 0; s < shards; ++s) {
    std::vector<uint32_t> tokens;
    std::vector<uint64_t> offsets{0};
    for (int d = 0; d < docs_per_shard; ++d) {
      int64_t len = 5 + (d * 37 + s * 11) % 116;
      for (int64_t i = 0; i < len; ++i) tokens.push_back(synthetic_token(p++));
      tokens.push_back(kEos);
      offsets.push_back(tokens.size());
    }
    ShardMeta m;
    m.split = split;
    m.shard_index = s;
    m.vocab_size = vocab;
    m.eos_id = kEos;
    m.tokenizer_hash = hash;
    m.tokenizer_name = "synthetic";
    m.token_bytes = 2;
    m.sources = {"synthetic"};
    char name[64];
    std::snprintf(name, sizeof(name), "/%s_%06d.h5", split.c_str(), s);
    write_shard(dir + name, tokens, offsets, m);
    paths.push_back(dir + name);
  }
  return paths;
}

class DataLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() / ("nha_test_loader_" + std::to_string(::getpid()))).string();
    fs::remove_all(dir_);
    make_shards(dir_, "train", 3, 200);
    make_shards(dir_, "val", 1, 100);
    train_ = ShardSet::open(dir_, "train");
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string dir_;
  std::shared_ptr<const ShardSet> train_;
};

std::vector<int32_t> rows(const Tensor& t) { return t.to_vector<int32_t>(); }

TEST_F(DataLoaderTest, WindowsAreShiftedSlicesOfTheShards) {
  const int64_t T = 64;
  for (SampleMode mode : {SampleMode::Random, SampleMode::DocAligned, SampleMode::Epoch}) {
    LoaderOptions o;
    o.seq_len = T;
    o.global_batch = 8;
    o.mode = mode;
    TrainLoader loader(train_, o);
    for (int step = 0; step < 3; ++step) {
      Batch b = loader.next();
      ASSERT_EQ(b.inputs.shape(), (Shape{8, T}));
      ASSERT_EQ(b.targets.shape(), (Shape{8, T}));
      EXPECT_EQ(b.inputs.dtype(), DType::I32);
      EXPECT_EQ(b.step, step);
      std::vector<int32_t> in = rows(b.inputs), tg = rows(b.targets);
      for (int64_t r = 0; r < 8; ++r) {
        WindowRef w = loader.sampler().window(step * 8 + r);
        const TokenShard& shard = *train_->shards()[size_t(w.shard)];
        ASSERT_LE(w.start + T + 1, shard.size());
        for (int64_t t = 0; t < T; ++t) {
          ASSERT_EQ(in[size_t(r * T + t)], int32_t(shard.token(w.start + t)));
          ASSERT_EQ(tg[size_t(r * T + t)], int32_t(shard.token(w.start + t + 1)));
        }
        if (mode == SampleMode::DocAligned)
          EXPECT_TRUE(w.start == 0 || shard.token(w.start - 1) == uint32_t(kEos))
              << "document-aligned windows start after an EOS";
        if (mode == SampleMode::Epoch) EXPECT_EQ(w.start % T, 0);
      }
    }
  }
}

TEST_F(DataLoaderTest, DeterministicFromSeedAndStep) {
  LoaderOptions o;
  o.seq_len = 32;
  o.global_batch = 4;
  o.seed = 7;
  TrainLoader a(train_, o), b(train_, o);
  o.seed = 8;
  TrainLoader c(train_, o);
  bool differs = false;
  for (int step = 0; step < 5; ++step) {
    Batch x = a.next(), y = b.next(), z = c.next();
    EXPECT_EQ(rows(x.inputs), rows(y.inputs));
    EXPECT_EQ(rows(x.targets), rows(y.targets));
    differs |= rows(x.inputs) != rows(z.inputs);
  }
  EXPECT_TRUE(differs) << "another seed gives other windows";
  // Prefetching is invisible: the same batches as the synchronous path.
  o.seed = 7;
  o.prefetch = 0;
  TrainLoader sync(train_, o);
  o.prefetch = 2;
  TrainLoader pre(train_, o);
  for (int step = 0; step < 6; ++step) EXPECT_EQ(rows(sync.next().inputs), rows(pre.next().inputs));
}

TEST_F(DataLoaderTest, RanksSplitTheSameGlobalBatch) {
  for (SampleMode mode : {SampleMode::Random, SampleMode::DocAligned, SampleMode::Epoch}) {
    LoaderOptions o;
    o.seq_len = 16;
    o.global_batch = 8;
    o.seed = 3;
    o.mode = mode;
    TrainLoader single(train_, o);
    std::vector<std::vector<int32_t>> global;
    for (int step = 0; step < 4; ++step) global.push_back(rows(single.next().inputs));
    for (int world : {2, 4}) {
      std::vector<std::vector<int32_t>> joined(4);
      for (int rank = 0; rank < world; ++rank) {
        LoaderOptions ro = o;
        ro.world_size = world;
        ro.rank = rank;
        TrainLoader loader(train_, ro);
        EXPECT_EQ(loader.local_batch(), 8 / world);
        for (int step = 0; step < 4; ++step) {
          std::vector<int32_t> part = rows(loader.next().inputs);
          joined[size_t(step)].insert(joined[size_t(step)].end(), part.begin(), part.end());
        }
      }
      for (int step = 0; step < 4; ++step)
        EXPECT_EQ(joined[size_t(step)], global[size_t(step)])
            << "world " << world << " mode " << sample_mode_name(mode) << " step " << step;
    }
  }
  LoaderOptions bad;
  bad.global_batch = 6;
  bad.world_size = 4;
  EXPECT_THROW(TrainLoader(train_, bad), Error);
}

TEST_F(DataLoaderTest, ResumesFromSavedState) {
  LoaderOptions o;
  o.seq_len = 32;
  o.global_batch = 4;
  o.seed = 11;
  o.mode = SampleMode::Epoch;
  TrainLoader a(train_, o);
  for (int i = 0; i < 7; ++i) a.next();
  nlohmann::json saved = a.state().to_json();
  std::vector<std::vector<int32_t>> expect;
  for (int i = 0; i < 5; ++i) expect.push_back(rows(a.next().targets));

  TrainLoader b(train_, o);
  b.next();  // some other position, with batches already prefetched
  b.restore(LoaderState::from_json(nlohmann::json::parse(saved.dump())));
  EXPECT_EQ(b.state().step, 7);
  for (int i = 0; i < 5; ++i) {
    Batch x = b.next();
    EXPECT_EQ(x.step, 7 + i);
    EXPECT_EQ(rows(x.targets), expect[size_t(i)]);
  }
  // A state from other settings or other data is refused.
  LoaderState wrong = LoaderState::from_json(saved);
  wrong.seq_len = 64;
  EXPECT_THROW(b.restore(wrong), Error);
  wrong = LoaderState::from_json(saved);
  wrong.data_id = "fnv1a64:other/123";
  EXPECT_THROW(b.restore(wrong), Error);
  EXPECT_THROW(LoaderState::from_json(nlohmann::json{{"step", 3}}), Error);
}

TEST_F(DataLoaderTest, EpochModeVisitsEveryWindowOncePerEpoch) {
  const int64_t T = 50;
  LoaderOptions o;
  o.seq_len = T;
  o.global_batch = 1;
  o.mode = SampleMode::Epoch;
  TrainLoader loader(train_, o);
  const int64_t W = loader.sampler().candidates();
  int64_t expect = 0;
  for (const auto& s : train_->shards()) expect += (s->size() - 1) / T;
  ASSERT_EQ(W, expect);
  std::vector<std::pair<int32_t, int64_t>> order[2];
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::set<std::pair<int32_t, int64_t>> seen;
    for (int64_t i = 0; i < W; ++i) {
      WindowRef w = loader.sampler().window(epoch * W + i);
      seen.insert({w.shard, w.start});
      order[epoch].push_back({w.shard, w.start});
    }
    EXPECT_EQ(int64_t(seen.size()), W) << "epoch " << epoch << " repeats a window";
  }
  EXPECT_NE(order[0], order[1]) << "every epoch has its own order";
  for (uint64_t n : {1ull, 2ull, 3ull, 17ull, 1000ull, 4099ull}) {
    std::set<uint64_t> image;
    for (uint64_t i = 0; i < n; ++i) image.insert(permute_index(i, n, 99));
    EXPECT_EQ(image.size(), n);
    EXPECT_LT(*image.rbegin(), n);
  }
}

TEST_F(DataLoaderTest, ValidationIsSequentialAndSplitOverRanks) {
  auto val = ShardSet::open(dir_, "val");
  const int64_t T = 40, n = val->shards()[0]->size();
  ValLoader all(val, T, 3);
  EXPECT_EQ(all.num_windows(), (n - 1) / T);
  Batch b;
  int64_t rows_seen = 0;
  while (all.next(b)) {
    std::vector<int32_t> in = rows(b.inputs), tg = rows(b.targets);
    for (int64_t r = 0; r < b.inputs.size(0); ++r, ++rows_seen)
      for (int64_t t = 0; t < T; ++t) {
        ASSERT_EQ(in[size_t(r * T + t)], int32_t(val->shards()[0]->token(rows_seen * T + t)));
        ASSERT_EQ(tg[size_t(r * T + t)], int32_t(val->shards()[0]->token(rows_seen * T + t + 1)));
      }
  }
  EXPECT_EQ(rows_seen, all.num_windows());
  all.reset();
  EXPECT_TRUE(all.next(b));
  // Rank r of 2 gets global windows r, r+2, r+4, ...: disjoint, together all of them.
  int64_t total = 0;
  for (int rank = 0; rank < 2; ++rank) {
    ValLoader part(val, T, 3, 2, rank);
    int64_t i = 0;
    while (part.next(b)) {
      std::vector<int32_t> in = rows(b.inputs);
      for (int64_t r = 0; r < b.inputs.size(0); ++r, ++i) {
        int64_t g = rank + 2 * i;
        ASSERT_EQ(in[size_t(r * T)], int32_t(val->shards()[0]->token(g * T)));
      }
    }
    EXPECT_EQ(i, part.rank_windows());
    total += i;
  }
  EXPECT_EQ(total, all.num_windows());
  ValLoader capped(val, T, 4, 1, 0, 5);
  EXPECT_EQ(capped.num_windows(), 5);
  EXPECT_THROW(ValLoader(val, n, 1), Error) << "no window of n+1 tokens fits";
}

TEST_F(DataLoaderTest, RefusesMixedOrDamagedShards) {
  std::string other = dir_ + "/other";
  std::vector<std::string> a = make_shards(other, "train", 1, 10, "fnv1a64:aaaa");
  std::vector<std::string> b = make_shards(other + "/b", "train", 1, 10, "fnv1a64:bbbb");
  try {
    ShardSet::open_files({a[0], b[0]});
    ADD_FAILURE() << "mixed tokenizers accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("different tokenizers"), std::string::npos) << e.what();
  }
  // A token id beyond the declared vocabulary is caught before it reaches the model.
  std::vector<std::string> bad = make_shards(other + "/c", "train", 1, 10, "fnv1a64:c", 50);
  LoaderOptions o;
  o.seq_len = 8;
  o.global_batch = 2;
  o.prefetch = 0;
  TrainLoader loader(ShardSet::open_files(bad), o);
  EXPECT_THROW(loader.next(), Error);
  o.prefetch = 2;  // errors cross the prefetch thread
  TrainLoader pre(ShardSet::open_files(bad), o);
  EXPECT_THROW(pre.next(), Error);
  // Not an HDF5 file / truncated file.
  std::string junk = other + "/junk.h5";
  { std::ofstream(junk) << "not hdf5"; }
  EXPECT_THROW(TokenShard{junk}, Error);
  EXPECT_THROW(ShardSet::open(dir_ + "/nowhere", "train"), Error);
  o.seq_len = 100000;
  EXPECT_THROW(TrainLoader(train_, o), Error) << "windows longer than every shard";
}

}  // namespace
}  // namespace nha::data
