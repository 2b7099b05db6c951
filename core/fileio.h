// Writing files so that nothing already written is ever half-overwritten: the bytes go to a
// temporary name in the same directory (unique per process) and are renamed over the final name
// only when completely written, so readers see either the old file or the new one.
#pragma once
#include <string>
#include <string_view>

namespace nha {

// Writes `contents` to `path` atomically (temp name + rename), creating parent directories.
// Fails with a message naming the path when the write or the rename fails.
void write_file_atomic(const std::string& path, std::string_view contents);

// The temporary name write_file_atomic uses for `path` (for writers that stream, e.g. HDF5).
std::string temp_path_for(const std::string& path);

}  // namespace nha
