// Reading text inputs as a stream of documents, for `nha prepare` and tokenizer training.
//
// Inputs are files or directories (walked recursively, entries sorted by path so the order never
// depends on the file system). Per file, by name:
//   *.jsonl, *.ndjson (+ .zst)  one JSON object per line; the document is the string field
//                              `jsonl_field` (default "text")
//   anything else (+ .zst)     UTF-8 text, cut into documents by DocSplit (default: blank lines)
// .zst files are decompressed by piping through the `zstd` command (scripts/setup.sh installs it).
// Memory stays bounded: files are read line by line, never whole (except one document at a time).
#pragma once
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace nha::data {

// How plain text is cut into documents. A document never spans two files.
enum class DocSplit {
  Paragraph,  // blocks of non-blank lines separated by one or more blank lines (default; the
              // Debian corpus is one paragraph per line, one blank line between documents)
  Line,       // every non-blank line is a document
  File,       // a whole file is one document
};
DocSplit doc_split_from_name(const std::string& name);
const char* doc_split_name(DocSplit split);

struct SourceOptions {
  std::string jsonl_field = "text";
  DocSplit doc_split = DocSplit::Paragraph;
};

// Every input file, in a fixed order: inputs in the order given, directories expanded recursively
// and sorted (hidden entries, names starting with '.', are skipped). Refuses missing paths.
std::vector<std::string> list_input_files(const std::vector<std::string>& inputs);

// Offset of the first byte of `text` that is not part of well-formed UTF-8 (overlong forms,
// surrogates and code points above U+10FFFF included), or std::string_view::npos. Text is refused
// there rather than rewritten: sentencepiece would turn every such byte into U+FFFD silently.
size_t invalid_utf8_offset(std::string_view text);

// Lines of one file, decompressing .zst through `zstd -dc`. Refuses NUL bytes (binary files),
// invalid UTF-8 and unreadable files, naming the file, line and byte offset. Line endings ("\n", "\r\n") are removed.
class LineReader {
 public:
  explicit LineReader(const std::string& path);
  ~LineReader();
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  bool next(std::string& line);  // false at end of file
  void close();                  // checks the zstd exit status (a truncated .zst is an error)
  const std::string& path() const { return path_; }
  int64_t line_number() const { return line_number_; }
  uint64_t bytes_read() const { return bytes_read_; }  // of (decompressed) text

 private:
  std::string path_;
  FILE* file_ = nullptr;
  bool is_pipe_ = false;
  char* buffer_ = nullptr;
  size_t capacity_ = 0;
  int64_t line_number_ = 0;
  uint64_t bytes_read_ = 0;
};

struct Document {
  std::string text;
  int32_t file_index = 0;  // into the file list
};

// Documents of a list of files, in order.
class DocumentReader {
 public:
  DocumentReader(std::vector<std::string> files, SourceOptions options);
  ~DocumentReader();
  // Fills `doc`; false when every file is done. Files that hold no document are counted in
  // empty_files(): the caller decides whether that is an error.
  bool next(Document& doc);
  const std::vector<std::string>& files() const { return files_; }
  uint64_t bytes_read() const { return bytes_done_ + (reader_ ? reader_->bytes_read() : 0); }
  const std::vector<std::string>& empty_files() const { return empty_files_; }

 private:
  bool open_next_file();
  bool next_in_file(Document& doc);

  std::vector<std::string> files_;
  SourceOptions options_;
  size_t next_file_ = 0;
  int32_t current_file_ = -1;
  bool current_is_jsonl_ = false;
  int64_t docs_in_file_ = 0;
  std::unique_ptr<LineReader> reader_;
  uint64_t bytes_done_ = 0;
  std::vector<std::string> empty_files_;
  std::string line_;
};

bool is_jsonl_path(const std::string& path);
bool is_zstd_path(const std::string& path);

}  // namespace nha::data
