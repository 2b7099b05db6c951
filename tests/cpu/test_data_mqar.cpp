// MQAR (Zoology) generator: ranges, query placement, labels, power-law gaps, presets, batches.
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "common/testing.h"
#include "data/mqar.h"

namespace nha::data {
namespace {

// Checks one example against the definition in data/mqar.h; returns the query slots used.
std::vector<int64_t> check_example(const MqarOptions& o, const MqarSetting& s, const int32_t* in,
                                   const int32_t* tg) {
  const int64_t V = o.vocab_size, L = s.seq_len, K = s.num_kv_pairs, C = 2 * K;
  std::map<int32_t, int32_t> value_of;
  std::set<int32_t> values;
  for (int64_t i = 0; i < K; ++i) {
    int32_t k = in[2 * i], v = in[2 * i + 1];
    EXPECT_GE(k, 1);
    EXPECT_LT(k, V / 2) << "keys come from [1, V/2)";
    EXPECT_GE(v, V / 2);
    EXPECT_LT(v, V) << "values come from [V/2, V)";
    EXPECT_TRUE(value_of.emplace(k, v).second) << "keys are distinct";
    EXPECT_TRUE(values.insert(v).second) << "values are distinct";
    EXPECT_EQ(tg[2 * i], kIgnoreIndex);
    EXPECT_EQ(tg[2 * i + 1], kIgnoreIndex) << "no loss inside the context";
  }
  std::vector<int64_t> slots;
  std::set<int32_t> queried;
  for (int64_t t = C; t < L; ++t) {
    EXPECT_GE(in[t], 0);
    EXPECT_LT(in[t], V);
    if (tg[t] == kIgnoreIndex) continue;
    EXPECT_EQ((t - C) % 2, 0) << "queries sit at the first token of a two-token slot";
    auto it = value_of.find(in[t]);
    EXPECT_NE(it, value_of.end()) << "the query token at " << t << " is a context key";
    if (it != value_of.end()) EXPECT_EQ(tg[t], it->second) << "the target is the paired value";
    EXPECT_TRUE(queried.insert(in[t]).second) << "each key is queried once";
    slots.push_back((t - C) / 2);
  }
  EXPECT_EQ(int64_t(slots.size()), K) << "exactly K labelled positions";
  return slots;
}

TEST(DataMqar, ExamplesFollowTheZoologyDefinition) {
  for (const char* preset : {"train", "test"}) {
    MqarOptions o = mqar_preset(preset);
    EXPECT_EQ(o.vocab_size, 8192);
    EXPECT_DOUBLE_EQ(o.power_a, 0.01);
    for (size_t s = 0; s < o.settings.size(); ++s) {
      const MqarSetting& st = o.settings[s];
      std::vector<int32_t> in(size_t(st.seq_len)), tg(size_t(st.seq_len));
      for (int64_t i = 0; i < 20; ++i) {
        mqar_example(o, s, i, in.data(), tg.data());
        check_example(o, st, in.data(), tg.data());
      }
    }
  }
  MqarOptions train = mqar_preset("train");
  ASSERT_EQ(train.settings.size(), 3u);
  EXPECT_EQ(train.settings[2].seq_len, 256);
  EXPECT_EQ(train.settings[2].num_kv_pairs, 16);
  MqarOptions test = mqar_preset("test");
  EXPECT_EQ(test.settings.back().seq_len, 1024);
  EXPECT_EQ(test.settings.back().num_kv_pairs, 256);
  EXPECT_NE(train.seed, test.seed) << "test examples differ from training examples";
  EXPECT_EQ(mqar_preset("zoology-train").settings.size(), 5u);
  MqarOptions one = mqar_preset("L512-K64-N50");
  EXPECT_EQ(one.settings[0].num_examples, 50);
  EXPECT_EQ(one.vocab_size, 8192);
  MqarOptions small = mqar_preset("L64-K4-N20-V256");
  EXPECT_EQ(small.vocab_size, 256);
  EXPECT_EQ(small.settings[0].num_examples, 20);
  std::vector<int32_t> in(64), tg(64);
  for (int64_t i = 0; i < 20; ++i) {
    mqar_example(small, 0, i, in.data(), tg.data());
    check_example(small, small.settings[0], in.data(), tg.data());
  }
  EXPECT_EQ(mqar_preset("L64-K4-V128").settings[0].num_examples, 1000) << "N is optional";
  EXPECT_THROW(mqar_preset("L64-K4-V64"), Error) << "V must exceed L";
  EXPECT_THROW(mqar_preset("L64-K4-V128-N20"), Error) << "N comes before V";
  EXPECT_THROW(mqar_preset("L64-K4-N20x"), Error);
  EXPECT_THROW(mqar_preset("L64-K4-V128-V256"), Error);
  EXPECT_THROW(mqar_preset("L64-K32"), Error) << "4K > L";
  EXPECT_THROW(mqar_preset("L63-K4"), Error) << "odd L";
  EXPECT_THROW(mqar_preset("nonsense"), Error);
}

TEST(DataMqar, QueryGapsFollowThePowerLaw) {
  // (L, K) = (256, 16): 112 slots, 16 drawn with weights (g+1)^-0.99. Slot 0 is ~1/H ~ 19% of the
  // first draw alone; the far half of the slots is much rarer than the near half.
  MqarOptions o = mqar_preset("L256-K16-N400");
  std::vector<int64_t> hits(112, 0);
  std::vector<int32_t> in(256), tg(256);
  for (int64_t i = 0; i < 400; ++i) {
    mqar_example(o, 0, i, in.data(), tg.data());
    for (int64_t g : check_example(o, o.settings[0], in.data(), tg.data())) hits[size_t(g)]++;
  }
  int64_t near = 0, far = 0;
  for (int g = 0; g < 56; ++g) near += hits[size_t(g)];
  for (int g = 56; g < 112; ++g) far += hits[size_t(g)];
  EXPECT_GT(hits[0], 300) << "slot 0 is taken in most examples";
  EXPECT_GT(near, 2 * far);
  EXPECT_GT(far, 0) << "but far slots do occur";
  // Same (seed, setting, index) -> same example; another index or seed -> another one.
  std::vector<int32_t> a(256), b(256), t2(256);
  mqar_example(o, 0, 5, a.data(), tg.data());
  mqar_example(o, 0, 5, b.data(), t2.data());
  EXPECT_EQ(a, b);
  mqar_example(o, 0, 6, b.data(), t2.data());
  EXPECT_NE(a, b);
  o.seed = 1;
  mqar_example(o, 0, 5, b.data(), t2.data());
  EXPECT_NE(a, b);
}

TEST(DataMqar, DatasetBatchesPadRankSplitAndResume) {
  MqarOptions o = mqar_preset("train");
  MqarDataset ds(o, 8);
  EXPECT_EQ(ds.size(), 140000);
  EXPECT_EQ(ds.seq_len(), 256);
  // Unshuffled examples: settings in order, shorter ones padded with ignored targets.
  Batch first = ds.examples(0, 2);
  ASSERT_EQ(first.inputs.shape(), (Shape{2, 256}));
  std::vector<int32_t> tg = first.targets.to_vector<int32_t>();
  for (int64_t t = 64; t < 256; ++t) EXPECT_EQ(tg[size_t(t)], kIgnoreIndex);
  EXPECT_EQ(ds.setting_of(99999), 0u);
  EXPECT_EQ(ds.setting_of(100000), 1u);
  int64_t labels = 0;
  for (int32_t v : tg) labels += v != kIgnoreIndex;
  EXPECT_EQ(labels, 2 * 4);

  // Global batch independent of world size.
  std::vector<std::vector<int32_t>> global;
  for (int step = 0; step < 3; ++step) global.push_back(ds.next().inputs.to_vector<int32_t>());
  for (int world : {2, 4}) {
    std::vector<std::vector<int32_t>> joined(3);
    for (int rank = 0; rank < world; ++rank) {
      MqarDataset part(o, 8, world, rank);
      for (int step = 0; step < 3; ++step) {
        std::vector<int32_t> x = part.next().inputs.to_vector<int32_t>();
        joined[size_t(step)].insert(joined[size_t(step)].end(), x.begin(), x.end());
      }
    }
    EXPECT_EQ(joined, global) << "world " << world;
  }
  // Resume.
  nlohmann::json saved = ds.state().to_json();
  std::vector<int32_t> expect = ds.next().targets.to_vector<int32_t>();
  MqarDataset again(o, 8);
  again.restore(LoaderState::from_json(saved));
  EXPECT_EQ(again.next().targets.to_vector<int32_t>(), expect);
  MqarDataset other(mqar_preset("test"), 8);
  EXPECT_THROW(other.restore(LoaderState::from_json(saved)), Error);
  // Shuffled order visits every example once per epoch (checked on a small dataset).
  MqarDataset small(mqar_preset("L64-K4-N37"), 1, 1, 0, true);
  std::set<std::vector<int32_t>> seen;
  for (int i = 0; i < 37; ++i) seen.insert(small.next().inputs.to_vector<int32_t>());
  EXPECT_EQ(seen.size(), 37u);
}

}  // namespace
}  // namespace nha::data
