#include "data/text_source.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace fs = std::filesystem;

namespace nha::data {

static bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_zstd_path(const std::string& path) { return ends_with(path, ".zst"); }

bool is_jsonl_path(const std::string& path) {
  std::string p = is_zstd_path(path) ? path.substr(0, path.size() - 4) : path;
  return ends_with(p, ".jsonl") || ends_with(p, ".ndjson");
}

DocSplit doc_split_from_name(const std::string& name) {
  if (name == "paragraph") return DocSplit::Paragraph;
  if (name == "line") return DocSplit::Line;
  if (name == "file") return DocSplit::File;
  NHA_FAIL() << "unknown document split '" << name
             << "'. HINT: use paragraph (blank lines separate documents), line or file";
}

const char* doc_split_name(DocSplit split) {
  switch (split) {
    case DocSplit::Paragraph: return "paragraph";
    case DocSplit::Line: return "line";
    case DocSplit::File: return "file";
  }
  return "?";
}

// ---- file lists --------------------------------------------------------------------------------

static void walk(const fs::path& dir, std::vector<std::string>& out) {
  std::vector<fs::path> entries;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (!name.empty() && name[0] == '.') continue;  // .git, editor swap files, our own temp files
    entries.push_back(it->path());
  }
  NHA_CHECK(!ec) << "cannot list directory " << dir.string() << ": " << ec.message()
                 << ". HINT: check the path and its permissions";
  // Sorted by path bytes: the same tree gives the same order on every machine (directory_iterator
  // order is the file system's, which is not).
  std::sort(entries.begin(), entries.end(),
            [](const fs::path& a, const fs::path& b) { return a.string() < b.string(); });
  for (const fs::path& p : entries) {
    if (fs::is_directory(p)) {
      walk(p, out);
    } else if (fs::is_regular_file(p)) {
      out.push_back(p.string());
    }
  }
}

std::vector<std::string> list_input_files(const std::vector<std::string>& inputs) {
  NHA_CHECK(!inputs.empty()) << "no input given. HINT: pass --input FILE_OR_DIR (repeatable)";
  std::vector<std::string> files;
  for (const std::string& input : inputs) {
    std::error_code ec;
    fs::file_status st = fs::status(input, ec);
    NHA_CHECK(!ec && fs::exists(st)) << "input '" << input << "' does not exist"
                                     << ". HINT: check the path (inputs are files or directories)";
    if (fs::is_directory(st)) {
      size_t before = files.size();
      walk(input, files);
      NHA_CHECK(files.size() > before) << "input directory '" << input << "' holds no files"
                                       << ". HINT: point --input at the text files or their folder";
    } else {
      files.push_back(input);
    }
  }
  return files;
}

// ---- UTF-8 ---------------------------------------------------------------------------------------

size_t invalid_utf8_offset(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    // The second byte's range excludes overlong forms (E0, F0), surrogates (ED) and > U+10FFFF (F4).
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    if (len == 0 || i + len > n || s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if ((s[i + k] & 0xC0) != 0x80) return i;
    i += len;
  }
  return std::string_view::npos;
}

// ---- LineReader --------------------------------------------------------------------------------

static std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') q += "'\\''";
    else q += c;
  }
  return q + "'";
}

LineReader::LineReader(const std::string& path) : path_(path) {
  // Check readability ourselves: the zstd pipe would only fail later with a less clear message.
  NHA_CHECK(::access(path.c_str(), R_OK) == 0)
      << "cannot read '" << path << "': " << std::strerror(errno)
      << ". HINT: check the path and its permissions";
  NHA_CHECK(!fs::is_directory(path)) << "'" << path << "' is a directory where a file was expected";
  if (is_zstd_path(path)) {
    std::string cmd = "zstd -dcq -- " + shell_quote(path);
    file_ = ::popen(cmd.c_str(), "r");
    is_pipe_ = true;
    NHA_CHECK(file_ != nullptr) << "cannot start `" << cmd << "`: " << std::strerror(errno)
                                << ". HINT: install zstd (scripts/setup.sh) or decompress the file";
  } else {
    file_ = std::fopen(path.c_str(), "rb");
    NHA_CHECK(file_ != nullptr) << "cannot open '" << path << "': " << std::strerror(errno)
                                << ". HINT: check the path and its permissions";
  }
}

LineReader::~LineReader() {
  if (file_) {
    if (is_pipe_) ::pclose(file_);
    else std::fclose(file_);
  }
  std::free(buffer_);
}

bool LineReader::next(std::string& line) {
  if (!file_) return false;
  errno = 0;
  ssize_t n = ::getline(&buffer_, &capacity_, file_);
  if (n < 0) {
    NHA_CHECK(!std::ferror(file_)) << "read error in '" << path_ << "' after line " << line_number_
                                   << ": " << std::strerror(errno)
                                   << ". HINT: check the disk / the file is not truncated";
    return false;
  }
  ++line_number_;
  bytes_read_ += uint64_t(n);
  // A NUL byte never occurs in text: this is a binary file (an image, a .gz, an object file...).
  NHA_CHECK(std::memchr(buffer_, 0, size_t(n)) == nullptr)
      << "'" << path_ << "' line " << line_number_ << " contains a NUL byte: it looks like a binary "
      << "file, not UTF-8 text. HINT: remove it from the inputs (or decompress it first; only .zst is "
         "decompressed automatically)";
  const size_t bad = invalid_utf8_offset(std::string_view(buffer_, size_t(n)));
  NHA_CHECK(bad == std::string_view::npos)
      << "'" << path_ << "' line " << line_number_ << " byte " << bad + 1 << " (file offset "
      << bytes_read_ - uint64_t(n) + bad << ") is not UTF-8 (0x" << std::hex
      << int((unsigned char)buffer_[bad]) << std::dec << "). HINT: convert the file to UTF-8, e.g. "
      << "`iconv -f LATIN1 -t UTF-8`, or drop the invalid bytes with `iconv -c -f UTF-8 -t UTF-8`";
  size_t len = size_t(n);
  if (len > 0 && buffer_[len - 1] == '\n') --len;
  if (len > 0 && buffer_[len - 1] == '\r') --len;
  line.assign(buffer_, len);
  return true;
}

void LineReader::close() {
  if (!file_) return;
  if (is_pipe_) {
    int status = ::pclose(file_);
    file_ = nullptr;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    NHA_CHECK(code != 127) << "the `zstd` command was not found while reading '" << path_
                           << "'. HINT: install zstd (scripts/setup.sh) or decompress the file";
    NHA_CHECK(code == 0) << "`zstd -dc` failed on '" << path_ << "' (exit status " << code
                         << "). HINT: the file is truncated or not zstd data; check it with "
                            "`zstd -t FILE`";
  } else {
    std::fclose(file_);
    file_ = nullptr;
  }
}

// ---- DocumentReader ----------------------------------------------------------------------------

static bool is_blank(const std::string& s) {
  for (char c : s)
    if (c != ' ' && c != '\t' && c != '\f' && c != '\v') return false;
  return true;
}

DocumentReader::DocumentReader(std::vector<std::string> files, SourceOptions options)
    : files_(std::move(files)), options_(std::move(options)) {}

DocumentReader::~DocumentReader() = default;

bool DocumentReader::open_next_file() {
  if (reader_) {
    reader_->close();
    bytes_done_ += reader_->bytes_read();
    if (docs_in_file_ == 0) empty_files_.push_back(reader_->path());
    reader_.reset();
  }
  if (next_file_ >= files_.size()) return false;
  current_file_ = int32_t(next_file_);
  const std::string& path = files_[next_file_++];
  reader_ = std::make_unique<LineReader>(path);
  current_is_jsonl_ = is_jsonl_path(path);
  docs_in_file_ = 0;
  return true;
}

bool DocumentReader::next_in_file(Document& doc) {
  doc.text.clear();
  doc.file_index = current_file_;
  if (current_is_jsonl_) {
    while (reader_->next(line_)) {
      if (is_blank(line_)) continue;
      nlohmann::json row;
      try {
        row = nlohmann::json::parse(line_);
      } catch (const nlohmann::json::exception& e) {
        NHA_FAIL() << "'" << reader_->path() << "' line " << reader_->line_number()
                   << " is not valid JSON (" << e.what()
                   << "). HINT: JSONL needs one JSON object per line; rename the file if it is "
                      "plain text";
      }
      auto it = row.is_object() ? row.find(options_.jsonl_field) : row.end();
      NHA_CHECK(row.is_object() && it != row.end() && it->is_string())
          << "'" << reader_->path() << "' line " << reader_->line_number()
          << " has no string field \"" << options_.jsonl_field
          << "\". HINT: pick the text field with --jsonl-field NAME";
      doc.text = it->get<std::string>();
      if (doc.text.empty()) continue;
      return true;
    }
    return false;
  }
  switch (options_.doc_split) {
    case DocSplit::Line:
      while (reader_->next(line_)) {
        if (is_blank(line_)) continue;
        doc.text = line_;
        return true;
      }
      return false;
    case DocSplit::Paragraph:
      while (reader_->next(line_)) {
        if (is_blank(line_)) {
          if (!doc.text.empty()) return true;
          continue;
        }
        if (!doc.text.empty()) doc.text += '\n';
        doc.text += line_;
      }
      return !doc.text.empty();
    case DocSplit::File: {
      bool any = false;
      while (reader_->next(line_)) {
        if (any) doc.text += '\n';
        doc.text += line_;
        any = true;
      }
      // A whole file of blank lines is no document.
      return any && !is_blank(doc.text) && doc.text.find_first_not_of(" \t\n\f\v") != std::string::npos;
    }
  }
  return false;
}

bool DocumentReader::next(Document& doc) {
  while (true) {
    if (!reader_ && !open_next_file()) return false;
    if (next_in_file(doc)) {
      ++docs_in_file_;
      return true;
    }
    if (!open_next_file()) return false;
  }
}

}  // namespace nha::data
