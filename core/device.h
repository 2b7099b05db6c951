// Where a tensor's storage lives: the host (cpu) or one CUDA device (cuda:N).
#pragma once
#include <cstdint>
#include <string>

#include "core/error.h"

namespace nha {

enum class DeviceKind : uint8_t { CPU, CUDA };

struct Device {
  DeviceKind kind = DeviceKind::CPU;
  int index = 0;  // CUDA ordinal; always 0 for the CPU

  static Device cpu() { return {DeviceKind::CPU, 0}; }
  static Device cuda(int index = 0) { return {DeviceKind::CUDA, index}; }
  bool is_cpu() const { return kind == DeviceKind::CPU; }
  bool is_cuda() const { return kind == DeviceKind::CUDA; }
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

  // Parses "cpu", "cuda", "cuda:N".
  static Device parse(const std::string& s) {
    if (s == "cpu") return cpu();
    if (s == "cuda") return cuda(0);
    if (s.rfind("cuda:", 0) == 0) {
      try {
        return cuda(std::stoi(s.substr(5)));
      } catch (const std::exception&) {
      }
    }
    NHA_FAIL() << "unknown device '" << s << "'. HINT: use cpu, cuda or cuda:N";
  }
};

// True when this binary was built with the CUDA backend (NHA_CUDA=ON/AUTO with nvcc present).
bool cuda_built();
// Number of CUDA devices visible at run time (0 without a GPU or without the CUDA backend).
int cuda_device_count();

}  // namespace nha
