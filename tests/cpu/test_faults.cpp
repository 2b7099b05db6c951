// Fault injection: token shards and checkpoints damaged at many offsets (HDF5 metadata, the
// global heap's string lengths, data) or cut short end in an nha::Error naming the file, never a
// crash; values a file may hold but training never writes (a negative step, NaN weights, a
// negative Adam v) are refused; a shard truncated under an open reader is reported.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/testing.h"
#include "autograd/node.h"
#include "core/fileio.h"
#include "core/random.h"
#include "data/shards.h"
#include "layers/transformer.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/optim.h"

namespace fs = std::filesystem;

namespace nha {
namespace {

void overwrite_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// Offsets to damage: every 3rd byte of the first 4 KiB (user block, superblock, root object
// header), every byte of the global heap's first object header, and ~200 spread over the rest.
std::vector<size_t> damage_offsets(const std::string& bytes) {
  std::vector<size_t> out;
  for (size_t i = 0; i < std::min<size_t>(bytes.size(), 4096); i += 3) out.push_back(i);
  const size_t heap = bytes.find("GCOL");
  if (heap != std::string::npos)
    for (size_t i = heap; i < std::min(bytes.size(), heap + 40); ++i) out.push_back(i);
  for (size_t i = 4096; i < bytes.size(); i += std::max<size_t>(1, bytes.size() / 200))
    out.push_back(i);
  return out;
}

// The seal's line ends at its newline; the zero padding after it is covered by nothing (HDF5
// skips the user block), so damage there is harmless and may load.
bool in_seal_padding(const std::string& bytes, size_t offset) {
  return offset >= bytes.find('\n') && offset < size_t(kSealBytes);
}

// Runs `load` on copies of `original` damaged at every offset and cut at many lengths: each must
// throw an nha::Error (or load, for harmless padding bytes). Returns the number of files tried.
int damage_sweep(const std::string& original, const std::string& path,
          const std::function<void()>& load) {
  const std::string bytes = testing::read_file(original);
  EXPECT_GT(bytes.size(), 4096u);
  int tried = 0;
  for (size_t off : damage_offsets(bytes)) {
    std::string damaged = bytes;
    damaged[off] = char(damaged[off] ^ 0x5a);
    overwrite_file(path, damaged);
    ++tried;
    try {
      load();
      EXPECT_TRUE(in_seal_padding(bytes, off)) << "damage at byte " << off << " was not noticed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
  for (size_t len = 0; len < bytes.size(); len += std::max<size_t>(1, bytes.size() / 50)) {
    overwrite_file(path, bytes.substr(0, len));
    ++tried;
    EXPECT_THROW(load(), Error) << "cut at " << len << " bytes";
  }
  return tried;
}

class FaultTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::temp_dir("faults"); }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write_test_shard(const std::string& name) {
    std::vector<uint32_t> tokens;
    std::vector<uint64_t> offsets{0};
    for (int d = 0; d < 50; ++d) {
      for (int i = 0; i < 40; ++i) tokens.push_back(uint32_t(3 + (d * 7 + i) % 90));
      tokens.push_back(2);
      offsets.push_back(tokens.size());
    }
    data::ShardMeta m;
    m.split = "train";
    m.vocab_size = 100;
    m.eos_id = 2;
    m.tokenizer_hash = "fnv1a64:faults";
    m.tokenizer_name = "faults";
    m.sources = {"a.txt", "b.txt"};
    const std::string path = dir_ + "/" + name;
    data::write_shard(path, tokens, offsets, m);
    return path;
  }
  std::string dir_;
};

ModelConfig fault_model() {
  ModelConfig c;
  c.vocab_size = 40;
  c.d_model = 16;
  c.n_layers = 1;
  c.n_heads = 2;
  c.mlp_hidden = 32;
  return c;
}

// A model and its AdamW with non-trivial moments after one step.
struct TrainedTiny {
  LanguageModel model{fault_model(), 3};
  std::unique_ptr<AdamW> opt;
  TrainedTiny() {
    std::vector<ParamEntry> e;
    for (const NamedParameter& p : model.named_parameters()) {
      e.push_back({p.name, p.tensor, true});
      Tensor t = p.tensor;
      t.mutable_grad() = testing::randn(t.shape(), uint64_t(t.numel()), DType::F32);
    }
    opt = std::make_unique<AdamW>(e, AdamWOptions{});
    opt->step(1e-2);
  }
  TrainState state(int64_t step) const {
    TrainState s;
    s.step = step;
    s.optim_step = 1;
    s.loss_ema = 2.5;
    s.loader_state = "{}";
    s.config_yaml = "model: {}\n";
    return s;
  }
};

TEST(Seal, Xxh64MatchesTheReferenceVectors) {
  EXPECT_EQ(xxh64("", 0, 0), 0xEF46DB3751D8E999ULL);
  EXPECT_EQ(xxh64("abc", 3, 0), 0x44BC2CF5AD770999ULL);
  const char* s = "Nobody inspects the spammish repetition";  // 39 bytes: the 32-byte stripes
  EXPECT_EQ(xxh64(s, std::strlen(s), 0), 0xFBCEA83C8A378BF1ULL);
}

TEST_F(FaultTest, DamagedOrCutShardsAreRefused) {
  const std::string good = write_test_shard("good.h5");
  EXPECT_TRUE(check_seal(good, "hint"));
  EXPECT_EQ(data::TokenShard(good).size(), 50 * 41);
  const std::string bad = dir_ + "/train_000000.h5";
  const int tried = damage_sweep(good, bad, [&] { data::TokenShard shard(bad); });
  EXPECT_GT(tried, 1000);
}

TEST_F(FaultTest, DamagedOrCutCheckpointsAreRefused) {
  TrainedTiny t;
  const std::string good = dir_ + "/good.h5";
  save_checkpoint(good, t.model.named_parameters(), t.opt.get(), t.state(5));
  EXPECT_TRUE(check_seal(good, "hint"));
  const std::string bad = dir_ + "/step_00000005.h5";
  damage_sweep(good, bad, [&] { load_checkpoint(bad, t.model.named_parameters(), t.opt.get()); });
  damage_sweep(good, bad, [&] { read_train_state(bad); });
  export_parameters(good, dir_ + "/export.h5", DType::BF16);
  damage_sweep(dir_ + "/export.h5", bad, [&] { read_parameters(bad); });
}

// The crash of issue 18: one byte of the first string's length in HDF5's global heap made HDF5
// 1.10 copy gigabytes (the YAML config, the shard's format string).
TEST_F(FaultTest, GlobalHeapStringLengthIsCaughtBeforeHdf5) {
  TrainedTiny t;
  const std::string ckpt = dir_ + "/step_00000005.h5";
  save_checkpoint(ckpt, t.model.named_parameters(), t.opt.get(), t.state(5));
  for (const std::string& path : {ckpt, write_test_shard("train_000000.h5")}) {
    std::string bytes = testing::read_file(path);
    const size_t heap = bytes.find("GCOL");
    ASSERT_NE(heap, std::string::npos) << path;
    bytes[heap + 16 + 8 + 4] = 1;  // object 1's size (8 bytes at +24) gains 4 GiB
    overwrite_file(path, bytes);
    testing::expect_error([&] { read_train_state(path); }, {path, "is damaged", "HINT"});
    testing::expect_error([&] { data::read_shard_meta(path); }, {path, "is damaged", "HINT"});
    // Without a seal (files written before seals): the bounded heap walk catches it.
    overwrite_file(path, bytes.substr(size_t(kSealBytes)));
    testing::expect_error([&] { read_train_state(path); },
                          {path, "global heap", "claims 4294967", "HINT"});
    testing::expect_error([&] { data::read_shard_meta(path); }, {path, "global heap", "HINT"});
  }
}

TEST_F(FaultTest, ValuesTrainingNeverWritesAreRefused) {
  TrainedTiny t;
  const std::string path = dir_ + "/step_00000005.h5";
  auto load = [&] { load_checkpoint(path, t.model.named_parameters(), t.opt.get()); };
  save_checkpoint(path, t.model.named_parameters(), t.opt.get(), t.state(-100));
  testing::expect_error(load, {path, "step = -100", "HINT"});
  TrainState s = t.state(5);
  s.optim_step = 9;
  save_checkpoint(path, t.model.named_parameters(), t.opt.get(), s);
  testing::expect_error(load, {"optim_step"});
  s = t.state(5);
  s.loss_ema = NAN;
  save_checkpoint(path, t.model.named_parameters(), t.opt.get(), s);
  testing::expect_error(load, {"loss_ema"});

  autograd::NoGradGuard no_grad;  // in-place writes on parameters
  t.opt->v(0).fill_(-1.0);
  save_checkpoint(path, t.model.named_parameters(), t.opt.get(), t.state(5));
  testing::expect_error(load, {"optim/v/", "negative"});
  Tensor w = t.model.named_parameters()[1].tensor;
  w.fill_(INFINITY);
  save_checkpoint(path, t.model.named_parameters(), nullptr, t.state(5));
  testing::expect_error(load, {t.model.named_parameters()[1].name, "inf", "HINT"});
}

TEST_F(FaultTest, ShardAttributesOutOfRangeAreRefused) {
  data::ShardMeta m;
  m.split = "train";
  m.vocab_size = 100;
  m.eos_id = 100;  // not a token id of the vocabulary
  m.tokenizer_hash = "fnv1a64:x";
  const std::string path = dir_ + "/train_000000.h5";
  data::write_shard(path, {5, 6, 100 - 1}, {0, 3}, m);
  testing::expect_error([&] { data::read_shard_meta(path); }, {path, "eos_id = 100", "HINT"});
}

// A mapped file cut short under a running job: SIGBUS on the next read of a lost page, unless the
// reader looks first.
TEST_F(FaultTest, ShardTruncatedWhileOpenIsAnError) {
  const std::string path = write_test_shard("train_000000.h5");
  data::TokenShard shard(path);
  ASSERT_TRUE(shard.mmapped());
  std::vector<int32_t> out(100);
  shard.copy(0, 100, out.data());
  ASSERT_EQ(::truncate(path.c_str(), 1024), 0);
  testing::expect_error([&] { shard.copy(1900, 100, out.data()); },
                        {path, "changed while in use", "HINT"});
}

TEST_F(FaultTest, SkippingChecksumsStillChecksTheSize) {
  const std::string path = write_test_shard("train_000000.h5");
  std::string bytes = testing::read_file(path);
  bytes[bytes.size() - 3] = char(bytes[bytes.size() - 3] ^ 1);  // a token id, not metadata
  overwrite_file(path, bytes);
  ::setenv("NHA_SKIP_CHECKSUMS", "1", 1);
  EXPECT_FALSE(check_seal(path, "hint"));
  overwrite_file(path, bytes.substr(0, bytes.size() - 1));
  testing::expect_error([&] { check_seal(path, "hint"); }, {"cut short"});
  ::unsetenv("NHA_SKIP_CHECKSUMS");
}

// Files written before seals have no user block: the HDF5 signature at byte 0. They load as
// before (without the checksum). Dropping a sealed file's user block gives such a file.
TEST_F(FaultTest, UnsealedFilesStillLoad) {
  const std::string shard = write_test_shard("sealed.h5");
  TrainedTiny t;
  const std::string ckpt = dir_ + "/sealed_ckpt.h5";
  save_checkpoint(ckpt, t.model.named_parameters(), t.opt.get(), t.state(5));
  for (const std::string& name : {"train_000000.h5", "step_00000005.h5"}) {
    const std::string sealed = testing::read_file(name[0] == 't' ? shard : ckpt);
    overwrite_file(dir_ + "/" + name, sealed.substr(size_t(kSealBytes)));
    EXPECT_FALSE(check_seal(dir_ + "/" + name, "hint")) << name;
  }
  data::TokenShard a(shard), b(dir_ + "/train_000000.h5");
  std::vector<int32_t> x(size_t(a.size())), y(size_t(b.size()));
  a.copy(0, a.size(), x.data());
  b.copy(0, b.size(), y.data());
  EXPECT_EQ(x, y);
  EXPECT_EQ(read_train_state(dir_ + "/step_00000005.h5").step, 5);
  auto pa = read_parameters(ckpt), pb = read_parameters(dir_ + "/step_00000005.h5");
  for (auto& [name, v] : pa) EXPECT_EQ(v.to_vector<float>(), pb.at(name).to_vector<float>()) << name;
}

// Per-dataset checksums travel with the datasets into files without a seal (here: the user block
// dropped, as a repack would) and name the dataset whose bytes changed.
TEST_F(FaultTest, DatasetChecksumsNameTheDamagedDataset) {
  TrainedTiny t;
  const std::string sealed = dir_ + "/sealed.h5", path = dir_ + "/step_00000005.h5";
  save_checkpoint(sealed, t.model.named_parameters(), t.opt.get(), t.state(5));
  const NamedParameter p = t.model.named_parameters()[0];  // random values: found once
  const std::vector<float> values = p.tensor.to_vector<float>();
  std::string bytes = testing::read_file(sealed).substr(size_t(kSealBytes));
  const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(values.data()), 64));
  ASSERT_NE(at, std::string::npos);
  bytes[at + 1] = char(bytes[at + 1] ^ 0x10);  // a small change in the first value: still finite
  overwrite_file(path, bytes);
  testing::expect_error([&] { load_checkpoint(path, t.model.named_parameters(), t.opt.get()); },
                        {path, "dataset '/params/" + p.name + "' is damaged", "HINT"});

  std::string shard = testing::read_file(write_test_shard("sealed_shard.h5")).substr(size_t(kSealBytes));
  const uint16_t first[4] = {3, 4, 5, 6};  // the first tokens of write_test_shard
  const size_t tokens_at = shard.find(std::string(reinterpret_cast<const char*>(first), 8));
  ASSERT_NE(tokens_at, std::string::npos);
  shard[tokens_at] = 7;  // still a valid token id
  overwrite_file(dir_ + "/train_000000.h5", shard);
  testing::expect_error([&] { data::TokenShard s(dir_ + "/train_000000.h5"); },
                        {"train_000000.h5", "dataset '/tokens' is damaged", "HINT"});
}

// kill -9 at random moments of a process writing checkpoints back to back: every file under a
// final name is whole and loads; the temp files left behind are removed by the next run.
TEST_F(FaultTest, KillDuringCheckpointWritesLeavesOnlyWholeFiles) {
  TrainedTiny t;
  Generator gen(99);
  for (int round = 0; round < 8; ++round) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      for (int64_t s = 1; s < 100000; ++s)
        save_checkpoint(checkpoint_path(dir_, round * 100000 + s), t.model.named_parameters(),
                        t.opt.get(), t.state(5));
      ::_exit(0);
    }
    // After the round's first checkpoint (fsync makes each take a while), at a random moment.
    for (int wait = 0; wait < 1000 && !fs::exists(checkpoint_path(dir_, round * 100000 + 1)); ++wait)
      ::usleep(10000);
    ::usleep(useconds_t(gen.next_u64() % 50000));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status)) << "round " << round << ": the writer ended before the kill";
  }
  const auto written = list_checkpoints(dir_);
  EXPECT_GE(written.size(), 8u);
  for (const auto& [step, path] : written)
    EXPECT_NO_THROW(load_checkpoint(path, t.model.named_parameters(), t.opt.get())) << path;
  remove_stale_temp_files(dir_);
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
}

// A full disk, simulated in-process by the file-size limit: writes past it fail (EFBIG, or a
// short write at the limit) once SIGXFSZ is ignored.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &old_);
    rlimit lim = old_;
    lim.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &lim);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    std::signal(SIGXFSZ, old_handler_);
  }

 private:
  rlimit old_{};
  void (*old_handler_)(int) = nullptr;
};

// Every writer reports the failure with the file's name, leaves no file (final or temp) behind,
// keeps what was there, and the process exits cleanly (HDF5 used to crash at exit after its
// flush failed: ctest runs this test as its own process, so a crash at exit fails it).
TEST_F(FaultTest, FullDiskIsReportedAndLosesNothing) {
  TrainedTiny t;
  const std::string older = checkpoint_path(dir_, 5), newer = checkpoint_path(dir_, 6);
  save_checkpoint(older, t.model.named_parameters(), t.opt.get(), t.state(5));
  const std::string before = testing::read_file(older);
  const std::string metrics = dir_ + "/metrics.jsonl";
  MetricsLog log;
  log.open(metrics);
  log.write({{"type", "train"}, {"step", 1}});
  int records = 1;
  {
    FileSizeLimit limit(8192);
    testing::expect_error(
        [&] { save_checkpoint(newer, t.model.named_parameters(), t.opt.get(), t.state(6)); },
        {"step_00000006.h5", "disk full"});
    testing::expect_error([&] { write_file_atomic(older, std::string(20000, 'x')); },
                          {"step_00000005.h5", "was left as it was"});
    testing::expect_error([&] { write_test_shard("train_000000.h5"); }, {"train_000000.h5"});
    try {
      for (; records < 1000; ++records)
        log.write({{"type", "train"}, {"step", records + 1}, {"pad", std::string(100, 'p')}});
      ADD_FAILURE() << "metrics records beyond the size limit were accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("metrics.jsonl"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(testing::read_file(older), before);
  load_checkpoint(older, t.model.named_parameters(), t.opt.get());
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(dir_)) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"metrics.jsonl", "step_00000005.h5"}));
  // Only whole records, every one that write() accepted.
  std::istringstream lines(testing::read_file(metrics));
  int n = 0;
  for (std::string line; std::getline(lines, line); ++n)
    EXPECT_FALSE(nlohmann::json::parse(line, nullptr, false).is_discarded())
        << "record " << n << ": " << line;
  EXPECT_EQ(n, records);
}

}  // namespace
}  // namespace nha
