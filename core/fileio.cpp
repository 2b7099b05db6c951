#include "core/fileio.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <system_error>

#include "core/error.h"

namespace nha {

namespace fs = std::filesystem;

std::string temp_path_for(const std::string& path) {
  return path + ".tmp." + std::to_string(::getpid());
}

void write_file_atomic(const std::string& path, std::string_view contents) {
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  const std::string tmp = temp_path_for(path);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    NHA_CHECK(out.good()) << "cannot write '" << tmp << "'. HINT: is the directory writable?";
    out.write(contents.data(), std::streamsize(contents.size()));
    out.close();
    if (!out.good()) {
      fs::remove(tmp);
      NHA_FAIL() << "writing '" << tmp << "' failed. HINT: is the disk full?";
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  NHA_CHECK(!ec) << "cannot rename '" << tmp << "' to '" << path << "': " << ec.message();
}

}  // namespace nha
