// HDF5 token shards: the on-disk format written by `nha prepare` and read by the loaders.
//
// One file per shard, DIR/{train,val}_NNNNNN.h5, readable with h5py:
//   /tokens       uint16 (vocab <= 65536) or uint32, shape (num_tokens,), contiguous, uncompressed
//                 (so readers can mmap it); every document is its tokens followed by EOS
//   /doc_offsets  uint64, shape (num_documents + 1,): document d is tokens[off[d]:off[d+1]]
//   attributes on the root group "/":
//     format "nha-tokens-v1", split "train"|"val", shard_index, vocab_size, eos_id,
//     tokenizer_hash "fnv1a64:...", tokenizer_name, num_documents, num_tokens, sources (strings)
// Shards are written under a temporary name and renamed when complete: a file with the final
// name is always whole. A 512-byte user block before the HDF5 data holds the integrity seal
// (core/fileio.h), verified on open. DIR/manifest.json, written last, lists every shard and the run's numbers.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace nha::data {

inline constexpr const char* kShardFormat = "nha-tokens-v1";

struct ShardMeta {
  std::string format = kShardFormat;
  std::string split;  // "train" or "val"
  int64_t shard_index = 0;
  int64_t vocab_size = 0;
  int64_t eos_id = -1;
  std::string tokenizer_hash;
  std::string tokenizer_name;
  int64_t num_documents = 0;
  int64_t num_tokens = 0;
  int token_bytes = 2;  // 2 (uint16) or 4 (uint32)
  std::vector<std::string> sources;
};

// Writes one complete shard (temp name + rename). tokens: [num_tokens], doc_offsets:
// [num_documents + 1]. meta.num_tokens/num_documents are taken from the arrays.
void write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                 const std::vector<uint64_t>& doc_offsets, ShardMeta meta);

// Reads only the attributes (cheap; `nha data info`, checks).
ShardMeta read_shard_meta(const std::string& path);

// A shard opened for reading: tokens memory-mapped when the dataset is contiguous (always, for
// files we write; read into memory otherwise), document offsets loaded. Opening verifies the
// file's integrity seal (core/fileio.h), the datasets' checksums and the attributes' ranges.
// copy() reads with pread, not through the mapping, and checks the file's size and mtime first:
// a shard cut or rewritten under a running job is an error, never SIGBUS.
class TokenShard {
 public:
  explicit TokenShard(const std::string& path);
  ~TokenShard();
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  const ShardMeta& meta() const { return meta_; }
  const std::string& path() const { return path_; }
  int64_t size() const { return meta_.num_tokens; }
  uint32_t token(int64_t i) const {
    return meta_.token_bytes == 2 ? static_cast<const uint16_t*>(tokens_)[i]
                                  : static_cast<const uint32_t*>(tokens_)[i];
  }
  // out[i] = tokens[start + i] for i < n, as int32 (the loaders' batch type).
  void copy(int64_t start, int64_t n, int32_t* out) const;
  const std::vector<uint64_t>& doc_offsets() const { return doc_offsets_; }
  bool mmapped() const { return map_ != nullptr; }

 private:
  void map_tokens(size_t offset);  // maps the file; tokens_ = its bytes from `offset`
  void release();                  // unmaps and closes
  void check_unchanged() const;    // the mapped file still has its size and mtime from opening


  std::string path_;
  ShardMeta meta_;
  const void* tokens_ = nullptr;
  void* map_ = nullptr;  // the whole mmapped file (tokens_ points inside)
  size_t map_bytes_ = 0;
  int fd_ = -1;          // of the mapped file
  int64_t mtime_ns_ = 0;  // its modification time when opened
  std::vector<uint8_t> owned_;  // tokens when not mmapped
  std::vector<uint64_t> doc_offsets_;
};

// Shards of a directory for one split, sorted by name: DIR/train_*.h5 or DIR/val_*.h5.
std::vector<std::string> find_shards(const std::string& dir, const std::string& split);

}  // namespace nha::data
