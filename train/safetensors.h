// The safetensors file format (Hugging Face's), written here from its specification:
//
//   bytes 0..7       N, the header length (unsigned 64-bit little-endian)
//   bytes 8..8+N-1   JSON object (UTF-8, may end in spaces):
//                      {"NAME": {"dtype": "F32", "shape": [d0, d1], "data_offsets": [begin, end]},
//                       ..., "__metadata__": {"key": "value", ...}}   (__metadata__ optional)
//   bytes 8+N..      the data section: each tensor's values row-major, little-endian, at
//                    [begin, end) relative to the start of the data section
// The tensors must cover the data section exactly: no holes, no overlaps, nothing after the last.
// Readers here take F32, BF16 and F16 (converted to f32 exactly); writers write F32 or BF16.
// Every error names the file (and the tensor) and says what is wrong, with a HINT; a damaged or
// hostile file never makes the reader allocate more than the file holds.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace nha {

// A header larger than this is refused without being read (the reference implementation's limit).
inline constexpr int64_t kSafetensorsMaxHeaderBytes = int64_t(100) << 20;

struct SafetensorsTensor {
  Tensor value;       // f32 CPU, the stored shape
  std::string dtype;  // as stored: "F32", "BF16" or "F16"
};

struct SafetensorsContents {
  std::map<std::string, SafetensorsTensor> tensors;
  std::map<std::string, std::string> metadata;  // __metadata__ (empty when absent)
};

// Reads and validates a whole file.
SafetensorsContents read_safetensors(const std::string& path);

// Writes `tensors` (any dtype and device; stored in this order) as `dtype` (F32 or BF16, rounded to
// nearest even) atomically (core/fileio.h), with `metadata` as __metadata__.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors, DType dtype,
                       const std::map<std::string, std::string>& metadata);

// "F32" / "BF16" for the dtypes write_safetensors takes.
const char* safetensors_dtype_name(DType dtype);

}  // namespace nha
