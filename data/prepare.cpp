#include "data/prepare.h"

#include <omp.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fileio.h"
#include "data/shards.h"

namespace fs = std::filesystem;

namespace nha::data {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

double now_seconds() {
  using clock = std::chrono::steady_clock;
  static const clock::time_point start = clock::now();
  return std::chrono::duration<double>(clock::now() - start).count();
}

// Accumulates one split's documents and writes a shard whenever shard_tokens would be exceeded.
// Documents never straddle shards, so /doc_offsets describes whole documents.
struct SplitWriter {
  std::string split;
  std::string dir;
  ShardMeta meta;  // the attributes shared by every shard of this run
  int64_t shard_tokens = 0;
  std::vector<uint32_t> tokens;    // (n,) this shard's tokens so far
  std::vector<uint64_t> offsets{0};  // (docs + 1,)
  std::vector<std::string> written;

  void add(const std::vector<int32_t>& ids, int32_t eos) {
    if (!tokens.empty() && int64_t(tokens.size() + ids.size() + 1) > shard_tokens) flush();
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    tokens.push_back(uint32_t(eos));
    offsets.push_back(tokens.size());
  }
  void flush() {
    if (tokens.empty()) return;
    char name[64];
    std::snprintf(name, sizeof(name), "%s_%06zu.h5", split.c_str(), written.size());
    std::string path = (fs::path(dir) / name).string();
    ShardMeta m = meta;
    m.split = split;
    m.shard_index = int64_t(written.size());
    write_shard(path, tokens, offsets, m);
    written.push_back(path);
    tokens.clear();
    offsets.assign(1, 0);
  }
};

struct TextBatch {
  std::vector<Document> docs;
  uint64_t bytes_read = 0;  // reader position after this batch (for progress)
};

}  // namespace

bool is_validation_document(std::string_view text, double val_fraction, uint64_t split_seed) {
  if (val_fraction <= 0) return false;
  uint64_t h = splitmix64(fnv1a64(text) ^ splitmix64(split_seed));
  double u = double(h >> 11) * (1.0 / 9007199254740992.0);  // [0, 1) from 53 bits
  return u < val_fraction;
}

PrepareStats prepare(const Tokenizer& tok, const PrepareOptions& o) {
  NHA_CHECK(tok.loaded()) << "prepare needs a tokenizer. HINT: --tokenizer tok.model";
  NHA_CHECK(tok.eos_id() >= 0) << "tokenizer '" << tok.name() << "' has no EOS token; documents "
                               << "are separated by EOS. HINT: train one with `nha tokenizer train`";
  NHA_CHECK(o.val_fraction >= 0 && o.val_fraction < 1)
      << "--val-fraction " << o.val_fraction << " must be in [0, 1). HINT: 0.01 holds out 1%";
  NHA_CHECK(!o.out_dir.empty()) << "no output directory. HINT: --out DIR";
  NHA_CHECK(o.shard_tokens >= 1024) << "shard_tokens " << o.shard_tokens << " is too small";
  NHA_CHECK(tok.vocab_size() <= (int64_t(1) << 32)) << "vocabulary too large for uint32 shards";

  std::vector<std::string> files = list_input_files(o.inputs);
  // An explicitly named empty file is almost certainly a mistake (a failed download, a typo).
  for (const std::string& input : o.inputs) {
    if (fs::is_regular_file(input)) {
      NHA_CHECK(fs::file_size(input) > 0) << "input file '" << input << "' is empty"
                                          << ". HINT: remove it from --input or fill it";
    }
  }

  // Refuse to mix with an earlier run's shards unless asked to replace them.
  fs::create_directories(o.out_dir);
  std::vector<std::string> old = find_shards(o.out_dir, "train");
  for (const std::string& v : find_shards(o.out_dir, "val")) old.push_back(v);
  fs::path manifest_path = fs::path(o.out_dir) / "manifest.json";
  if (fs::exists(manifest_path)) old.push_back(manifest_path.string());
  if (!old.empty()) {
    NHA_CHECK(o.force) << "output directory '" << o.out_dir << "' already holds shards (" << old[0]
                       << ", ...). HINT: pick another --out or pass --force to replace them";
    for (const std::string& p : old) fs::remove(p);
  }

  ShardMeta meta;
  meta.vocab_size = tok.vocab_size();
  meta.eos_id = tok.eos_id();
  meta.tokenizer_hash = tok.hash_hex();
  meta.tokenizer_name = tok.name();
  meta.token_bytes = tok.vocab_size() <= 65536 ? 2 : 4;
  meta.sources = o.inputs;
  SplitWriter writers[2];
  const char* split_names[2] = {"train", "val"};
  for (int s = 0; s < 2; ++s) {
    writers[s].split = split_names[s];
    writers[s].dir = o.out_dir;
    writers[s].meta = meta;
    writers[s].shard_tokens = o.shard_tokens;
  }

  const int threads = o.threads > 0 ? o.threads : omp_get_max_threads();
  const int32_t eos = tok.eos_id();
  PrepareStats stats;
  stats.files = int64_t(files.size());
  std::vector<int64_t> file_docs(files.size(), 0), file_tokens(files.size(), 0);

  DocumentReader reader(files, o.source);
  auto read_batch = [&reader, &o]() {
    TextBatch b;
    int64_t bytes = 0;
    Document doc;
    while (bytes < o.batch_bytes && reader.next(doc)) {
      bytes += int64_t(doc.text.size());
      b.docs.push_back(std::move(doc));
    }
    b.bytes_read = reader.bytes_read();
    return b;
  };

  const double t0 = now_seconds();
  double last_report = t0;
  auto report = [&](bool final) {
    double t = now_seconds() - t0;
    if (o.quiet || t <= 0) return;
    int64_t toks = stats.tokens[0] + stats.tokens[1];
    std::fprintf(stderr,
                 "prepare: %s%.1f MB text (%.2f MB/s) | %.2f M tokens (%.3f M tok/s) | %lld docs "
                 "(%lld val) | %.1f s\n",
                 final ? "done: " : "", double(stats.bytes) / 1e6, double(stats.bytes) / 1e6 / t,
                 double(toks) / 1e6, double(toks) / 1e6 / t,
                 (long long)(stats.documents[0] + stats.documents[1]),
                 (long long)stats.documents[1], t);
  };

  // On any error, delete the shards of this run: no manifest + stray shards would be confusing.
  auto remove_written = [&writers] {
    std::error_code ec;
    for (SplitWriter& w : writers)
      for (const std::string& p : w.written) fs::remove(p, ec);
  };
  try {
    // Read batch k+1 on a helper thread while batch k is being encoded.
    std::future<TextBatch> pending = std::async(std::launch::async, read_batch);
    std::vector<std::vector<int32_t>> ids;
    std::vector<uint8_t> is_val;
    while (true) {
      TextBatch batch = pending.get();  // rethrows the reader's errors (binary file, bad JSON...)
      if (batch.docs.empty()) break;
      pending = std::async(std::launch::async, read_batch);

      const int64_t n = int64_t(batch.docs.size());
      ids.resize(size_t(n));
      is_val.assign(size_t(n), 0);
      std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (int64_t i = 0; i < n; ++i) {
        try {
          ids[i].clear();
          tok.encode_append(batch.docs[i].text, ids[i]);
          is_val[i] = is_validation_document(batch.docs[i].text, o.val_fraction, o.split_seed);
        } catch (...) {
#pragma omp critical
          if (!error) error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);

      // Append in input order: the shards do not depend on the thread count.
      for (int64_t i = 0; i < n; ++i) {
        int s = is_val[i];
        writers[s].add(ids[i], eos);
        stats.documents[s] += 1;
        stats.tokens[s] += int64_t(ids[i].size()) + 1;
        file_docs[batch.docs[i].file_index] += 1;
        file_tokens[batch.docs[i].file_index] += int64_t(ids[i].size()) + 1;
      }
      stats.bytes = batch.bytes_read;
      if (now_seconds() - last_report >= o.progress_seconds) {
        last_report = now_seconds();
        report(false);
      }
    }
    NHA_CHECK(stats.documents[0] + stats.documents[1] > 0)
        << "no text found in the inputs (" << files.size() << " file(s), all empty or blank)"
        << ". HINT: check --input; JSONL files need a non-empty \"" << o.source.jsonl_field
        << "\" field";
    NHA_CHECK(stats.documents[0] > 0)
        << "every document went to the validation split. HINT: lower --val-fraction";
    for (int s = 0; s < 2; ++s) {
      writers[s].flush();
      stats.shards[s] = int64_t(writers[s].written.size());
      for (const std::string& p : writers[s].written) stats.shard_paths.push_back(p);
    }
  } catch (...) {
    remove_written();
    throw;
  }

  stats.seconds = now_seconds() - t0;
  report(true);
  if (!o.quiet && o.val_fraction > 0 && stats.documents[1] == 0) {
    std::fprintf(stderr, "prepare: warning: no document fell into the validation split "
                         "(%lld documents, --val-fraction %g)\n",
                 (long long)stats.documents[0], o.val_fraction);
  }
  if (!o.quiet) {
    int64_t empty = 0;
    for (size_t f = 0; f < files.size(); ++f) empty += file_docs[f] == 0;
    if (empty > 0) std::fprintf(stderr, "prepare: warning: %lld input file(s) held no text\n",
                                (long long)empty);
  }

  // The manifest is written last: its presence says the run finished.
  nlohmann::json m;
  m["format"] = kShardFormat;
  m["tokenizer"] = {{"name", tok.name()},
                    {"hash", tok.hash_hex()},
                    {"vocab_size", tok.vocab_size()},
                    {"eos_id", tok.eos_id()}};
  m["options"] = {{"val_fraction", o.val_fraction},
                  {"split_seed", o.split_seed},
                  {"doc_split", doc_split_name(o.source.doc_split)},
                  {"jsonl_field", o.source.jsonl_field},
                  {"shard_tokens", o.shard_tokens},
                  {"token_bytes", meta.token_bytes}};
  m["inputs"] = o.inputs;
  nlohmann::json jf = nlohmann::json::array();
  for (size_t f = 0; f < files.size(); ++f)
    jf.push_back({{"path", files[f]}, {"documents", file_docs[f]}, {"tokens", file_tokens[f]}});
  m["files"] = jf;
  for (int s = 0; s < 2; ++s) {
    nlohmann::json names = nlohmann::json::array();
    for (const std::string& p : writers[s].written) names.push_back(fs::path(p).filename().string());
    m["splits"][split_names[s]] = {
        {"documents", stats.documents[s]}, {"tokens", stats.tokens[s]}, {"shards", names}};
  }
  m["text_bytes"] = stats.bytes;
  m["seconds"] = stats.seconds;
  m["threads"] = threads;
  write_file_atomic(manifest_path.string(), m.dump(2) + "\n");
  return stats;
}

}  // namespace nha::data
