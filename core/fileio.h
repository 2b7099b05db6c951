// Files that are whole or absent, and proof that they are what was written.
// Writing: the bytes go to a temporary name in the same directory (unique per process) and are
// renamed over the final name only when completely written and synced, so readers see either the
// old file or the new one. Reading: integrity seals and per-dataset checksums (below).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace nha {

// Writes `contents` to `path` atomically (temp name, fsync, rename), creating parent directories.
// Every write is checked (a full disk); on failure the temp file is removed, `path` keeps what it
// held, and the error names the path. The temp name is PATH.tmp.<pid> (remove_stale_temp_files in
// train/checkpoint.h deletes those that killed processes left).
void write_file_atomic(const std::string& path, std::string_view contents);

// Reads exactly `n` bytes at `offset` of `fd` (retrying short reads); false at end of file (errno
// 0) or on an error (errno set).
bool pread_all(int fd, void* buf, size_t n, int64_t offset);

// ---- integrity seals ----------------------------------------------------------------------------
// HDF5 files we write (checkpoints, export files, token shards) start with a 512-byte HDF5 user
// block, which HDF5 and h5py skip. seal_image() writes into it a checksum of every byte after it:
//   "nha-seal-v1 xxh64=<16 hex digits> bytes=<N>\n" (zero padded)
// where the checksum is XXH64 chained over 1 MiB blocks (block k hashed with block k-1's hash as
// seed, the first with seed 0). check_seal() verifies it before HDF5 parses the file: HDF5 1.10
// crashes on some damaged metadata (a string length in its global heap), so a damaged file must be
// refused before it reaches the library. NHA_SKIP_CHECKSUMS=1 skips the hashing (not the size check).
inline constexpr int64_t kSealBytes = 512;

// XXH64 of `n` bytes (the reference algorithm by Yann Collet).
uint64_t xxh64(const void* data, size_t n, uint64_t seed);

// Writes the seal into the user block of a whole file's bytes (an HDF5 file image made with a
// kSealBytes user block), before the image is written with write_file_atomic.
void seal_image(std::string& image);

// Per-dataset checksums: every dataset we write carries the attribute kChecksumAttr (uint64), the
// XXH64 (seed 0) of its bytes as stored in the file (little-endian values; a string's bytes), so
// a damaged dataset is named even where the seal cannot be checked (hashing skipped, a file
// edited with h5py, which breaks the seal). Verified when present (older files lack it).
inline constexpr const char* kChecksumAttr = "xxh64";

// Refuses `n` bytes of `dataset` in `path` whose XXH64 differs from `stored`, with `hint`;
// nothing is checked when hashing is skipped (NHA_SKIP_CHECKSUMS=1).
void check_dataset_checksum(const std::string& path, const std::string& dataset, uint64_t stored,
                            const void* data, size_t n, const std::string& hint);

// true: the seal matched. false: the file has no seal (written before seals existed; its first
// bytes are the HDF5 signature; then its HDF5 global heaps are walked with bounds checks, the
// part of HDF5 1.10's reader that crashes on damage) or hashing is skipped. Throws an Error naming the file and ending
// with `hint` when the seal does not match, the size differs or the file is neither.
bool check_seal(const std::string& path, const std::string& hint);

}  // namespace nha
