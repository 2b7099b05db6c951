#include "train/safetensors.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/dtype.h"
#include "core/error.h"
#include "core/fileio.h"

namespace fs = std::filesystem;

namespace nha {

// Named ("safetensors I/O"), not anonymous: unity builds (scripts/test.sh) put this file in one
// unit with others, where anonymous names would collide.
namespace stio {

// The data section is copied to and from memory as is.
static_assert(std::endian::native == std::endian::little,
              "safetensors values are little-endian; this code assumes a little-endian host");

constexpr const char* kSafetensorsHint =
    "the file is damaged or not a safetensors file; download or export it again";
constexpr const char* kMetadataKey = "__metadata__";

// Bytes per element of every dtype the format defines, readable here or not, so that an
// unsupported dtype is told apart from a misspelt one. 0: not a safetensors dtype.
int64_t dtype_bytes(const std::string& dtype) {
  static const std::map<std::string, int64_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"U16", 2},  {"I16", 2}, {"F16", 2}, {"BF16", 2},    {"U32", 4},
      {"I32", 4},  {"F32", 4}, {"U64", 8}, {"I64", 8},     {"F64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

bool readable_dtype(const std::string& dtype) {
  return dtype == "F32" || dtype == "BF16" || dtype == "F16";
}

// IEEE binary16 -> f32, exact (every f16 value is an f32 value).
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu,
                 mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  // Normal numbers: the exponent rebiased from 15 to 127; inf/NaN keep the all-ones exponent.
  const uint32_t bits =
      sign | (exponent == 0x1f ? 0x7f800000u : (exponent + 112) << 23) | (mantissa << 13);
  return std::bit_cast<float>(bits);
}

// One header entry, checked against the data section's size.
struct Entry {
  std::string name, dtype;
  Shape shape;
  int64_t begin = 0, end = 0;  // byte range in the data section
};

// A non-negative JSON integer at most `max`, or an error naming the file, tensor and field.
int64_t bounded_integer(const nlohmann::json& j, int64_t max, const std::string& path,
                        const std::string& name, const char* field) {
  NHA_CHECK(j.is_number_unsigned() && j.get<uint64_t>() <= uint64_t(max))
      << "'" << path << "': tensor '" << name << "': " << field << " holds " << j.dump()
      << ", not an integer in [0, " << max << "]. HINT: " << kSafetensorsHint;
  return j.get<int64_t>();
}

Entry parse_entry(const std::string& path, const std::string& name, const nlohmann::json& j,
                  int64_t data_bytes) {
  Entry e;
  e.name = name;
  NHA_CHECK(j.is_object() && j.contains("dtype") && j["dtype"].is_string() && j.contains("shape") &&
            j["shape"].is_array() && j.contains("data_offsets") && j["data_offsets"].is_array() &&
            j["data_offsets"].size() == 2)
      << "'" << path << "': tensor '" << name << "' has the header entry " << j.dump()
      << ", not {\"dtype\": STRING, \"shape\": [...], \"data_offsets\": [BEGIN, END]}. HINT: "
      << kSafetensorsHint;
  e.dtype = j["dtype"].get<std::string>();
  const int64_t elem_bytes = dtype_bytes(e.dtype);
  NHA_CHECK(elem_bytes > 0) << "'" << path << "': tensor '" << name << "' has the unknown dtype '"
                            << e.dtype << "'. HINT: safetensors dtypes are F64, F32, F16, BF16, "
                            << "I64, I32, I16, I8, U8, BOOL, ...; " << kSafetensorsHint;
  // Dims are bounded by the data's size (every value takes at least one byte), so no product
  // overflows and no allocation exceeds what the file holds.
  int64_t numel = 1;
  for (const nlohmann::json& dim : j["shape"]) {
    const int64_t d = bounded_integer(dim, std::max<int64_t>(data_bytes, 1), path, name, "shape");
    NHA_CHECK(d == 0 || numel <= data_bytes / d)
        << "'" << path << "': tensor '" << name << "' has shape " << j["shape"].dump()
        << ": more values than the data section's " << data_bytes
        << " bytes. HINT: " << kSafetensorsHint;
    e.shape.push_back(d);
    numel *= d;
  }
  e.begin = bounded_integer(j["data_offsets"][0], data_bytes, path, name, "data_offsets[0]");
  NHA_CHECK(j["data_offsets"][1].is_number_unsigned() &&
            j["data_offsets"][1].get<uint64_t>() <= uint64_t(data_bytes))
      << "'" << path << "': tensor '" << name << "' has data_offsets " << j["data_offsets"].dump()
      << " beyond the data section of " << data_bytes << " bytes: the file is truncated or its "
      << "offsets are wrong. HINT: " << kSafetensorsHint;
  e.end = j["data_offsets"][1].get<int64_t>();
  NHA_CHECK(e.begin <= e.end) << "'" << path << "': tensor '" << name << "' has data_offsets "
                              << j["data_offsets"].dump()
                              << " with begin > end. HINT: " << kSafetensorsHint;
  NHA_CHECK(e.end - e.begin == numel * elem_bytes)
      << "'" << path << "': tensor '" << name << "' of shape " << j["shape"].dump() << " and dtype "
      << e.dtype << " needs " << numel * elem_bytes << " bytes but its data_offsets "
      << j["data_offsets"].dump() << " span " << e.end - e.begin << ". HINT: " << kSafetensorsHint;
  return e;
}

// The tensors, sorted by offset, must tile [0, data_bytes) exactly.
void check_coverage(const std::string& path, std::vector<Entry>& entries, int64_t data_bytes) {
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  int64_t covered = 0;  // the data section's bytes [0, covered) belong to the tensors so far
  const Entry* previous = nullptr;
  for (const Entry& e : entries) {
    NHA_CHECK(e.begin >= covered) << "'" << path << "': tensor '" << e.name << "' (bytes "
                                  << e.begin << ".." << e.end << ") overlaps tensor '"
                                  << previous->name << "' (bytes " << previous->begin << ".."
                                  << previous->end << "). HINT: " << kSafetensorsHint;
    NHA_CHECK(e.begin == covered) << "'" << path << "': the data section has a hole: bytes "
                                  << covered << ".." << e.begin << " before tensor '" << e.name
                                  << "' belong to no tensor. HINT: " << kSafetensorsHint;
    covered = e.end;
    previous = &e;
  }
  NHA_CHECK(covered == data_bytes)
      << "'" << path << "': the data section has " << data_bytes - covered << " bytes after the "
      << "last tensor (bytes " << covered << ".." << data_bytes
      << " belong to no tensor). HINT: " << kSafetensorsHint;
}

struct Header {
  std::vector<Entry> entries;  // sorted by offset
  std::map<std::string, std::string> metadata;
};

// Nesting of a valid header: {name: {"shape": [dims]}}. Deeper input is refused while parsing, so
// a hostile header cannot make the parsed value's (recursive) destruction overflow the stack.
constexpr int kMaxHeaderDepth = 3;

// Parses the header JSON; a key given twice is refused (a JSON parser would keep one silently).
nlohmann::json parse_header_json(const std::string& path, const std::string& text) {
  std::set<std::string> keys;
  std::string duplicate;
  const auto check_keys_and_depth = [&](int depth, nlohmann::json::parse_event_t event,
                                        nlohmann::json& parsed) {
    NHA_CHECK(depth <= kMaxHeaderDepth)
        << "'" << path << "': the header nests deeper than a safetensors header ever does. HINT: "
        << kSafetensorsHint;
    if (depth == 1 && event == nlohmann::json::parse_event_t::key &&
        !keys.insert(parsed.get<std::string>()).second)
      duplicate = parsed.get<std::string>();
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text, check_keys_and_depth);
  } catch (const nlohmann::json::exception& e) {
    NHA_FAIL() << "'" << path << "': the header is not valid JSON (" << e.what()
               << "). HINT: " << kSafetensorsHint;
  }
  NHA_CHECK(j.is_object()) << "'" << path
                           << "': the header is JSON but not an object. HINT: " << kSafetensorsHint;
  NHA_CHECK(duplicate.empty()) << "'" << path << "': the header names '" << duplicate
                               << "' twice. HINT: " << kSafetensorsHint;
  return j;
}

Header parse_header(const std::string& path, const std::string& text, int64_t data_bytes) {
  const nlohmann::json j = parse_header_json(path, text);
  Header h;
  for (const auto& [key, value] : j.items()) {
    if (key != kMetadataKey) {
      h.entries.push_back(parse_entry(path, key, value, data_bytes));
      continue;
    }
    NHA_CHECK(value.is_object()) << "'" << path << "': __metadata__ is " << value.dump()
                                 << ", not an object. HINT: " << kSafetensorsHint;
    for (const auto& [mkey, mvalue] : value.items()) {
      NHA_CHECK(mvalue.is_string())
          << "'" << path << "': __metadata__ key '" << mkey << "' holds " << mvalue.dump()
          << ", not a string. HINT: " << kSafetensorsHint;
      h.metadata[mkey] = mvalue.get<std::string>();
    }
  }
  check_coverage(path, h.entries, data_bytes);
  return h;
}

// The stored bytes of one entry as f32 values.
std::vector<float> to_float(const Entry& e, const std::string& raw) {
  const size_t n = raw.size() / size_t(dtype_bytes(e.dtype));
  std::vector<float> values(n);
  if (e.dtype == "F32") {
    std::memcpy(values.data(), raw.data(), raw.size());
    return values;
  }
  std::vector<uint16_t> bits(n);
  std::memcpy(bits.data(), raw.data(), raw.size());
  for (size_t i = 0; i < n; ++i)
    values[i] = e.dtype == "BF16" ? std::bit_cast<float>(uint32_t(bits[i]) << 16)  // the upper half
                                  : half_to_float(bits[i]);
  return values;
}

// Reads exactly `n` bytes at `offset`; an error names the file and `what`.
std::string read_bytes(std::ifstream& in, int64_t offset, int64_t n, const std::string& path,
                       const std::string& what) {
  std::string bytes(size_t(n), '\0');
  in.seekg(offset);
  in.read(bytes.data(), n);
  NHA_CHECK(in.good() || (n == 0 && !in.bad()))
      << "'" << path << "': cannot read " << what << " (" << n << " bytes at offset " << offset
      << "): the file changed or is unreadable. HINT: " << kSafetensorsHint;
  return bytes;
}

}  // namespace stio

const char* safetensors_dtype_name(DType dtype) {
  NHA_CHECK(dtype == DType::F32 || dtype == DType::BF16)
      << "safetensors files are written in f32 or bf16, not " << dtype_name(dtype)
      << ". HINT: --dtype fp32 or bf16";
  return dtype == DType::F32 ? "F32" : "BF16";
}

SafetensorsContents read_safetensors(const std::string& path) {
  NHA_CHECK(fs::is_regular_file(path))
      << "'" << path << "' does not exist or is not a file. HINT: a Hugging Face model directory "
      << "holds model.safetensors (or model-0000N-of-0000M.safetensors shards)";
  const int64_t file_bytes = int64_t(fs::file_size(path));
  std::ifstream in(path, std::ios::binary);
  NHA_CHECK(in) << "'" << path << "': cannot open for reading. HINT: check its permissions";
  NHA_CHECK(file_bytes >= 8) << "'" << path << "' has " << file_bytes
                             << " bytes, too few for the 8-byte header length. HINT: "
                             << stio::kSafetensorsHint;
  uint64_t header_bytes = 0;  // N, little-endian
  std::memcpy(&header_bytes, stio::read_bytes(in, 0, 8, path, "the header length").data(), 8);
  NHA_CHECK(header_bytes <= uint64_t(kSafetensorsMaxHeaderBytes))
      << "'" << path << "': the header length is " << header_bytes << " bytes, beyond the "
      << kSafetensorsMaxHeaderBytes << "-byte limit. HINT: " << stio::kSafetensorsHint;
  NHA_CHECK(int64_t(header_bytes) <= file_bytes - 8)
      << "'" << path << "': the header length " << header_bytes << " reaches beyond the file's "
      << file_bytes << " bytes. HINT: the file is truncated or " << stio::kSafetensorsHint;
  const int64_t data_start = 8 + int64_t(header_bytes), data_bytes = file_bytes - data_start;
  const stio::Header header = stio::parse_header(
      path, stio::read_bytes(in, 8, int64_t(header_bytes), path, "the header"), data_bytes);
  SafetensorsContents out;
  out.metadata = header.metadata;
  for (const stio::Entry& e : header.entries) {
    NHA_CHECK(stio::readable_dtype(e.dtype))
        << "'" << path << "': tensor '" << e.name << "' is " << e.dtype
        << ", which this reader does not take. HINT: F32, BF16 and F16 are read; convert the "
        << "model to one of them (e.g. torch_dtype bfloat16) first";
    const std::string raw = stio::read_bytes(in, data_start + e.begin, e.end - e.begin, path,
                                             "tensor '" + e.name + "'");
    out.tensors[e.name] = {Tensor::from_vector(stio::to_float(e, raw), e.shape), e.dtype};
  }
  return out;
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors, DType dtype,
                       const std::map<std::string, std::string>& metadata) {
  const std::string dtype_str = safetensors_dtype_name(dtype);
  nlohmann::ordered_json header;  // tensors in data order, which is the order given
  if (!metadata.empty()) header[stio::kMetadataKey] = metadata;
  std::string data;
  for (const auto& [name, t] : tensors) {
    NHA_CHECK(name != stio::kMetadataKey && !header.contains(name))
        << "'" << path << "': the tensor name '" << name << "' is reserved or given twice. HINT: "
        << "every tensor needs its own name";
    const std::vector<float> values = t.detach().to_vector<float>();
    const int64_t begin = int64_t(data.size());
    if (dtype == DType::F32) {
      data.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
    } else {
      std::vector<uint16_t> bits(values.size());
      for (size_t i = 0; i < values.size(); ++i) bits[i] = bf16::round_from_float(values[i]);
      data.append(reinterpret_cast<const char*>(bits.data()), bits.size() * sizeof(uint16_t));
    }
    header[name] = {{"dtype", dtype_str},
                    {"shape", t.shape()},
                    {"data_offsets", {begin, int64_t(data.size())}}};
  }
  std::string json = header.empty() ? std::string("{}") : header.dump();
  // Spaces pad the header so that the data starts 8-byte aligned (as the reference writer does).
  json.append((8 - json.size() % 8) % 8, ' ');
  const uint64_t header_bytes = json.size();
  std::string image(8, '\0');
  std::memcpy(image.data(), &header_bytes, 8);
  image += json;
  image += data;
  write_file_atomic(path, image);
}

}  // namespace nha
