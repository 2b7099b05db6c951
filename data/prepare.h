// `nha prepare`: text -> HDF5 token shards (format in data/shards.h, docs/data.md).
//
// Streaming pipeline with bounded memory: a reader thread cuts the inputs into documents and
// hands over batches of ~batch_bytes of text; the encoder tokenizes a batch on `threads` OpenMP
// threads (one document per task) while the reader fills the next one; documents are then
// appended in input order, so the output is the same for any thread count. Each document is
// encode(text) + [eos]. A document goes to the validation split when a hash of its text falls under
// val_fraction: whole documents, deterministic, and identical documents always land on the same
// side (no train/val leakage through duplicates).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/text_source.h"
#include "data/tokenizer.h"

namespace nha::data {

struct PrepareOptions {
  std::vector<std::string> inputs;  // files and/or directories
  std::string out_dir;
  double val_fraction = 0.01;
  uint64_t split_seed = 0;          // changes which documents are held out
  SourceOptions source;             // jsonl field, document split
  int threads = 0;                  // 0 = all cores (OpenMP default)
  int64_t shard_tokens = int64_t(1) << 26;  // max tokens per shard (64 Mi = 128 MiB at uint16)
  int64_t batch_bytes = 8 << 20;    // text per encoding batch
  bool force = false;               // replace shards already in out_dir
  bool quiet = false;               // no progress lines
  double progress_seconds = 2.0;
};

struct PrepareStats {
  int64_t files = 0;
  uint64_t bytes = 0;  // text bytes read (after decompression)
  int64_t documents[2] = {0, 0};  // train, val
  int64_t tokens[2] = {0, 0};     // including one EOS per document
  int64_t shards[2] = {0, 0};
  double seconds = 0;
  std::vector<std::string> shard_paths;
};

PrepareStats prepare(const Tokenizer& tokenizer, const PrepareOptions& options);

// True when the document with this text belongs to the validation split.
bool is_validation_document(std::string_view text, double val_fraction, uint64_t split_seed);

}  // namespace nha::data
