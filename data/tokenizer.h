// Tokenizer: a thin wrapper over the linked sentencepiece library.
//
// Conventions (docs/data.md):
//   - ids: unk = 0, bos = 1, eos = 2, no pad (-1) for models we train; any existing .model (e.g.
//     Llama-2's 32k) loads with whatever ids it declares.
//   - a document is encoded as  encode(text) + [eos]  (no bos): EOS separates packed documents and
//     the loader's document-aligned mode starts windows right after one.
//   - training: BPE with byte fallback (no <unk> on any UTF-8 input), identity normalization (text
//     is not NFKC-rewritten, whitespace is kept) so decode(encode(x)) == x byte for byte, digits
//     split, one thread and a fixed seed so the same input gives the same .model bytes.
//   - hash(): FNV-1a 64 of the serialized model proto. Shards store it; the loader compares it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace nha::data {

struct TokenizerTrainOptions {
  int vocab_size = 16000;
  std::string model_type = "bpe";     // "bpe" or "unigram"
  // Fraction of characters the vocabulary must cover; the rarest rest become byte pieces
  // (byte_fallback), never <unk>. 0.9995 is sentencepiece's recommendation for alphabetic scripts.
  double character_coverage = 0.9995;
  bool byte_fallback = true;
  bool split_digits = true;           // numbers tokenize digit by digit (Llama habit)
  uint64_t seed = 1234;               // sentencepiece's sampling/shuffling seed
  // Training reads every paragraph (line) of the input up to this many, sampled reservoir-style
  // with the fixed seed beyond it. BPE training time grows with it; 2M lines is ~all of the Debian
  // corpus. 0 = no limit.
  int64_t max_sentences = 2'000'000;
  int max_sentence_length = 16384;    // bytes; longer lines are skipped by the trainer
  int num_threads = 1;                // >1 is faster for unigram; 1 keeps BPE byte-reproducible
  std::string jsonl_field = "text";   // for .jsonl inputs
  bool verbose = false;               // sentencepiece's own training log on stderr
};

class Tokenizer {
 public:
  Tokenizer();
  ~Tokenizer();
  Tokenizer(const Tokenizer&);
  Tokenizer& operator=(const Tokenizer&);

  // Loads a sentencepiece .model file (any: ours, Llama-2's, ...).
  static Tokenizer load(const std::string& path);
  static Tokenizer from_serialized(const std::string& serialized_proto, const std::string& name);

  // Trains on text files/directories/JSONL (.zst too: the same readers as `nha prepare`, one
  // training sentence per non-empty line) and writes `out_path` atomically (temp name + rename).
  static Tokenizer train(const std::vector<std::string>& inputs, const std::string& out_path,
                         const TokenizerTrainOptions& options = {});

  bool loaded() const { return sp_ != nullptr; }
  // Thread-safe (sentencepiece's Encode is const): prepare encodes documents on many threads.
  std::vector<int32_t> encode(std::string_view text) const;
  void encode_append(std::string_view text, std::vector<int32_t>& out) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string piece(int32_t id) const;

  int64_t vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t unk_id() const;
  int32_t pad_id() const;  // -1 when the model has none
  uint64_t hash() const { return hash_; }
  std::string hash_hex() const;  // "fnv1a64:0123456789abcdef", the form stored in shards
  const std::string& name() const { return name_; }  // the path it was loaded from
  const std::string& serialized() const { return serialized_; }

 private:
  std::shared_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string serialized_;
  std::string name_;
  uint64_t hash_ = 0;
};

// FNV-1a 64-bit: tokenizer hashes and the train/val split of documents.
uint64_t fnv1a64(std::string_view bytes, uint64_t h = 0xcbf29ce484222325ull);
std::string hex64(uint64_t v);

}  // namespace nha::data
