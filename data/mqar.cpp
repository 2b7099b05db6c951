#include "data/mqar.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/random.h"

namespace nha::data {

namespace {

uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void check_setting(const MqarOptions& o, const MqarSetting& s) {
  // Zoology's asserts, with the reason spelled out.
  NHA_CHECK(s.seq_len >= 4 && s.seq_len % 2 == 0)
      << "MQAR seq_len " << s.seq_len << " must be even and >= 4 (queries use two-token slots)";
  NHA_CHECK(s.num_kv_pairs >= 1 && 4 * s.num_kv_pairs <= s.seq_len)
      << "MQAR with " << s.num_kv_pairs << " pairs needs seq_len >= 4K = " << 4 * s.num_kv_pairs
      << " (2K context tokens + K query slots), got " << s.seq_len
      << ". HINT: use fewer pairs or longer sequences";
  NHA_CHECK(o.vocab_size > s.seq_len && o.vocab_size / 2 - 1 >= s.num_kv_pairs)
      << "MQAR vocab_size " << o.vocab_size << " must exceed seq_len " << s.seq_len
      << " and hold " << s.num_kv_pairs << " distinct keys. HINT: the standard is 8192";
  NHA_CHECK(s.num_examples >= 1) << "MQAR setting with " << s.num_examples << " examples";
}

// "L<L>-K<K>[-N<N>][-V<V>]": one setting; V (default 8192) is the options' vocabulary.
MqarSetting parse_single(const std::string& name, int64_t& vocab) {
  long long L = 0, K = 0, N = 1000, V = vocab;
  int at = 0, n = 0;
  bool ok = std::sscanf(name.c_str(), "L%lld-K%lld%n", &L, &K, &at) == 2;
  // The optional fields in this order, each at most once.
  if (ok && std::sscanf(name.c_str() + at, "-N%lld%n", &N, &n) == 1) at += n;
  if (ok && std::sscanf(name.c_str() + at, "-V%lld%n", &V, &n) == 1) at += n;
  NHA_CHECK(ok && size_t(at) == name.size())
      << "unknown MQAR preset '" << name
      << "'. HINT: use train, zoology-train, test or L<len>-K<pairs>[-N<examples>][-V<vocab>]";
  vocab = V;
  return {L, K, N};
}

}  // namespace

MqarOptions mqar_preset(const std::string& name) {
  MqarOptions o;
  o.name = name;
  if (name == "train" || name == "zoology-train") {
    o.settings = {{64, 4, 100000}, {128, 8, 20000}, {256, 16, 20000}};
    if (name == "zoology-train") {
      o.settings.push_back({256, 32, 20000});
      o.settings.push_back({256, 64, 20000});
    }
    o.seed = 0;
  } else if (name == "test") {
    o.settings = {{64, 4, 1000},   {64, 8, 1000},    {64, 16, 1000},  {128, 32, 1000},
                  {256, 64, 1000}, {512, 128, 1000}, {1024, 256, 1000}};
    o.seed = 1000;
  } else {
    o.settings = {parse_single(name, o.vocab_size)};
    o.seed = 0;
  }
  for (const MqarSetting& s : o.settings) check_setting(o, s);
  return o;
}

std::vector<std::string> mqar_preset_names() {
  return {"train", "zoology-train", "test", "L<len>-K<pairs>[-N<examples>][-V<vocab>]"};
}

void mqar_example(const MqarOptions& o, size_t setting, int64_t index, int32_t* inputs,
                  int32_t* targets) {
  const MqarSetting& s = o.settings.at(setting);
  check_setting(o, s);
  const int64_t V = o.vocab_size, L = s.seq_len, K = s.num_kv_pairs;
  const int64_t context = 2 * K;
  const int64_t space = (L - context) / 2;  // query slots
  // One Philox stream per example: key from (seed, V, L, K), counters from the example index.
  const uint64_t key = mix64(o.seed ^ mix64(uint64_t(V) * 0x100000001b3ull ^ uint64_t(L) << 20 ^
                                            uint64_t(K) << 40));
  Generator gen(key);
  gen.set_state(key, uint64_t(index) << 24);  // 16M counters per example, far more than used
  auto randint = [&gen](int64_t lo, int64_t hi) {  // uniform in [lo, hi)
    uint64_t bits = gen.next_u64();
    return lo + int64_t((static_cast<unsigned __int128>(bits) * uint64_t(hi - lo)) >> 64);
  };

  // K distinct keys from [1, V/2) and K distinct values from [V/2, V) (rejection; K << V/2).
  std::vector<int32_t> keys(static_cast<size_t>(K)), values(static_cast<size_t>(K));
  std::vector<uint8_t> used(static_cast<size_t>(V), 0);
  for (int64_t i = 0; i < K; ++i) {
    int64_t k;
    do k = randint(1, V / 2); while (used[size_t(k)]);
    used[size_t(k)] = 1;
    keys[size_t(i)] = int32_t(k);
  }
  for (int64_t i = 0; i < K; ++i) {
    int64_t v;
    do v = randint(V / 2, V); while (used[size_t(v)]);
    used[size_t(v)] = 1;
    values[size_t(i)] = int32_t(v);
  }

  // K distinct query slots, drawn one after another with weights (g+1)^(a-1) over the slots not yet
  // taken (numpy's choice(replace=False, p=...)).
  std::vector<double> w(static_cast<size_t>(space));
  for (int64_t g = 0; g < space; ++g) w[size_t(g)] = std::pow(double(g + 1), o.power_a - 1.0);
  std::vector<int64_t> gaps(static_cast<size_t>(K));
  for (int64_t i = 0; i < K; ++i) {
    double total = 0;
    for (double x : w) total += x;
    double u = gen.uniform() * total;  // (0, total]
    int64_t g = 0, last = -1;
    for (; g < space; ++g) {
      if (w[size_t(g)] == 0) continue;
      last = g;
      u -= w[size_t(g)];
      if (u <= 0) break;
    }
    if (g == space) g = last;  // rounding at the very end
    gaps[size_t(i)] = g;
    w[size_t(g)] = 0;
  }

  for (int64_t t = 0; t < L; ++t) targets[t] = kIgnoreIndex;
  for (int64_t i = 0; i < K; ++i) {
    inputs[2 * i] = keys[size_t(i)];
    inputs[2 * i + 1] = values[size_t(i)];
  }
  for (int64_t t = context; t < L; ++t) inputs[t] = -1;  // marks filler
  for (int64_t i = 0; i < K; ++i) {
    int64_t pos = context + 2 * gaps[size_t(i)];
    inputs[pos] = keys[size_t(i)];
    targets[pos] = values[size_t(i)];
  }
  for (int64_t t = context; t < L; ++t) {
    if (inputs[t] == -1) inputs[t] = o.random_non_queries ? int32_t(randint(0, V)) : 0;
  }
}

// ---- dataset -----------------------------------------------------------------------------------

MqarDataset::MqarDataset(MqarOptions options, int64_t global_batch, int world_size, int rank,
                         bool shuffle)
    : options_(std::move(options)),
      global_batch_(global_batch),
      world_size_(world_size),
      rank_(rank),
      shuffle_(shuffle) {
  NHA_CHECK(!options_.settings.empty()) << "MQAR dataset without settings. HINT: mqar_preset(\"train\")";
  NHA_CHECK(world_size >= 1 && rank >= 0 && rank < world_size) << "rank " << rank << " of " << world_size;
  NHA_CHECK(global_batch > 0 && global_batch % world_size == 0)
      << "global batch " << global_batch << " is not divisible by the " << world_size
      << " ranks. HINT: pick a batch size that is a multiple of the GPU count";
  local_batch_ = global_batch / world_size;
  cumulative_.push_back(0);
  for (const MqarSetting& s : options_.settings) {
    check_setting(options_, s);
    cumulative_.push_back(cumulative_.back() + s.num_examples);
    max_len_ = std::max(max_len_, s.seq_len);
  }
  total_ = cumulative_.back();
}

size_t MqarDataset::setting_of(int64_t g) const {
  NHA_CHECK(g >= 0 && g < total_) << "MQAR example " << g << " outside [0, " << total_ << ")";
  return size_t(std::upper_bound(cumulative_.begin(), cumulative_.end(), g) - cumulative_.begin()) - 1;
}

void MqarDataset::fill(int64_t g, int64_t row, Batch& b) const {
  size_t s = setting_of(g);
  const int64_t T = max_len_, L = options_.settings[s].seq_len;
  int32_t* in = b.inputs.data<int32_t>() + row * T;
  int32_t* tg = b.targets.data<int32_t>() + row * T;
  mqar_example(options_, s, g - cumulative_[s], in, tg);
  for (int64_t t = L; t < T; ++t) {  // right padding of shorter settings
    in[t] = 0;
    tg[t] = kIgnoreIndex;
  }
}

Batch MqarDataset::examples(int64_t first, int64_t count) const {
  NHA_CHECK(first >= 0 && count >= 1 && first + count <= total_)
      << "MQAR examples [" << first << ", " << first + count << ") outside [0, " << total_ << ")";
  Batch b;
  b.inputs = Tensor::empty({count, max_len_}, DType::I32);   // [count, T]
  b.targets = Tensor::empty({count, max_len_}, DType::I32);  // [count, T]
  for (int64_t i = 0; i < count; ++i) fill(first + i, i, b);
  return b;
}

Batch MqarDataset::make_batch(int64_t step, int64_t first_example) const {
  const int64_t B = local_batch_;
  Batch b;
  b.inputs = Tensor::empty({B, max_len_}, DType::I32);   // [B, T]
  b.targets = Tensor::empty({B, max_len_}, DType::I32);  // [B, T]
  b.step = step;
  for (int64_t i = 0; i < B; ++i) {
    int64_t idx = first_example + int64_t(rank_) * B + i;  // global position in the stream
    int64_t epoch = idx / total_, k = idx % total_;
    int64_t g = shuffle_ ? int64_t(permute_index(uint64_t(k), uint64_t(total_),
                                                 mix64(options_.seed ^ mix64(uint64_t(epoch) + 1))))
                         : k;
    fill(g, i, b);
  }
  return b;
}

Batch MqarDataset::next() {
  Batch b = make_batch(step_, next_example_);
  ++step_;
  next_example_ += global_batch_;
  return b;
}

std::string MqarDataset::data_id() const {
  std::string id = "mqar:V" + std::to_string(options_.vocab_size);
  for (const MqarSetting& s : options_.settings)
    id += ":L" + std::to_string(s.seq_len) + "K" + std::to_string(s.num_kv_pairs) + "N" +
          std::to_string(s.num_examples);
  return id + (shuffle_ ? ":shuffled" : ":ordered");
}

LoaderState MqarDataset::state() const {
  LoaderState s;
  s.kind = "mqar";
  s.mode = options_.name;
  s.seed = options_.seed;
  s.step = step_;
  s.next_window = next_example_;
  s.seq_len = max_len_;
  s.global_batch = global_batch_;
  s.data_id = data_id();
  return s;
}

void MqarDataset::restore(const LoaderState& s) {
  NHA_CHECK(s.kind == "mqar" && s.seed == options_.seed && s.data_id == data_id())
      << "the saved loader state (" << s.kind << " " << s.data_id << ", seed " << s.seed
      << ") does not match this MQAR dataset (" << data_id() << ", seed " << options_.seed
      << "). HINT: resume with the data settings of the checkpoint's run";
  step_ = s.step;
  next_example_ = s.next_window;
}

}  // namespace nha::data
