// Data, text side: tokenizer training/round trip/determinism, `prepare` token counts and HDF5
// attributes, refusals of bad input.
#include <H5Cpp.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/testing.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/text_source.h"
#include "data/tokenizer.h"

namespace fs = std::filesystem;

namespace nha::data {
namespace {

using testing::expect_error;
using testing::read_file;
using testing::temp_dir;

void write_file(const std::string& path, const std::string& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// Tiny tokenizer (vocab 400) on the first 3000 lines of tinyshakespeare: well under a second.
TokenizerTrainOptions tiny_options() {
  TokenizerTrainOptions o;
  o.vocab_size = 400;
  o.max_sentences = 3000;
  return o;
}

// tinyshakespeare, vendored compressed (tests/data/README.md), decompressed once per process.
const std::string& shakespeare() {
  static const std::string path = [] {
    const std::string p = temp_dir("shakespeare") + "/tinyshakespeare.txt";
    write_file(p, testing::read_zst_text(testing::test_data("tinyshakespeare.txt.zst")));
    return p;
  }();
  return path;
}

const Tokenizer& tiny_tokenizer() {
  static Tokenizer tok = [] {
    std::string dir = temp_dir("tok");
    return Tokenizer::train({shakespeare()}, dir + "/tiny.model", tiny_options());
  }();
  return tok;
}

TEST(DataText, InvalidUtf8IsFoundAtItsFirstByte) {
  const size_t ok = std::string_view::npos;
  EXPECT_EQ(invalid_utf8_offset(""), ok);
  EXPECT_EQ(invalid_utf8_offset("plain ascii"), ok);
  EXPECT_EQ(invalid_utf8_offset("caf\xc3\xa9 \xe4\xbd\xa0 \xf0\x9f\x99\x82 \xf4\x8f\xbf\xbf"), ok);
  EXPECT_EQ(invalid_utf8_offset("caf\xe9"), 3u);                    // Latin-1
  EXPECT_EQ(invalid_utf8_offset("ab\xc3"), 2u);                     // cut short
  EXPECT_EQ(invalid_utf8_offset("\xc0\xaf"), 0u);                  // overlong '/'
  EXPECT_EQ(invalid_utf8_offset("x\xe0\x80\xaf"), 1u);            // overlong, 3 bytes
  EXPECT_EQ(invalid_utf8_offset("xy\xed\xa0\x80"), 2u);           // a UTF-16 surrogate
  EXPECT_EQ(invalid_utf8_offset("\xf4\x90\x80\x80"), 0u);        // above U+10FFFF
  EXPECT_EQ(invalid_utf8_offset("\xe4\xbd"), 0u);
  EXPECT_EQ(invalid_utf8_offset("a\x80"), 1u);                      // a lone continuation byte
  EXPECT_EQ(invalid_utf8_offset("\xe4\xbd\x41"), 0u);             // continuation missing
}

TEST(DataTokenizer, RoundTripAndSpecialIds) {
  const Tokenizer& tok = tiny_tokenizer();
  EXPECT_EQ(tok.vocab_size(), 400);
  EXPECT_EQ(tok.unk_id(), 0);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.pad_id(), -1);
  EXPECT_EQ(tok.hash_hex().rfind("fnv1a64:", 0), 0u);
  const std::vector<std::string> texts = {
      "First Citizen:\nBefore we proceed any further, hear me speak.",
      "  two  spaces,\ttabs and a trailing newline\n",
      "digits 0123456789, caf\xc3\xa9, \xe4\xbd\xa0\xe5\xa5\xbd, emoji \xf0\x9f\x99\x82",
  };
  for (const std::string& text : texts) {
    std::vector<int32_t> ids = tok.encode(text);
    ASSERT_FALSE(ids.empty());
    for (int32_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, 400);
      EXPECT_NE(id, tok.unk_id()) << "byte fallback means no <unk> for " << text;
    }
    EXPECT_EQ(tok.decode(ids), text);
  }
  // Frequent English compresses even with 400 pieces: well under one token per byte.
  std::string line = "What say you to this? my lord, I will not speak of it.";
  EXPECT_LT(double(tok.encode(line).size()), 0.6 * double(line.size()));
  EXPECT_THROW(tok.decode({400}), Error);
}

TEST(DataTokenizer, TrainingIsDeterministicAndLoadable) {
  std::string dir = temp_dir("tokdet");
  Tokenizer a = Tokenizer::train({shakespeare()}, dir + "/a.model", tiny_options());
  Tokenizer b = Tokenizer::train({shakespeare()}, dir + "/b.model", tiny_options());
  std::string bytes_a = read_file(dir + "/a.model"), bytes_b = read_file(dir + "/b.model");
  ASSERT_FALSE(bytes_a.empty());
  EXPECT_EQ(bytes_a, bytes_b) << "same input and options must give byte-identical models";
  EXPECT_EQ(a.hash(), b.hash());
  EXPECT_EQ(a.hash(), tiny_tokenizer().hash()) << "the input path is not part of the model";
  Tokenizer loaded = Tokenizer::load(dir + "/a.model");
  EXPECT_EQ(loaded.hash(), a.hash());
  EXPECT_EQ(loaded.encode("Good morrow, cousin."), a.encode("Good morrow, cousin."));
  EXPECT_TRUE(fs::exists(dir + "/a.vocab"));
  // Another vocabulary size is another model.
  TokenizerTrainOptions o = tiny_options();
  o.vocab_size = 420;
  Tokenizer c = Tokenizer::train({shakespeare()}, dir + "/c.model", o);
  EXPECT_NE(c.hash(), a.hash());
  fs::remove_all(dir);
}

TEST(DataTokenizer, RefusesBadModelFiles) {
  std::string dir = temp_dir("tokbad");
  expect_error([&] { Tokenizer::load(dir + "/missing.model"); }, {"missing.model", "HINT"});
  write_file(dir + "/garbage.model", "this is not a protobuf");
  expect_error([&] { Tokenizer::load(dir + "/garbage.model"); }, {"garbage.model", "HINT"});
  fs::remove_all(dir);
}

// The documents of a plain text in paragraph mode, computed independently of DocumentReader.
std::vector<std::string> paragraphs(const std::string& text) {
  std::vector<std::string> docs;
  std::string cur, line;
  std::istringstream in(text);
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t") == std::string::npos) {
      if (!cur.empty()) docs.push_back(cur);
      cur.clear();
    } else {
      cur += (cur.empty() ? "" : "\n") + line;
    }
  }
  if (!cur.empty()) docs.push_back(cur);
  return docs;
}

std::vector<uint32_t> read_tokens_h5py_style(const std::string& path) {
  H5::H5File f(path, H5F_ACC_RDONLY);
  H5::DataSet ds = f.openDataSet("tokens");
  EXPECT_EQ(ds.getDataType().getSize(), 2u) << "vocab 400 fits uint16";
  std::vector<uint32_t> v(size_t(ds.getSpace().getSimpleExtentNpoints()));
  ds.read(v.data(), H5::PredType::NATIVE_UINT32);
  return v;
}

TEST(DataPrepare, TokenCountsShardsAndAttributes) {
  const Tokenizer& tok = tiny_tokenizer();
  std::string dir = temp_dir("prep");
  // Inputs: a 60 kB slice of Shakespeare (paragraph documents) and a JSONL file inside a folder.
  std::string text = read_file(shakespeare()).substr(0, 60000);
  text = text.substr(0, text.rfind("\n\n") + 1);
  write_file(dir + "/in/a.txt", text);
  write_file(dir + "/in/sub/b.jsonl",
             "{\"text\": \"To be, or not to be.\", \"id\": 1}\n\n{\"text\": \"Line one\\nline two\"}\n");
  std::vector<std::string> docs = paragraphs(text);
  docs.push_back("To be, or not to be.");
  docs.push_back("Line one\nline two");

  PrepareOptions o;
  o.inputs = {dir + "/in"};
  o.out_dir = dir + "/out";
  o.val_fraction = 0.1;
  o.quiet = true;
  o.threads = 2;
  PrepareStats s = prepare(tok, o);

  // Expected: every document's tokens + EOS, routed by the documented split rule, in order.
  std::vector<uint32_t> expect[2];
  for (const std::string& d : docs) {
    int split = is_validation_document(d, o.val_fraction, o.split_seed);
    for (int32_t id : tok.encode(d)) expect[split].push_back(uint32_t(id));
    expect[split].push_back(uint32_t(tok.eos_id()));
  }
  EXPECT_EQ(s.documents[0] + s.documents[1], int64_t(docs.size()));
  EXPECT_EQ(s.tokens[0], int64_t(expect[0].size()));
  EXPECT_EQ(s.tokens[1], int64_t(expect[1].size()));
  EXPECT_GT(s.documents[1], 0) << "10% of ~" << docs.size() << " documents held out";
  EXPECT_GT(s.documents[0], s.documents[1]);
  ASSERT_EQ(s.shards[0], 1);
  ASSERT_EQ(s.shards[1], 1);

  // Readable with the plain HDF5 API (what h5py does), attributes included.
  const char* names[2] = {"/out/train_000000.h5", "/out/val_000000.h5"};
  for (int split = 0; split < 2; ++split) {
    std::string path = dir + names[split];
    EXPECT_EQ(read_tokens_h5py_style(path), expect[split]);
    H5::H5File f(path, H5F_ACC_RDONLY);
    int64_t v = 0;
    f.openAttribute("vocab_size").read(H5::PredType::NATIVE_INT64, &v);
    EXPECT_EQ(v, 400);
    f.openAttribute("num_tokens").read(H5::PredType::NATIVE_INT64, &v);
    EXPECT_EQ(v, int64_t(expect[split].size()));
    f.openAttribute("num_documents").read(H5::PredType::NATIVE_INT64, &v);
    EXPECT_EQ(v, s.documents[split]);
    H5::Attribute h = f.openAttribute("tokenizer_hash");
    std::string hash;
    h.read(h.getStrType(), hash);
    EXPECT_EQ(hash, tok.hash_hex());
    ShardMeta m = read_shard_meta(path);
    EXPECT_EQ(m.sources, o.inputs);
    EXPECT_EQ(m.split, split ? "val" : "train");
    // Documents end with EOS exactly at the recorded offsets.
    TokenShard shard(path);
    EXPECT_TRUE(shard.mmapped());
    for (size_t d = 1; d < shard.doc_offsets().size(); ++d)
      EXPECT_EQ(shard.token(int64_t(shard.doc_offsets()[d]) - 1), uint32_t(tok.eos_id()));
  }
  EXPECT_TRUE(fs::exists(dir + "/out/manifest.json"));

  // Deterministic: one thread, tiny batches and small shards give the same token stream.
  PrepareOptions o1 = o;
  o1.out_dir = dir + "/out1";
  o1.threads = 1;
  o1.batch_bytes = 3000;
  PrepareStats s1 = prepare(tok, o1);
  EXPECT_EQ(s1.tokens[0], s.tokens[0]);
  EXPECT_EQ(read_file(dir + "/out1/train_000000.h5"), read_file(dir + "/out/train_000000.h5"))
      << "shards are byte-identical for any thread count";
  PrepareOptions o2 = o;
  o2.out_dir = dir + "/out2";
  o2.shard_tokens = 4096;
  PrepareStats s2 = prepare(tok, o2);
  EXPECT_GT(s2.shards[0], 2);
  auto set = ShardSet::open(o2.out_dir, "train");
  EXPECT_EQ(set->num_tokens(), s.tokens[0]);
  std::vector<uint32_t> joined;
  for (const auto& shard : set->shards())
    for (int64_t i = 0; i < shard->size(); ++i) joined.push_back(shard->token(i));
  EXPECT_EQ(joined, expect[0]);
  // A second run into the same directory must be asked for.
  expect_error([&] { prepare(tok, o); }, {"already holds shards", "--force"});
  o.force = true;
  EXPECT_NO_THROW(prepare(tok, o));
  fs::remove_all(dir);
}

TEST(DataPrepare, ZstdInputMatchesPlainText) {
  if (std::system("zstd --version >/dev/null 2>&1") != 0) GTEST_SKIP() << "zstd command absent";
  std::string dir = temp_dir("zst");
  std::string text = read_file(shakespeare()).substr(0, 20000);
  write_file(dir + "/a.txt", text);
  ASSERT_EQ(std::system(("zstd -q -o " + dir + "/b.txt.zst " + dir + "/a.txt").c_str()), 0);
  PrepareOptions o;
  o.out_dir = dir + "/plain";
  o.inputs = {dir + "/a.txt"};
  o.val_fraction = 0;
  o.quiet = true;
  PrepareStats a = prepare(tiny_tokenizer(), o);
  o.out_dir = dir + "/zst";
  o.inputs = {dir + "/b.txt.zst"};
  PrepareStats b = prepare(tiny_tokenizer(), o);
  EXPECT_EQ(a.tokens[0], b.tokens[0]);
  EXPECT_EQ(a.bytes, b.bytes) << "MB/s counts decompressed text";
  // A truncated .zst is an error, not a silently shorter corpus.
  std::string z = read_file(dir + "/b.txt.zst");
  write_file(dir + "/cut.txt.zst", z.substr(0, z.size() / 2));
  o.out_dir = dir + "/cut";
  o.inputs = {dir + "/cut.txt.zst"};
  expect_error([&] { prepare(tiny_tokenizer(), o); }, {"cut.txt.zst", "HINT"});
  EXPECT_TRUE(find_shards(dir + "/cut", "train").empty()) << "no shard left behind on error";
  fs::remove_all(dir);
}

TEST(DataPrepare, RefusesBadInputs) {
  const Tokenizer& tok = tiny_tokenizer();
  std::string dir = temp_dir("bad");
  PrepareOptions o;
  o.out_dir = dir + "/out";
  o.quiet = true;

  write_file(dir + "/empty.txt", "");
  o.inputs = {dir + "/empty.txt"};
  expect_error([&] { prepare(tok, o); }, {"empty.txt", "empty", "HINT"});

  write_file(dir + "/blank.txt", "\n  \n\n");
  o.inputs = {dir + "/blank.txt"};
  expect_error([&] { prepare(tok, o); }, {"no text", "HINT"});

  write_file(dir + "/binary.txt", std::string("ELF\x02\x01\x00\x00garbage\n", 15));
  o.inputs = {dir + "/binary.txt"};
  expect_error([&] { prepare(tok, o); }, {"binary.txt", "NUL", "HINT"});

  o.inputs = {dir + "/does-not-exist.txt"};
  expect_error([&] { prepare(tok, o); }, {"does-not-exist.txt", "HINT"});

  // Latin-1 "café" on line 2: refused where it is, not rewritten to U+FFFD (docs/data.md).
  write_file(dir + "/latin1.txt", "fine line\nun caf\xe9 noir\n");
  o.inputs = {dir + "/latin1.txt"};
  expect_error([&] { prepare(tok, o); },
               {"latin1.txt", "line 2 byte 7", "file offset 16", "0xe9", "not UTF-8", "iconv"});
  expect_error([&] { tok.encode("caf\xe9"); }, {"byte offset 3", "0xe9", "HINT"});

  write_file(dir + "/rows.jsonl", "{\"content\": \"hello there\"}\n");
  o.inputs = {dir + "/rows.jsonl"};
  expect_error([&] { prepare(tok, o); }, {"rows.jsonl", "line 1", "--jsonl-field"});
  o.source.jsonl_field = "content";
  EXPECT_NO_THROW(prepare(tok, o));

  write_file(dir + "/broken.jsonl", "{\"text\": \"unterminated\n");
  o.inputs = {dir + "/broken.jsonl"};
  o.force = true;
  expect_error([&] { prepare(tok, o); }, {"broken.jsonl", "not valid JSON"});
  fs::remove_all(dir);
}

TEST(DataPrepare, RefusesTokenizerShardMismatch) {
  std::string dir = temp_dir("mismatch");
  write_file(dir + "/a.txt", read_file(shakespeare()).substr(0, 20000));
  PrepareOptions o;
  o.inputs = {dir + "/a.txt"};
  o.out_dir = dir + "/out";
  o.val_fraction = 0;
  o.quiet = true;
  prepare(tiny_tokenizer(), o);
  auto shards = ShardSet::open(o.out_dir, "train");
  EXPECT_NO_THROW(shards->check_tokenizer(tiny_tokenizer()));
  TokenizerTrainOptions other = tiny_options();
  other.vocab_size = 350;
  other.max_sentences = 500;
  Tokenizer small = Tokenizer::train({dir + "/a.txt"}, dir + "/small.model", other);
  expect_error([&] { shards->check_tokenizer(small); }, {"vocab 350", "vocab 400", "HINT"});
  expect_error([&] { shards->check_model_vocab(256); }, {"vocab_size", "HINT"});
  EXPECT_NO_THROW(shards->check_model_vocab(512));  // a padded embedding table is fine
  expect_error([&] { ShardSet::open(o.out_dir, "val"); }, {"no val shards", "HINT"});
  fs::remove_all(dir);
}

}  // namespace
}  // namespace nha::data
