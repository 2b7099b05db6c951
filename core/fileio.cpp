#include "core/fileio.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <vector>

#include "core/error.h"

namespace nha {

namespace fs = std::filesystem;

bool pread_all(int fd, void* buf, size_t n, int64_t offset) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, off_t(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) errno = 0;  // end of file, not an error
    if (r <= 0) return false;
    p += r;
    n -= size_t(r);
    offset += r;
  }
  return true;
}

namespace {

// NAME.tmp.<pid>: unique per process, in the same directory (rename stays atomic), and never a
// name readers take for a result (checkpoints are step_<digits>.h5, shards *_NNNNNN.h5).
std::string temp_path_for(const std::string& path) {
  return path + ".tmp." + std::to_string(::getpid());
}

// A file descriptor closed at scope exit.
struct Fd {
  int fd;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

// Writes all of `bytes`; the errno of the failure otherwise (a short write is ENOSPC).
int write_all(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t w = ::write(fd, bytes.data(), bytes.size());
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return w < 0 ? errno : ENOSPC;
    bytes.remove_prefix(size_t(w));
  }
  return 0;
}

// The temp file, written, synced and closed: every step checked (a full disk may only show at
// fsync or close). Returns 0 or the errno of the step that failed.
int write_synced(const std::string& tmp, std::string_view contents) {
  Fd f(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (f.fd < 0) return errno;
  if (const int err = write_all(f.fd, contents)) return err;
  if (::fsync(f.fd) != 0) return errno;
  const int fd = f.fd;
  f.fd = -1;
  return ::close(fd) == 0 ? 0 : errno;
}

}  // namespace

void write_file_atomic(const std::string& path, std::string_view contents) {
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  const std::string tmp = temp_path_for(path);
  const int err = write_synced(tmp, contents);
  std::error_code ec;
  if (err != 0) fs::remove(tmp, ec);
  NHA_CHECK(err == 0) << "writing '" << tmp << "' failed: " << std::strerror(err) << "; '" << path
                      << "' was left as it was. HINT: is the disk full or the directory read-only?";
  fs::rename(tmp, path, ec);
  if (ec) fs::remove(tmp);
  NHA_CHECK(!ec) << "cannot rename '" << tmp << "' to '" << path << "': " << ec.message();
}

// ---- integrity seals ----------------------------------------------------------------------------

namespace {

constexpr uint64_t kP1 = 11400714785074694791ULL, kP2 = 14029467366897019727ULL,
                   kP3 = 1609587929392839161ULL, kP4 = 9650029242287828579ULL,
                   kP5 = 2870177450012600261ULL;
constexpr size_t kSealBlock = size_t(1) << 20;
constexpr char kSealMagic[] = "nha-seal-v1 ";
constexpr char kHdf5Signature[] = "\x89HDF\r\n\x1a\n";

uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian hosts only (x86-64, aarch64), as the rest of the code
  return v;
}
uint32_t load32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t xxh_round(uint64_t acc, uint64_t input) { return rotl(acc + input * kP2, 31) * kP1; }
uint64_t xxh_merge(uint64_t acc, uint64_t v) { return (acc ^ xxh_round(0, v)) * kP1 + kP4; }

// The chained block hash of bytes [kSealBytes, kSealBytes + n) (see fileio.h).
uint64_t hash_after_seal(int fd, int64_t n, const std::string& path) {
  std::vector<unsigned char> buf(kSealBlock);
  uint64_t h = 0;
  for (int64_t done = 0; done < n;) {
    const size_t len = size_t(std::min<int64_t>(n - done, int64_t(kSealBlock)));
    NHA_CHECK(pread_all(fd, buf.data(), len, kSealBytes + done))
        << "cannot read '" << path << "': " << std::strerror(errno) << ". HINT: is the file whole?";
    h = xxh64(buf.data(), len, h);
    done += int64_t(len);
  }
  return h;
}

// HDF5 1.10 walks a global heap collection ("GCOL", version 1, 3 reserved bytes, its size; then
// objects: index u16, refcount u16, 4 reserved bytes, size u64, data padded to 8 bytes; index 0
// is the free space, whose size includes its header) without bounds checks: a changed object
// size sends it copying gigabytes (H5HG_read). Files without a seal get this walk, bounded, first.
void check_global_heap(int fd, int64_t at, int64_t file_size, const std::string& path,
                       const std::string& hint) {
  unsigned char head[16];
  if (!pread_all(fd, head, sizeof(head), at) || head[4] != 1 || head[5] || head[6] || head[7])
    return;  // "GCOL" inside data, not a collection header
  const uint64_t size = load64(head + 8);
  NHA_CHECK(size >= 4096 && size <= uint64_t(file_size - at))
      << "'" << path << "' is damaged: the HDF5 global heap at byte " << at << " claims " << size
      << " bytes. HINT: " << hint;
  std::vector<unsigned char> heap(size);
  NHA_CHECK(pread_all(fd, heap.data(), heap.size(), at))
      << "cannot read '" << path << "': " << std::strerror(errno);
  for (uint64_t p = 16; p + 16 <= size;) {
    const unsigned idx = unsigned(heap[p]) | unsigned(heap[p + 1]) << 8;
    const uint64_t obj = load64(heap.data() + p + 8);
    const uint64_t padded = obj > size ? UINT64_MAX : 16 + ((obj + 7) & ~uint64_t(7));  // no wrap
    const uint64_t need = idx > 0 ? padded : obj;
    NHA_CHECK(need > 0 && need <= size - p)
        << "'" << path << "' is damaged: object " << idx << " of the HDF5 global heap at byte "
        << at << " claims " << obj << " bytes, more than the heap holds. HINT: " << hint;
    p += need;
  }
}

// Every global heap collection of a file (found by its signature).
void check_global_heaps(int fd, int64_t file_size, const std::string& path, const std::string& hint) {
  constexpr size_t kOverlap = 3;  // a signature across two blocks
  std::vector<char> buf(kSealBlock + kOverlap);
  for (int64_t start = 0; start < file_size; start += int64_t(kSealBlock)) {
    const size_t len = size_t(std::min<int64_t>(file_size - start, int64_t(buf.size())));
    NHA_CHECK(pread_all(fd, buf.data(), len, start))
        << "cannot read '" << path << "': " << std::strerror(errno);
    for (const char* p = buf.data(); (p = static_cast<const char*>(
                                          memmem(p, size_t(buf.data() + len - p), "GCOL", 4)));
         ++p)
      if (p - buf.data() < int64_t(kSealBlock))  // the overlap is the next block's
        check_global_heap(fd, start + (p - buf.data()), file_size, path, hint);
  }
}

bool checksums_skipped() {
  const char* v = std::getenv("NHA_SKIP_CHECKSUMS");
  return v && *v && std::string(v) != "0";
}

}  // namespace

uint64_t xxh64(const void* data, size_t n, uint64_t seed) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  const unsigned char* const end = p + n;
  uint64_t h;
  if (n >= 32) {
    uint64_t v1 = seed + kP1 + kP2, v2 = seed + kP2, v3 = seed, v4 = seed - kP1;
    for (; p + 32 <= end; p += 32) {
      v1 = xxh_round(v1, load64(p));
      v2 = xxh_round(v2, load64(p + 8));
      v3 = xxh_round(v3, load64(p + 16));
      v4 = xxh_round(v4, load64(p + 24));
    }
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = xxh_merge(xxh_merge(xxh_merge(xxh_merge(h, v1), v2), v3), v4);
  } else {
    h = seed + kP5;
  }
  h += uint64_t(n);
  for (; p + 8 <= end; p += 8) h = rotl(h ^ xxh_round(0, load64(p)), 27) * kP1 + kP4;
  if (p + 4 <= end) {
    h = rotl(h ^ (uint64_t(load32(p)) * kP1), 23) * kP2 + kP3;
    p += 4;
  }
  for (; p < end; ++p) h = rotl(h ^ (uint64_t(*p) * kP5), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

void seal_image(std::string& image) {
  NHA_CHECK(image.size() >= size_t(kSealBytes) + 8 &&
            std::memcmp(image.data() + kSealBytes, kHdf5Signature, 8) == 0)
      << "internal: the HDF5 image has no " << kSealBytes << "-byte user block to seal";
  const auto* data = reinterpret_cast<const unsigned char*>(image.data()) + kSealBytes;
  const size_t n = image.size() - size_t(kSealBytes);
  uint64_t h = 0;
  for (size_t done = 0; done < n; done += kSealBlock)
    h = xxh64(data + done, std::min(kSealBlock, n - done), h);
  char seal[kSealBytes] = {};
  std::snprintf(seal, sizeof(seal), "%sxxh64=%016" PRIx64 " bytes=%zu\n", kSealMagic, h, n);
  std::memcpy(image.data(), seal, sizeof(seal));
}

// ---- per-dataset checksums ---------------------------------------------------------------------

void check_dataset_checksum(const std::string& path, const std::string& dataset, uint64_t stored,
                            const void* data, size_t n, const std::string& hint) {
  if (checksums_skipped()) return;
  const uint64_t got = xxh64(data, n, 0);
  char got_hex[17], want_hex[17];
  std::snprintf(got_hex, sizeof(got_hex), "%016" PRIx64, got);
  std::snprintf(want_hex, sizeof(want_hex), "%016" PRIx64, stored);
  NHA_CHECK(got == stored) << "'" << path << "': dataset '" << dataset << "' is damaged: its "
                           << "checksum is " << got_hex << " but it was written with " << want_hex
                           << ". HINT: " << hint;
}

bool check_seal(const std::string& path, const std::string& hint) {
  Fd f(::open(path.c_str(), O_RDONLY));
  NHA_CHECK(f.fd >= 0) << "cannot open '" << path << "': " << std::strerror(errno)
                       << ". HINT: check the path and its permissions";
  const int64_t size = int64_t(::lseek(f.fd, 0, SEEK_END));
  char seal[kSealBytes + 1] = {};
  const bool whole_block = pread_all(f.fd, seal, size_t(std::min(size, kSealBytes)), 0) &&
                           size >= kSealBytes;
  if (size >= 8 && std::memcmp(seal, kHdf5Signature, 8) == 0) {  // written before seals
    check_global_heaps(f.fd, size, path, hint);
    return false;
  }
  uint64_t want = 0;
  long long bytes = -1;
  NHA_CHECK(whole_block && std::memcmp(seal, kSealMagic, sizeof(kSealMagic) - 1) == 0 &&
            std::sscanf(seal + sizeof(kSealMagic) - 1, "xxh64=%16" SCNx64 " bytes=%lld", &want,
                        &bytes) == 2)
      << "'" << path << "' is damaged or not an NHA HDF5 file: its first bytes are neither an "
      << "integrity seal nor the HDF5 signature. HINT: " << hint;
  NHA_CHECK(bytes == size - kSealBytes)
      << "'" << path << "' is damaged: " << size - kSealBytes << " bytes follow its seal, which "
      << "was made over " << bytes << " (the file was cut short or appended to). HINT: " << hint;
  if (checksums_skipped()) return false;
  const uint64_t got = hash_after_seal(f.fd, bytes, path);
  char got_hex[17], want_hex[17];
  std::snprintf(got_hex, sizeof(got_hex), "%016" PRIx64, got);
  std::snprintf(want_hex, sizeof(want_hex), "%016" PRIx64, want);
  NHA_CHECK(got == want) << "'" << path << "' is damaged: its content checksum is " << got_hex
                         << " but the file was written with " << want_hex
                         << " (NHA_SKIP_CHECKSUMS=1 skips this check at your own risk). HINT: "
                         << hint;
  return true;
}

}  // namespace nha
