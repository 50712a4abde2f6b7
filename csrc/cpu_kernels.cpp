// Loads the CPU kernel library of the best SIMD level that ATen uses and this CPU
// runs. Compiled with baseline flags only: nothing here may execute an instruction
// that the oldest supported CPU lacks, and a level's library is opened only on a CPU
// that runs it (its static initialisers may already use the level's instructions).
#include "cpu_kernels.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <sys/stat.h>

#include <cstring>

namespace stable_dfl {
namespace {

// Lowest first; the index is the level's rank.
constexpr const char* kLevels[] = {"default", "avx2", "avx512"};
constexpr int kNumLevels = sizeof(kLevels) / sizeof(kLevels[0]);

bool cpu_runs(int level) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // Every flag the level's library is compiled with (setup.py), F16C included.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (level == 1) return avx2;
  if (level == 2) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return level == 0;
#else
  return level == 0;
#endif
}

// ATen's own level for this process: its kernels and ours switch together.
int aten_level() {
#if defined(__x86_64__) || defined(__i386__)
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return 2;
  if (capability == "AVX2") return 1;
#endif
  return 0;
}

// "<dir>/_cpu_kernels_<level><suffix>", where <dir> and <suffix> are those of the
// loaded stable_dfl._C ("_C.cpython-311-x86_64-linux-gnu.so" -> that suffix).
std::string library_path(const char* level) {
  Dl_info info{};
  TORCH_CHECK(dladdr(reinterpret_cast<void*>(&cpu_kernel_isas_built), &info) != 0 &&
                  info.dli_fname != nullptr,
              "stable_dfl: cannot locate the loaded stable_dfl._C library");
  const std::string self = info.dli_fname;
  const size_t slash = self.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : self.substr(0, slash);
  const std::string name = slash == std::string::npos ? self : self.substr(slash + 1);
  const std::string suffix = name.rfind("_C", 0) == 0 ? name.substr(2) : ".so";
  return dir + "/_cpu_kernels_" + level + suffix;
}

bool file_exists(const std::string& path) {
  struct stat st{};
  return stat(path.c_str(), &st) == 0;
}

// The table of `level`'s library, or null with the reason in `why`.
const cpu::CpuKernelTable* open_level(int level, std::string& why) {
  const std::string path = library_path(kLevels[level]);
  if (!file_exists(path)) {
    why = path + " is not installed";
    return nullptr;
  }
  // RTLD_LOCAL: the library's symbols never serve another library's references.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    why = dlerror();
    return nullptr;
  }
  auto entry =
      reinterpret_cast<cpu::CpuKernelTableFn>(dlsym(handle, STABLE_DFL_CPU_KERNEL_TABLE_SYMBOL));
  const cpu::CpuKernelTable* table = entry != nullptr ? entry() : nullptr;
  if (table == nullptr || table->abi_version != cpu::kKernelAbiVersion ||
      std::strcmp(table->isa, kLevels[level]) != 0) {
    why = path + " is from another build of stable_dfl (reinstall stable_dfl)";
    dlclose(handle);
    return nullptr;
  }
  return table;
}

const cpu::CpuKernelTable* load_best_level() {
  std::string problems;
  for (int level = aten_level(); level >= 0; --level) {
    if (!cpu_runs(level)) continue;
    std::string why;
    if (const cpu::CpuKernelTable* table = open_level(level, why)) return table;
    problems += std::string("\n  ") + kLevels[level] + ": " + why;
  }
  TORCH_CHECK(false, "stable_dfl: no CPU kernel library could be loaded:", problems);
}

}  // namespace

const cpu::CpuKernelTable& cpu_kernels() {
  static const cpu::CpuKernelTable* const table = load_best_level();
  return *table;
}

std::vector<std::string> cpu_kernel_isas_built() {
  std::vector<std::string> built;
  for (int level = 0; level < kNumLevels; ++level) {
    if (file_exists(library_path(kLevels[level]))) built.emplace_back(kLevels[level]);
  }
  return built;
}

}  // namespace stable_dfl
