#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "core/fileio.h"
#include "data/text_source.h"

namespace fs = std::filesystem;

namespace nha::data {

uint64_t fnv1a64(std::string_view bytes, uint64_t h) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(const Tokenizer&) = default;
Tokenizer& Tokenizer::operator=(const Tokenizer&) = default;

Tokenizer Tokenizer::from_serialized(const std::string& serialized_proto, const std::string& name) {
  Tokenizer tok;
  tok.sp_ = std::make_shared<sentencepiece::SentencePieceProcessor>();
  auto status = tok.sp_->LoadFromSerializedProto(serialized_proto);
  NHA_CHECK(status.ok()) << "cannot load sentencepiece model '" << name << "': " << status.ToString()
                         << ". HINT: pass a .model file written by `nha tokenizer train` or "
                            "sentencepiece (spm_train)";
  tok.serialized_ = serialized_proto;
  tok.name_ = name;
  tok.hash_ = fnv1a64(serialized_proto);
  return tok;
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  NHA_CHECK(in.good()) << "cannot open tokenizer model '" << path
                       << "'. HINT: train one with `nha tokenizer train --input corpus.txt --vocab "
                          "16000 --out tok.model`";
  std::ostringstream bytes;
  bytes << in.rdbuf();
  NHA_CHECK(!bytes.str().empty()) << "tokenizer model '" << path << "' is empty"
                                  << ". HINT: retrain it; a killed training leaves no file";
  return from_serialized(bytes.str(), path);
}

void Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& out) const {
  NHA_CHECK(sp_) << "encode on an empty Tokenizer. HINT: Tokenizer::load(path) first";
  const size_t bad = invalid_utf8_offset(text);
  NHA_CHECK(bad == std::string_view::npos)
      << "text to encode is not UTF-8 at byte offset " << bad << " (0x" << std::hex
      << int((unsigned char)text[bad]) << std::dec
      << "). HINT: convert the input to UTF-8 (iconv); invalid bytes are refused, not rewritten";
  thread_local std::vector<int> ids;  // sentencepiece clears and refills it
  auto status = sp_->Encode(text, &ids);
  NHA_CHECK(status.ok()) << "sentencepiece encode failed (" << name_ << "): " << status.ToString();
  out.insert(out.end(), ids.begin(), ids.end());
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  encode_append(text, out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  NHA_CHECK(sp_) << "decode on an empty Tokenizer. HINT: Tokenizer::load(path) first";
  int64_t n = vocab_size();
  for (int32_t id : ids) {
    // sentencepiece aborts the process on an out-of-range id; refuse it here instead.
    NHA_CHECK(id >= 0 && id < n) << "token id " << id << " is outside the vocabulary [0, " << n
                                 << ") of " << name_
                                 << ". HINT: the ids come from a different tokenizer or model";
  }
  std::vector<int> v(ids.begin(), ids.end());
  std::string text;
  auto status = sp_->Decode(v, &text);
  NHA_CHECK(status.ok()) << "sentencepiece decode failed (" << name_ << "): " << status.ToString();
  return text;
}

std::string Tokenizer::piece(int32_t id) const {
  NHA_CHECK(sp_ && id >= 0 && id < vocab_size()) << "piece(" << id << ") outside the vocabulary";
  return sp_->IdToPiece(id);
}

int64_t Tokenizer::vocab_size() const { return sp_ ? sp_->GetPieceSize() : 0; }
int32_t Tokenizer::bos_id() const { return sp_ ? sp_->bos_id() : -1; }
int32_t Tokenizer::eos_id() const { return sp_ ? sp_->eos_id() : -1; }
int32_t Tokenizer::unk_id() const { return sp_ ? sp_->unk_id() : -1; }
int32_t Tokenizer::pad_id() const { return sp_ ? sp_->pad_id() : -1; }
std::string Tokenizer::hash_hex() const { return "fnv1a64:" + hex64(hash_); }

// ---- training ----------------------------------------------------------------------------------

namespace {

// Feeds sentencepiece one non-empty line (paragraph) at a time from our document readers, so
// training reads the same inputs as `nha prepare` (directories, JSONL, .zst) and the model proto
// records no input path (the same corpus in another folder gives the same model bytes).
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  LineIterator(std::vector<std::string> files, const std::string& jsonl_field)
      : reader_(std::move(files), SourceOptions{jsonl_field, DocSplit::Line}) {
    Next();
  }
  bool done() const override { return done_; }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return status_; }
  void Next() override {
    // JSONL documents may hold several lines: hand them out one by one; skip blank ones.
    while (true) {
      while (pos_ >= pending_.size()) {
        if (!fetch()) {
          done_ = true;
          return;
        }
      }
      size_t end = pending_.find('\n', pos_);
      if (end == std::string::npos) end = pending_.size();
      value_.assign(pending_, pos_, end - pos_);
      pos_ = end + 1;
      if (value_.find_first_not_of(" \t\r") != std::string::npos) {
        ++count_;
        return;
      }
    }
  }
  int64_t count() const { return count_; }
  // An exception cannot cross sentencepiece's C++ frames safely in every build; keep it here and
  // rethrow after Train() returns.
  std::exception_ptr error;

 private:
  bool fetch() {
    try {
      if (!reader_.next(doc_)) return false;
    } catch (...) {
      error = std::current_exception();
      status_ = sentencepiece::util::Status(sentencepiece::util::StatusCode::kInternal,
                                            "input error (reported by nha)");
      return false;
    }
    pending_.swap(doc_.text);
    pos_ = 0;
    return true;
  }

  DocumentReader reader_;
  Document doc_;
  std::string pending_;
  size_t pos_ = 0;
  std::string value_;
  bool done_ = false;
  int64_t count_ = 0;
  sentencepiece::util::Status status_;
};

}  // namespace

Tokenizer Tokenizer::train(const std::vector<std::string>& inputs, const std::string& out_path,
                           const TokenizerTrainOptions& o) {
  NHA_CHECK(o.model_type == "bpe" || o.model_type == "unigram")
      << "tokenizer model type '" << o.model_type << "'. HINT: use bpe or unigram";
  NHA_CHECK(o.vocab_size >= 260 && o.vocab_size <= (1 << 24))
      << "tokenizer vocab size " << o.vocab_size << " is out of range. HINT: byte fallback alone "
      << "takes 256 pieces plus 3 specials; use e.g. 500 for tests, 16000-32000 for models";
  std::vector<std::string> files = list_input_files(inputs);

  std::unordered_map<std::string, std::string> kw = {
      {"model_type", o.model_type},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"character_coverage", std::to_string(o.character_coverage)},
      {"byte_fallback", o.byte_fallback ? "true" : "false"},
      {"split_digits", o.split_digits ? "true" : "false"},
      // identity: no NFKC rewrite, so decode(encode(text)) gives the text back byte for byte.
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},  // keep indentation and double spaces
      {"add_dummy_prefix", "true"},           // "▁" before the first word, as Llama does
      {"input_sentence_size", std::to_string(o.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"max_sentence_length", std::to_string(o.max_sentence_length)},
      {"num_threads", std::to_string(o.num_threads)},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"minloglevel", o.verbose ? "0" : "2"},
  };
  // sentencepiece samples and shuffles sentences with its own global generator: seed it.
  sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned int>(o.seed));

  LineIterator lines(files, o.jsonl_field);
  std::string serialized;
  auto status = sentencepiece::SentencePieceTrainer::Train(kw, &lines, &serialized);
  if (lines.error) std::rethrow_exception(lines.error);
  NHA_CHECK(lines.count() > 0) << "no text found in the tokenizer inputs"
                               << ". HINT: the input files are empty or blank";
  NHA_CHECK(status.ok()) << "sentencepiece training failed: " << status.ToString()
                         << ". HINT: 'Vocabulary size too high': the text is too small for --vocab, use a "
                            "smaller vocabulary or more text; 'smaller than required_chars': byte "
                            "fallback needs 259 pieces plus the kept characters, raise --vocab or "
                            "lower --character-coverage";

  Tokenizer tok = from_serialized(serialized, out_path);
  // Written atomically: a reader never sees half a model, and a failed run leaves no file behind.
  write_file_atomic(out_path, serialized);
  // The human-readable piece list next to it (sentencepiece's .vocab convention).
  fs::path vocab_path = out_path;
  vocab_path.replace_extension(".vocab");
  if (vocab_path != fs::path(out_path)) {
    std::ostringstream v;
    for (int64_t i = 0; i < tok.vocab_size(); ++i)
      v << tok.sp_->IdToPiece(int(i)) << "\t" << tok.sp_->GetScore(int(i)) << "\n";
    write_file_atomic(vocab_path.string(), v.str());
  }
  return tok;
}

}  // namespace nha::data
