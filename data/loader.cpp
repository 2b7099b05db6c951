#include "data/loader.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/random.h"
#include "data/tokenizer.h"

namespace nha::data {

// ---- ShardSet ----------------------------------------------------------------------------------

std::shared_ptr<const ShardSet> ShardSet::open(const std::string& dir, const std::string& split) {
  std::vector<std::string> paths = find_shards(dir, split);
  NHA_CHECK(!paths.empty()) << "no " << split << " shards (" << split << "_*.h5) in '" << dir
                            << "'. HINT: create them with `nha prepare --out " << dir
                            << "`; a val split needs --val-fraction > 0";
  return open_files(paths);
}

std::shared_ptr<const ShardSet> ShardSet::open_files(const std::vector<std::string>& paths) {
  NHA_CHECK(!paths.empty()) << "no token shards given. HINT: pass files written by `nha prepare`";
  auto set = std::make_shared<ShardSet>();
  for (const std::string& p : paths) {
    set->shards_.push_back(std::make_unique<TokenShard>(p));
    const ShardMeta& m = set->shards_.back()->meta();
    const ShardMeta& first = set->shards_.front()->meta();
    NHA_CHECK(m.tokenizer_hash == first.tokenizer_hash && m.vocab_size == first.vocab_size &&
              m.eos_id == first.eos_id)
        << "shards '" << paths.front() << "' and '" << p << "' were made with different tokenizers ("
        << first.tokenizer_hash << " vocab " << first.vocab_size << " vs " << m.tokenizer_hash
        << " vocab " << m.vocab_size << "). HINT: re-run `nha prepare` on all inputs with one "
        << "tokenizer";
    set->num_tokens_ += m.num_tokens;
    set->num_documents_ += m.num_documents;
  }
  const ShardMeta& first = set->shards_.front()->meta();
  set->vocab_size_ = first.vocab_size;
  set->eos_id_ = int32_t(first.eos_id);
  set->tokenizer_hash_ = first.tokenizer_hash;
  set->description_ = paths.size() == 1 ? paths[0]
                                        : paths[0] + " (+" + std::to_string(paths.size() - 1) +
                                              " more shards)";
  return set;
}

void ShardSet::check_tokenizer(const Tokenizer& tok) const {
  NHA_CHECK(tok.vocab_size() == vocab_size_ && tok.hash_hex() == tokenizer_hash_)
      << "tokenizer '" << tok.name() << "' (vocab " << tok.vocab_size() << ", " << tok.hash_hex()
      << ") is not the one the shards " << description_ << " were made with (vocab " << vocab_size_
      << ", " << tokenizer_hash_ << "). HINT: use the same tokenizer .model as `nha prepare`, or "
      << "re-run `nha prepare` with this one";
}

void ShardSet::check_model_vocab(int64_t model_vocab_size) const {
  NHA_CHECK(model_vocab_size >= vocab_size_)
      << "the model's vocab_size " << model_vocab_size << " is smaller than the vocabulary of the "
      << "shards " << description_ << " (" << vocab_size_ << "): token ids would index past the "
      << "embedding. HINT: set model.vocab_size >= " << vocab_size_;
}

// ---- sampling ----------------------------------------------------------------------------------

SampleMode sample_mode_from_name(const std::string& name) {
  if (name == "random") return SampleMode::Random;
  if (name == "doc_aligned" || name == "doc-aligned" || name == "document") return SampleMode::DocAligned;
  if (name == "epoch") return SampleMode::Epoch;
  NHA_FAIL() << "unknown sampling mode '" << name
             << "'. HINT: use random, doc_aligned or epoch";
}

const char* sample_mode_name(SampleMode mode) {
  switch (mode) {
    case SampleMode::Random: return "random";
    case SampleMode::DocAligned: return "doc_aligned";
    case SampleMode::Epoch: return "epoch";
  }
  return "?";
}

static uint64_t random_u64(uint64_t seed, uint64_t counter) {
  Philox4x32 r = Philox4x32::compute(seed, counter);
  return (uint64_t(r.c[0]) << 32) | r.c[1];
}

// Uniform integer in [0, n) from 64 random bits (Lemire's multiply-shift; bias < n / 2^64).
static uint64_t below(uint64_t bits, uint64_t n) {
  return uint64_t((static_cast<unsigned __int128>(bits) * n) >> 64);
}

uint64_t permute_index(uint64_t index, uint64_t n, uint64_t key) {
  NHA_CHECK(index < n) << "permute_index(" << index << ", " << n << ")";
  if (n <= 1) return 0;
  int bits = 64 - __builtin_clzll(n - 1);  // smallest domain 2^bits >= n
  if (bits < 2) bits = 2;
  if (bits & 1) ++bits;                    // two equal halves
  const int half = bits / 2;
  const uint64_t mask = (uint64_t(1) << half) - 1;
  uint64_t x = index;
  // Cycle walking: apply the bijection of [0, 2^bits) until the value lands inside [0, n). The
  // domain is < 4n, so this takes < 4 passes on average.
  do {
    uint64_t l = x >> half, r = x & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      uint64_t f = random_u64(key, (round << 56) ^ r) & mask;
      uint64_t next_l = r;
      r = l ^ f;
      l = next_l;
    }
    x = (l << half) | r;
  } while (x >= n);
  return x;
}

WindowSampler::WindowSampler(std::shared_ptr<const ShardSet> shards, int64_t seq_len,
                             SampleMode mode, uint64_t seed)
    : shards_(std::move(shards)), seq_len_(seq_len), mode_(mode), seed_(seed) {
  NHA_CHECK(seq_len_ >= 1) << "seq_len " << seq_len_ << " must be >= 1";
  const int64_t T = seq_len_;
  cumulative_.push_back(0);
  for (const auto& shard : shards_->shards()) {
    int64_t n = shard->size();
    int64_t count = 0;
    switch (mode_) {
      case SampleMode::Random:
        count = std::max<int64_t>(0, n - T);  // starts 0 .. n-T-1 leave T+1 tokens
        break;
      case SampleMode::DocAligned: {
        // Document starts s with s + T + 1 <= n (offsets are sorted; the last entry is n).
        const std::vector<uint64_t>& off = shard->doc_offsets();
        if (n - T - 1 >= 0)
          count = int64_t(std::upper_bound(off.begin(), off.end() - 1, uint64_t(n - T - 1)) - off.begin());
        doc_count_.push_back(count);
        break;
      }
      case SampleMode::Epoch:
        count = std::max<int64_t>(0, (n - 1) / T);
        break;
    }
    cumulative_.push_back(cumulative_.back() + count);
  }
  total_ = cumulative_.back();
  NHA_CHECK(total_ > 0) << "no window of " << T + 1 << " tokens fits in the shards "
                        << shards_->description() << " (" << shards_->num_tokens()
                        << " tokens). HINT: use a shorter seq_len or more data";
}

WindowRef WindowSampler::window(int64_t index) const {
  NHA_CHECK(index >= 0) << "window index " << index;
  uint64_t pick = 0;
  switch (mode_) {
    case SampleMode::Random:
    case SampleMode::DocAligned:
      pick = below(random_u64(seed_, uint64_t(index)), uint64_t(total_));
      break;
    case SampleMode::Epoch: {
      uint64_t epoch = uint64_t(index) / uint64_t(total_);
      uint64_t k = uint64_t(index) % uint64_t(total_);
      pick = permute_index(k, uint64_t(total_), random_u64(seed_ ^ 0x5eed0fe90c4ull, epoch));
      break;
    }
  }
  // The shard holding candidate `pick`.
  auto it = std::upper_bound(cumulative_.begin(), cumulative_.end(), int64_t(pick));
  int32_t s = int32_t(it - cumulative_.begin()) - 1;
  int64_t local = int64_t(pick) - cumulative_[size_t(s)];
  WindowRef w;
  w.shard = s;
  switch (mode_) {
    case SampleMode::Random: w.start = local; break;
    case SampleMode::DocAligned: w.start = int64_t(shards_->shards()[size_t(s)]->doc_offsets()[size_t(local)]); break;
    case SampleMode::Epoch: w.start = local * seq_len_; break;
  }
  return w;
}

void fill_row(const ShardSet& shards, const WindowRef& w, int64_t T, int64_t row, Tensor& inputs,
              Tensor& targets) {
  int32_t* in = inputs.data<int32_t>() + row * T;
  int32_t* tg = targets.data<int32_t>() + row * T;
  const TokenShard& shard = *shards.shards()[size_t(w.shard)];
  // The window is T+1 tokens: inputs its first T, targets its last T.
  shard.copy(w.start, T, in);
  std::copy(in + 1, in + T, tg);
  shard.copy(w.start + T, 1, tg + T - 1);
}

// ---- LoaderState -------------------------------------------------------------------------------

nlohmann::json LoaderState::to_json() const {
  return {{"kind", kind},       {"mode", mode},
          {"seed", seed},       {"step", step},
          {"next_window", next_window}, {"seq_len", seq_len},
          {"global_batch", global_batch}, {"data_id", data_id}};
}

LoaderState LoaderState::from_json(const nlohmann::json& j) {
  LoaderState s;
  try {
    s.kind = j.at("kind").get<std::string>();
    s.mode = j.at("mode").get<std::string>();
    s.seed = j.at("seed").get<uint64_t>();
    s.step = j.at("step").get<int64_t>();
    s.next_window = j.at("next_window").get<int64_t>();
    s.seq_len = j.at("seq_len").get<int64_t>();
    s.global_batch = j.at("global_batch").get<int64_t>();
    s.data_id = j.at("data_id").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    NHA_FAIL() << "bad loader state " << j.dump() << ": " << e.what()
               << ". HINT: the checkpoint's data state is damaged or from another version";
  }
  return s;
}

// ---- TrainLoader -------------------------------------------------------------------------------

TrainLoader::TrainLoader(std::shared_ptr<const ShardSet> shards, LoaderOptions options)
    : shards_(std::move(shards)),
      options_(options),
      sampler_(shards_, options.seq_len, options.mode, options.seed) {
  NHA_CHECK(options_.world_size >= 1 && options_.rank >= 0 && options_.rank < options_.world_size)
      << "rank " << options_.rank << " of world size " << options_.world_size;
  NHA_CHECK(options_.global_batch > 0 && options_.global_batch % options_.world_size == 0)
      << "global batch " << options_.global_batch << " is not divisible by the " << options_.world_size
      << " ranks. HINT: pick a batch size that is a multiple of the GPU count";
  local_batch_ = options_.global_batch / options_.world_size;
  start_worker();
}

TrainLoader::~TrainLoader() { stop_worker(); }

std::string TrainLoader::data_id() const {
  return shards_->tokenizer_hash() + "/" + std::to_string(shards_->num_tokens());
}

Batch TrainLoader::make_batch(int64_t step, int64_t first_window) const {
  const int64_t B = local_batch_, T = options_.seq_len;
  Batch b;
  b.inputs = Tensor::empty({B, T}, DType::I32);   // [B, T]
  b.targets = Tensor::empty({B, T}, DType::I32);  // [B, T]
  b.step = step;
  const int64_t mine = first_window + int64_t(options_.rank) * B;  // this rank's slice
  for (int64_t i = 0; i < B; ++i) fill_row(*shards_, sampler_.window(mine + i), T, i, b.inputs, b.targets);
  return b;
}

void TrainLoader::start_worker() {
  stop_ = false;
  error_ = nullptr;
  queue_.clear();
  produce_step_ = step_;
  produce_window_ = next_window_;
  if (options_.prefetch > 0) worker_ = std::thread([this] { worker_loop(); });
}

void TrainLoader::stop_worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void TrainLoader::worker_loop() {
  while (true) {
    int64_t step, window;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || int(queue_.size()) < options_.prefetch; });
      if (stop_) return;
      step = produce_step_;
      window = produce_window_;
    }
    Batch b;
    try {
      b = make_batch(step, window);  // outside the lock: the consumer keeps going meanwhile
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::current_exception();
      cv_.notify_all();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return;
      queue_.push_back(std::move(b));
      produce_step_ = step + 1;
      produce_window_ = window + options_.global_batch;
    }
    cv_.notify_all();
  }
}

Batch TrainLoader::next() {
  Batch b;
  if (options_.prefetch <= 0) {
    b = make_batch(step_, next_window_);
  } else {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return !queue_.empty() || error_; });
    if (queue_.empty()) std::rethrow_exception(error_);
    b = std::move(queue_.front());
    queue_.pop_front();
  }
  cv_.notify_all();
  ++step_;
  next_window_ += options_.global_batch;
  return b;
}

LoaderState TrainLoader::state() const {
  LoaderState s;
  s.kind = "tokens";
  s.mode = sample_mode_name(options_.mode);
  s.seed = options_.seed;
  s.step = step_;
  s.next_window = next_window_;
  s.seq_len = options_.seq_len;
  s.global_batch = options_.global_batch;
  s.data_id = data_id();
  return s;
}

void TrainLoader::restore(const LoaderState& s) {
  NHA_CHECK(s.kind == "tokens" && s.mode == sample_mode_name(options_.mode) &&
            s.seed == options_.seed && s.seq_len == options_.seq_len)
      << "the saved loader state (" << s.kind << ", mode " << s.mode << ", seed " << s.seed
      << ", seq_len " << s.seq_len << ") does not match this loader (tokens, mode "
      << sample_mode_name(options_.mode) << ", seed " << options_.seed << ", seq_len "
      << options_.seq_len << "). HINT: resume with the data settings of the checkpoint's run";
  NHA_CHECK(s.data_id == data_id())
      << "the checkpoint was trained on other data (" << s.data_id << ") than " << shards_->description()
      << " (" << data_id() << "). HINT: point the data path at the shards the run started with";
  stop_worker();
  step_ = s.step;
  // A changed global batch continues from the next unseen window (batch-size schedules work).
  next_window_ = s.next_window;
  start_worker();
}

// ---- ValLoader ---------------------------------------------------------------------------------

ValLoader::ValLoader(std::shared_ptr<const ShardSet> shards, int64_t seq_len, int64_t batch,
                     int world_size, int rank, int64_t max_windows)
    : shards_(std::move(shards)), seq_len_(seq_len), batch_(batch) {
  NHA_CHECK(seq_len >= 1 && batch >= 1) << "validation seq_len " << seq_len << ", batch " << batch;
  NHA_CHECK(world_size >= 1 && rank >= 0 && rank < world_size)
      << "rank " << rank << " of world size " << world_size;
  int64_t g = 0;
  for (size_t s = 0; s < shards_->shards().size(); ++s) {
    int64_t n = shards_->shards()[s]->size();
    for (int64_t k = 0; k < (n - 1) / seq_len; ++k, ++g) {
      if (max_windows > 0 && g >= max_windows) break;
      if (g % world_size == rank) mine_.push_back({int32_t(s), k * seq_len});
    }
    if (max_windows > 0 && g >= max_windows) break;
  }
  total_ = g;
  NHA_CHECK(total_ > 0) << "the validation shards " << shards_->description() << " ("
                        << shards_->num_tokens() << " tokens) hold no window of " << seq_len + 1
                        << " tokens. HINT: use a larger --val-fraction or a shorter seq_len";
}

bool ValLoader::next(Batch& b) {
  if (cursor_ >= mine_.size()) return false;
  int64_t rows = std::min<int64_t>(batch_, int64_t(mine_.size() - cursor_));
  b.inputs = Tensor::empty({rows, seq_len_}, DType::I32);   // [rows, T]
  b.targets = Tensor::empty({rows, seq_len_}, DType::I32);  // [rows, T]
  b.step = -1;
  for (int64_t i = 0; i < rows; ++i) fill_row(*shards_, mine_[cursor_ + size_t(i)], seq_len_, i, b.inputs, b.targets);
  cursor_ += size_t(rows);
  return true;
}

}  // namespace nha::data
