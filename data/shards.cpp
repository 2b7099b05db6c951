#include "data/shards.h"

#include <H5Cpp.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>

#include "core/error.h"
#include "core/fileio.h"

namespace fs = std::filesystem;

namespace nha::data {

namespace {

// The HDF5 C++ API throws H5::Exception and, by default, also prints the library's error stack.
// We turn exceptions into nha::Error naming the file, so silence the stack once.
void quiet_hdf5() {
  static bool once = [] {
    H5::Exception::dontPrint();
    return true;
  }();
  (void)once;
}

[[noreturn]] void hdf5_fail(const std::string& path, const char* what, const H5::Exception& e) {
  NHA_FAIL() << "HDF5 error " << what << " '" << path << "': " << e.getFuncName() << ": "
             << e.getDetailMsg()
             << ". HINT: is it an NHA token shard (written by `nha prepare`) and the file whole? "
                "Re-run `nha prepare` if it was cut short";
}

H5::StrType vlen_utf8() {
  H5::StrType st(H5::PredType::C_S1, H5T_VARIABLE);
  st.setCset(H5T_CSET_UTF8);
  return st;
}

void write_attr(H5::H5File& f, const char* name, int64_t v) {
  H5::Attribute a = f.createAttribute(name, H5::PredType::STD_I64LE, H5::DataSpace(H5S_SCALAR));
  a.write(H5::PredType::NATIVE_INT64, &v);
}

void write_attr(H5::H5File& f, const char* name, const std::string& v) {
  H5::StrType st = vlen_utf8();
  H5::Attribute a = f.createAttribute(name, st, H5::DataSpace(H5S_SCALAR));
  a.write(st, v);
}

void write_attr(H5::H5File& f, const char* name, const std::vector<std::string>& v) {
  H5::StrType st = vlen_utf8();
  hsize_t n = v.size();
  H5::Attribute a = f.createAttribute(name, st, H5::DataSpace(1, &n));
  std::vector<const char*> ptrs;
  for (const std::string& s : v) ptrs.push_back(s.c_str());
  if (n > 0) a.write(st, ptrs.data());
}

// The per-dataset checksum (core/fileio.h) of the bytes as stored.
void write_checksum(H5::DataSet& ds, const void* bytes, size_t n) {
  const uint64_t h = xxh64(bytes, n, 0);
  H5::Attribute a =
      ds.createAttribute(kChecksumAttr, H5::PredType::STD_U64LE, H5::DataSpace(H5S_SCALAR));
  a.write(H5::PredType::NATIVE_UINT64, &h);
}

// The dataset's stored checksum, or nullopt for shards written before checksums.
std::optional<uint64_t> read_checksum(const H5::DataSet& ds) {
  if (!ds.attrExists(kChecksumAttr)) return std::nullopt;
  uint64_t h = 0;
  ds.openAttribute(kChecksumAttr).read(H5::PredType::NATIVE_UINT64, &h);
  return h;
}

int64_t read_int_attr(const H5::H5File& f, const char* name) {
  H5::Attribute a = f.openAttribute(name);
  int64_t v = 0;
  a.read(H5::PredType::NATIVE_INT64, &v);
  return v;
}

std::string read_str_attr(const H5::H5File& f, const char* name) {
  H5::Attribute a = f.openAttribute(name);
  std::string s;
  a.read(a.getStrType(), s);
  return s;
}

std::vector<std::string> read_str_list_attr(const H5::H5File& f, const char* name) {
  H5::Attribute a = f.openAttribute(name);
  hssize_t n = a.getSpace().getSimpleExtentNpoints();
  std::vector<std::string> out;
  if (n <= 0) return out;
  H5::StrType st = vlen_utf8();
  std::vector<char*> ptrs(size_t(n), nullptr);
  a.read(st, ptrs.data());
  for (char* p : ptrs) {
    out.emplace_back(p ? p : "");
    H5free_memory(p);
  }
  return out;
}

constexpr const char* kDamagedHint = "the shard is damaged; re-run `nha prepare`";

// Attributes in the ranges `nha prepare` writes: a damaged or hand-edited shard must not reach
// the loaders (a huge num_tokens or a negative eos_id would index out of bounds).
void check_meta(const ShardMeta& m, const std::string& path) {
  auto fail_unless = [&](bool ok, const char* what, int64_t v) {
    NHA_CHECK(ok) << "'" << path << "': attribute " << what << " = " << v
                  << " is out of range. HINT: " << kDamagedHint;
  };
  fail_unless(m.token_bytes == 2 || m.token_bytes == 4, "token size (bytes)", m.token_bytes);
  fail_unless(m.vocab_size > 0 && m.vocab_size <= (int64_t(1) << (8 * m.token_bytes)),
              "vocab_size", m.vocab_size);
  fail_unless(m.eos_id >= 0 && m.eos_id < m.vocab_size, "eos_id", m.eos_id);
  fail_unless(m.shard_index >= 0, "shard_index", m.shard_index);
  fail_unless(m.num_documents > 0, "num_documents", m.num_documents);
  fail_unless(m.num_tokens >= m.num_documents, "num_tokens", m.num_tokens);
  NHA_CHECK(m.split == "train" || m.split == "val")
      << "'" << path << "': attribute split is '" << m.split << "'. HINT: " << kDamagedHint;
}

ShardMeta read_meta(const H5::H5File& f) {
  ShardMeta m;
  m.format = read_str_attr(f, "format");
  m.split = read_str_attr(f, "split");
  m.shard_index = read_int_attr(f, "shard_index");
  m.vocab_size = read_int_attr(f, "vocab_size");
  m.eos_id = read_int_attr(f, "eos_id");
  m.tokenizer_hash = read_str_attr(f, "tokenizer_hash");
  m.tokenizer_name = read_str_attr(f, "tokenizer_name");
  m.num_documents = read_int_attr(f, "num_documents");
  m.num_tokens = read_int_attr(f, "num_tokens");
  m.sources = read_str_list_attr(f, "sources");
  H5::DataSet ds = f.openDataSet("tokens");
  m.token_bytes = int(ds.getDataType().getSize());
  return m;
}

// The shard's HDF5 file built in memory (core driver, no backing store): its bytes, which
// write_shard seals and writes with checked writes (HDF5 never writes to disk itself).
std::string shard_image(const std::string& path, const std::vector<uint32_t>& tokens,
                        const std::vector<uint64_t>& doc_offsets, const ShardMeta& meta) {
  // No modification times in object headers: the same tokens give byte-identical files.
  H5::FileCreatPropList fcpl;
  H5Pset_obj_track_times(fcpl.getId(), false);
  fcpl.setUserblock(hsize_t(kSealBytes));  // room for the integrity seal (core/fileio.h)
  H5::FileAccPropList fapl;
  fapl.setCore(size_t(64) << 20, false);
  H5::H5File f(path, H5F_ACC_TRUNC, fcpl, fapl);
  hsize_t n = tokens.size();
  H5::DataSpace space(1, &n);
  // Contiguous and unfiltered (the default layout): the loader maps the bytes directly.
  // HDF5 converts our uint32 buffer to the file's uint16 on the fly.
  const H5::PredType& file_type =
      meta.token_bytes == 2 ? H5::PredType::STD_U16LE : H5::PredType::STD_U32LE;
  H5::DSetCreatPropList dcpl;
  H5Pset_obj_track_times(dcpl.getId(), false);
  H5::DataSet ds = f.createDataSet("tokens", file_type, space, dcpl);
  ds.write(tokens.data(), H5::PredType::NATIVE_UINT32);
  if (meta.token_bytes == 2) {
    const std::vector<uint16_t> stored(tokens.begin(), tokens.end());  // as in the file
    write_checksum(ds, stored.data(), stored.size() * sizeof(uint16_t));
  } else {
    write_checksum(ds, tokens.data(), tokens.size() * sizeof(uint32_t));
  }
  hsize_t nd = doc_offsets.size();
  H5::DataSpace dspace(1, &nd);
  H5::DataSet offs = f.createDataSet("doc_offsets", H5::PredType::STD_U64LE, dspace, dcpl);
  offs.write(doc_offsets.data(), H5::PredType::NATIVE_UINT64);
  write_checksum(offs, doc_offsets.data(), doc_offsets.size() * sizeof(uint64_t));
  write_attr(f, "format", meta.format);
  write_attr(f, "split", meta.split);
  write_attr(f, "shard_index", meta.shard_index);
  write_attr(f, "vocab_size", meta.vocab_size);
  write_attr(f, "eos_id", meta.eos_id);
  write_attr(f, "tokenizer_hash", meta.tokenizer_hash);
  write_attr(f, "tokenizer_name", meta.tokenizer_name);
  write_attr(f, "num_documents", meta.num_documents);
  write_attr(f, "num_tokens", meta.num_tokens);
  write_attr(f, "sources", meta.sources);
  ds.close();
  offs.close();
  f.flush(H5F_SCOPE_GLOBAL);
  // HDF5's image starts at the superblock: the user block goes in front of it.
  const ssize_t size = H5Fget_file_image(f.getId(), nullptr, 0);
  NHA_CHECK(size > 0) << "internal: no HDF5 file image of shard '" << path << "'";
  std::string image(size_t(kSealBytes + size), '\0');
  NHA_CHECK(H5Fget_file_image(f.getId(), image.data() + kSealBytes, size_t(size)) == size)
      << "internal: cannot copy the HDF5 file image of shard '" << path << "'";
  return image;
}

}  // namespace

void write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                 const std::vector<uint64_t>& doc_offsets, ShardMeta meta) {
  quiet_hdf5();
  NHA_CHECK(!tokens.empty() && doc_offsets.size() >= 2 && doc_offsets.back() == tokens.size())
      << "internal: shard " << path << " would be empty or inconsistent";
  NHA_CHECK(meta.token_bytes == 2 || meta.token_bytes == 4) << "token_bytes " << meta.token_bytes;
  meta.num_tokens = int64_t(tokens.size());
  meta.num_documents = int64_t(doc_offsets.size()) - 1;
  std::string image;
  try {
    image = shard_image(path, tokens, doc_offsets, meta);
  } catch (const H5::Exception& e) {
    hdf5_fail(path, "writing", e);
  }
  seal_image(image);
  write_file_atomic(path, image);  // temp name, checked writes, fsync, rename
}

ShardMeta read_shard_meta(const std::string& path) {
  quiet_hdf5();
  NHA_CHECK(fs::is_regular_file(path)) << "token shard '" << path << "' does not exist"
                                       << ". HINT: create shards with `nha prepare`";
  check_seal(path, kDamagedHint);
  ShardMeta m;
  try {
    H5::H5File f(path, H5F_ACC_RDONLY);
    m = read_meta(f);
  } catch (const H5::Exception& e) {
    hdf5_fail(path, "reading", e);
  }
  NHA_CHECK(m.format == kShardFormat)
      << "'" << path << "' has format '" << m.format << "', expected '" << kShardFormat
      << "'. HINT: re-create the shards with this version's `nha prepare`";
  check_meta(m, path);
  return m;
}

TokenShard::TokenShard(const std::string& path) : path_(path) {
  quiet_hdf5();
  meta_ = read_shard_meta(path);
  haddr_t offset = HADDR_UNDEF;
  std::optional<uint64_t> tokens_checksum;
  try {
    H5::H5File f(path, H5F_ACC_RDONLY);
    H5::DataSet ds = f.openDataSet("tokens");
    tokens_checksum = read_checksum(ds);
    H5::IntType type = ds.getIntType();
    NHA_CHECK(type.getSign() == H5T_SGN_NONE && (meta_.token_bytes == 2 || meta_.token_bytes == 4))
        << "'" << path << "': /tokens must be uint16 or uint32"
        << ". HINT: re-create the shards with `nha prepare`";
    hssize_t n = ds.getSpace().getSimpleExtentNpoints();
    NHA_CHECK(n == meta_.num_tokens) << "'" << path << "': /tokens holds " << n
                                     << " tokens but the num_tokens attribute says "
                                     << meta_.num_tokens << ". HINT: the shard is damaged; "
                                     << "re-run `nha prepare`";
    H5::DataSet offs = f.openDataSet("doc_offsets");
    NHA_CHECK(offs.getSpace().getSimpleExtentNpoints() == meta_.num_documents + 1)
        << "'" << path << "': /doc_offsets does not hold num_documents + 1 entries. HINT: "
        << kDamagedHint;
    doc_offsets_.resize(size_t(meta_.num_documents + 1));
    offs.read(doc_offsets_.data(), H5::PredType::NATIVE_UINT64);
    if (const auto h = read_checksum(offs))
      check_dataset_checksum(path, "/doc_offsets", *h, doc_offsets_.data(),
                             doc_offsets_.size() * sizeof(uint64_t), kDamagedHint);
    NHA_CHECK(doc_offsets_.front() == 0 && int64_t(doc_offsets_.back()) == meta_.num_tokens &&
              std::is_sorted(doc_offsets_.begin(), doc_offsets_.end()))
        << "'" << path << "': /doc_offsets is not an increasing list from 0 to num_tokens"
        << ". HINT: " << kDamagedHint;
    // Map directly when the bytes sit contiguously, unfiltered, little-endian in the file.
    H5::DSetCreatPropList plist = ds.getCreatePlist();
    bool mappable = plist.getLayout() == H5D_CONTIGUOUS && plist.getNfilters() == 0 &&
                    type.getOrder() == H5T_ORDER_LE;
    if (mappable) offset = ds.getOffset();
    if (offset == HADDR_UNDEF) {
      owned_.resize(size_t(n) * size_t(meta_.token_bytes));
      ds.read(owned_.data(), meta_.token_bytes == 2 ? H5::PredType::NATIVE_UINT16
                                                    : H5::PredType::NATIVE_UINT32);
      tokens_ = owned_.data();
    }
  } catch (const H5::Exception& e) {
    hdf5_fail(path, "reading", e);
  }
  // A failed check must not leak the mapping or the descriptor (no destructor runs).
  try {
    if (offset != HADDR_UNDEF) map_tokens(size_t(offset));
    if (tokens_checksum)
      check_dataset_checksum(path, "/tokens", *tokens_checksum, tokens_,
                             size_t(meta_.num_tokens) * size_t(meta_.token_bytes), kDamagedHint);
  } catch (...) {
    release();
    throw;
  }
}

void TokenShard::map_tokens(size_t offset) {
  // The descriptor stays open: copy() checks through it that the file was not changed in place.
  fd_ = ::open(path_.c_str(), O_RDONLY);
  NHA_CHECK(fd_ >= 0) << "cannot open '" << path_ << "': " << std::strerror(errno)
                      << ". HINT: check permissions";
  struct stat st {};
  ::fstat(fd_, &st);
  map_bytes_ = size_t(st.st_size);
  mtime_ns_ = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  size_t need = offset + size_t(meta_.num_tokens) * size_t(meta_.token_bytes);
  NHA_CHECK(map_bytes_ >= need)
      << "'" << path_ << "' is shorter (" << map_bytes_ << " bytes) than its token array needs ("
      << need << "). HINT: the file is truncated; re-run `nha prepare`";
  void* p = ::mmap(nullptr, map_bytes_, PROT_READ, MAP_SHARED, fd_, 0);
  NHA_CHECK(p != MAP_FAILED) << "mmap of '" << path_ << "' failed: " << std::strerror(errno)
                             << ". HINT: check the address-space limit (ulimit -v)";
  map_ = p;
  tokens_ = static_cast<const char*>(p) + offset;
}

void TokenShard::release() {
  if (map_) ::munmap(map_, map_bytes_);
  if (fd_ >= 0) ::close(fd_);
  map_ = nullptr;
  fd_ = -1;
}

TokenShard::~TokenShard() { release(); }

// Reading a mapped page past the end of a file truncated under us raises SIGBUS: look first (one
// fstat per window). `nha prepare` replaces shards by rename, which leaves our open file as it was.
void TokenShard::check_unchanged() const {
  struct stat st {};
  NHA_CHECK(::fstat(fd_, &st) == 0) << "cannot stat '" << path_ << "': " << std::strerror(errno);
  const int64_t mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  NHA_CHECK(size_t(st.st_size) == map_bytes_ && mtime_ns == mtime_ns_)
      << "'" << path_ << "' was changed while in use (" << map_bytes_ << " bytes when opened, "
      << st.st_size << " now). HINT: never rewrite or truncate shards under a running job; write "
      << "new shards to another directory with `nha prepare --out NEW`";
}

void TokenShard::copy(int64_t start, int64_t n, int32_t* out) const {
  NHA_CHECK(start >= 0 && n >= 0 && start + n <= size())
      << "internal: window [" << start << ", " << start + n << ") outside shard " << path_ << " of "
      << size() << " tokens";
  const size_t bytes = size_t(meta_.token_bytes);
  const void* tokens = static_cast<const char*>(tokens_) + size_t(start) * bytes;
  std::vector<char> read;
  if (map_) {
    // Read, not the mapping: a file cut short under the job gives a short read, an error here,
    // where touching a lost page of the mapping raises SIGBUS.
    check_unchanged();
    read.resize(size_t(n) * bytes);
    const int64_t at = static_cast<const char*>(tokens) - static_cast<const char*>(map_);
    NHA_CHECK(pread_all(fd_, read.data(), read.size(), at))
        << "cannot read tokens [" << start << ", " << start + n << ") of '" << path_
        << "': " << (errno ? std::strerror(errno) : "the file is shorter than when opened")
        << ". HINT: never rewrite or truncate shards under a running job";
    tokens = read.data();
  }
  uint32_t max_id = 0;
  if (meta_.token_bytes == 2) {
    const uint16_t* src = static_cast<const uint16_t*>(tokens);
    for (int64_t i = 0; i < n; ++i) {
      out[i] = int32_t(src[i]);
      max_id = std::max<uint32_t>(max_id, src[i]);
    }
  } else {
    const uint32_t* src = static_cast<const uint32_t*>(tokens);
    for (int64_t i = 0; i < n; ++i) {
      out[i] = int32_t(src[i]);
      max_id = std::max<uint32_t>(max_id, src[i]);
    }
  }
  // A bad id would index past the embedding table on the GPU; catch it here, cheaply.
  NHA_CHECK(n == 0 || int64_t(max_id) < meta_.vocab_size)
      << "token id " << max_id << " in '" << path_ << "' is >= the shard's vocab_size "
      << meta_.vocab_size << ". HINT: the shard is damaged; re-run `nha prepare`";
}

std::vector<std::string> find_shards(const std::string& dir, const std::string& split) {
  NHA_CHECK(fs::is_directory(dir)) << "data directory '" << dir << "' does not exist"
                                   << ". HINT: create it with `nha prepare --out " << dir << " ...`";
  std::vector<std::string> out;
  std::string prefix = split + "_";
  for (const auto& e : fs::directory_iterator(dir)) {
    std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) == 0 && name.size() > 3 && name.substr(name.size() - 3) == ".h5")
      out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace nha::data
