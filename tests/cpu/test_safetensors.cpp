// The safetensors reader and writer (train/safetensors.h): F32/BF16 round trips, F16 read exactly,
// the header's layout, and every kind of damaged or hostile file refused with an error that names
// the file, the tensor and what is wrong (never a crash).
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "common/testing.h"
#include "core/dtype.h"
#include "train/safetensors.h"

namespace fs = std::filesystem;

namespace nha {
namespace {

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::temp_dir("safetensors"); }
  void TearDown() override { fs::remove_all(dir_); }

  // A file of the 8-byte little-endian `header_length`, the header text and the data bytes.
  std::string craft(const std::string& name, const std::string& header, const std::string& data,
                    uint64_t header_length) {
    const std::string path = dir_ + "/" + name;
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(&header_length), 8);
    out << header << data;
    return path;
  }
  std::string craft(const std::string& name, const std::string& header, const std::string& data) {
    return craft(name, header, data, header.size());
  }
  // `path` must be refused with an error holding every part, the path and a HINT.
  void expect_refused(const std::string& path, std::vector<std::string> parts) {
    parts.push_back(path);
    parts.push_back("HINT");
    testing::expect_error([&] { read_safetensors(path); }, parts);
  }
  std::string dir_;
};

// Two f32 tensors of 2 and 4 values (8 + 16 bytes) as a data section.
const std::string kSixFloats(24, '\0');

TEST_F(Safetensors, F32RoundTripIsBitwiseAndKeepsOrderAndMetadata) {
  const Tensor a = testing::randn({3, 5}, 1, DType::F32), b = testing::randn({7}, 2, DType::F32);
  const Tensor scalar = Tensor::from_vector<float>({2.5f}, {});
  const std::string path = dir_ + "/sub/model.safetensors";  // parent directory created
  write_safetensors(path, {{"b.weight", b}, {"a", a}, {"s", scalar}}, DType::F32,
                    {{"format", "pt"}});
  const SafetensorsContents c = read_safetensors(path);
  ASSERT_EQ(c.tensors.size(), 3u);
  EXPECT_EQ(c.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_EQ(c.tensors.at("a").dtype, "F32");
  EXPECT_EQ(c.tensors.at("a").value.to_vector<float>(), a.to_vector<float>());
  EXPECT_EQ(c.tensors.at("b.weight").value.to_vector<float>(), b.to_vector<float>());
  EXPECT_EQ(c.tensors.at("s").value.shape(), Shape{});
  EXPECT_EQ(c.tensors.at("s").value.to_vector<float>(), std::vector<float>{2.5f});
  // The header: its length a multiple of 8, the data in the order given (b first).
  const std::string bytes = testing::read_file(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_NE(bytes.find("\"b.weight\":{\"dtype\":\"F32\",\"shape\":[7],\"data_offsets\":[0,28]}"),
            std::string::npos)
      << bytes.substr(8, n);
  EXPECT_EQ(bytes.size(), 8 + n + 4 * (15 + 7 + 1));
}

TEST_F(Safetensors, Bf16IsRoundedToNearestEvenAndReadExactly) {
  const Tensor a = testing::randn({4, 6}, 3, DType::F32);
  const std::string path = dir_ + "/bf16.safetensors";
  write_safetensors(path, {{"a", a}}, DType::BF16, {});
  const SafetensorsContents c = read_safetensors(path);
  EXPECT_EQ(c.tensors.at("a").dtype, "BF16");
  EXPECT_EQ(c.tensors.at("a").value.to_vector<float>(), a.to(DType::BF16).to_vector<float>());
  // bf16 values survive a second round trip unchanged.
  write_safetensors(path, {{"a", c.tensors.at("a").value}}, DType::BF16, {});
  EXPECT_EQ(read_safetensors(path).tensors.at("a").value.to_vector<float>(),
            c.tensors.at("a").value.to_vector<float>());
}

TEST_F(Safetensors, F16IsConvertedExactly) {
  // 1, -2, the smallest subnormal 2^-24, the largest normal 65504, 1/3 rounded, -0.
  const std::vector<uint16_t> bits = {0x3c00, 0xc000, 0x0001, 0x7bff, 0x3555, 0x8000};
  std::string data(reinterpret_cast<const char*>(bits.data()), bits.size() * 2);
  const std::string path =
      craft("f16.safetensors",
            R"({"h": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}})", data);
  const Tensor h = read_safetensors(path).tensors.at("h").value;
  EXPECT_EQ(h.shape(), (Shape{2, 3}));
  const std::vector<float> v = h.to_vector<float>();
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], -2.0f);
  EXPECT_EQ(v[2], std::ldexp(1.0f, -24));
  EXPECT_EQ(v[3], 65504.0f);
  EXPECT_EQ(v[4], 0.333251953125f);
  EXPECT_TRUE(std::signbit(v[5]) && v[5] == 0.0f);
}

TEST_F(Safetensors, HeaderLengthProblemsAreRefused) {
  const std::string path = dir_ + "/short.safetensors";
  std::ofstream(path) << "abc";
  expect_refused(path, {"3 bytes", "header length"});
  expect_refused(craft("beyond.safetensors", "{}", "", 1000), {"header length 1000", "beyond"});
  expect_refused(craft("absurd.safetensors", "{}", "", uint64_t(1) << 62),
                 {"header length is 4611686018427387904", "limit"});
  expect_refused(craft("max.safetensors", "{}", "", ~uint64_t(0)), {"limit"});
  testing::expect_error([&] { read_safetensors(dir_ + "/missing.safetensors"); },
                        {"missing.safetensors", "does not exist", "HINT"});
}

TEST_F(Safetensors, BadJsonIsRefused) {
  expect_refused(craft("json.safetensors", R"({"a": {"dtype": "F32",)", ""), {"not valid JSON"});
  expect_refused(craft("array.safetensors", "[1, 2]", ""), {"not an object"});
  expect_refused(craft("empty.safetensors", "", ""), {"not valid JSON"});
  expect_refused(craft("dup.safetensors",
                       R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                       R"( "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                       std::string(8, '\0')),
                 {"'a' twice"});
  expect_refused(craft("entry.safetensors", R"({"a": [1]})", ""), {"tensor 'a'", "header entry"});
  // Deep nesting is refused while parsing (destroying it recursively would overflow the stack).
  expect_refused(
      craft("deep.safetensors",
            R"({"a": {"shape": )" + std::string(100000, '[') + std::string(100000, ']') + "}}", ""),
      {"nests deeper"});
  expect_refused(craft("deep4.safetensors", R"({"a": {"shape": [[2]]}})", ""), {"nests deeper"});
  expect_refused(craft("nofield.safetensors", R"({"a": {"dtype": "F32", "shape": [0]}})", ""),
                 {"tensor 'a'", "data_offsets"});
  expect_refused(craft("meta.safetensors", R"({"__metadata__": {"format": 1}})", ""),
                 {"__metadata__ key 'format'", "not a string"});
}

TEST_F(Safetensors, DtypeProblemsAreRefused) {
  expect_refused(craft("unknown.safetensors",
                       R"({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}})",
                       std::string(8, '\0')),
                 {"tensor 'a'", "unknown dtype 'F33'"});
  expect_refused(
      craft("i64.safetensors", R"({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})",
            std::string(8, '\0')),
      {"tensor 'a'", "I64", "does not take"});
}

TEST_F(Safetensors, ShapeAndOffsetProblemsAreRefused) {
  expect_refused(craft("mismatch.safetensors",
                       R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})",
                       std::string(8, '\0')),
                 {"tensor 'a'", "needs 12 bytes", "span 8"});
  expect_refused(craft("negative.safetensors",
                       R"({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})",
                       std::string(8, '\0')),
                 {"tensor 'a'", "shape holds -2"});
  expect_refused(craft("float.safetensors",
                       R"({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})",
                       std::string(8, '\0')),
                 {"tensor 'a'", "shape holds 2.0"});
  // Dims whose product overflows int64 must not allocate or wrap around.
  expect_refused(craft("huge.safetensors",
                       R"({"a": {"dtype": "F32", "shape": [8, 8, 8], "data_offsets": [0, 8]}})",
                       std::string(8, '\0')),
                 {"tensor 'a'", "more values than"});
  expect_refused(craft("reversed.safetensors",
                       R"({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}})",
                       std::string(8, '\0')),
                 {"tensor 'a'", "begin > end"});
}

TEST_F(Safetensors, CoverageProblemsAreRefused) {
  const std::string a = R"("a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  expect_refused(
      craft("overlap.safetensors",
            "{" + a + R"(, "b": {"dtype": "F32", "shape": [4], "data_offsets": [4, 20]}})",
            kSixFloats),
      {"tensor 'b'", "overlaps tensor 'a'"});
  expect_refused(
      craft("hole.safetensors",
            "{" + a + R"(, "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}})",
            kSixFloats),
      {"hole", "bytes 8..12", "tensor 'b'"});
  expect_refused(
      craft("trailing.safetensors",
            "{" + a + R"(, "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}})",
            kSixFloats),
      {"4 bytes after the last tensor"});
  // Truncated: the offsets run past the end of the file.
  expect_refused(
      craft("truncated.safetensors",
            "{" + a + R"(, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
            std::string(20, '\0')),
      {"tensor 'b'", "beyond the data section of 20 bytes", "truncated"});
  expect_refused(
      craft("far.safetensors",
            R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [1099511627776, 8]}})",
            std::string(8, '\0')),
      {"tensor 'a'", "data_offsets[0]"});
}

TEST_F(Safetensors, WriterRefusesDuplicateAndReservedNamesAndOtherDtypes) {
  const Tensor t = testing::randn({2}, 4, DType::F32);
  testing::expect_error(
      [&] {
        write_safetensors(dir_ + "/x.safetensors", {{"a", t}, {"a", t}}, DType::F32, {});
      },
      {"'a'", "given twice", "HINT"});
  testing::expect_error(
      [&] {
        write_safetensors(dir_ + "/x.safetensors", {{"__metadata__", t}}, DType::F32, {});
      },
      {"reserved", "HINT"});
  testing::expect_error(
      [&] {
        write_safetensors(dir_ + "/x.safetensors", {{"a", t}}, DType::F64, {});
      },
      {"f64", "HINT"});
  EXPECT_FALSE(fs::exists(dir_ + "/x.safetensors"));
}

}  // namespace
}  // namespace nha
