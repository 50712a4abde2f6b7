// Reuse of the large CPU buffers the ops return every training step (the DFL's
// gradient): see cpu_block_cache.cpp for why and how.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace stable_dfl {

// An uninitialised contiguous tensor, like at::empty. Buffers of at least
// kCachedBlockMinBytes come from blocks that earlier such tensors released when they
// died (already mapped and faulted in), or from fresh memory advised to use huge pages.
at::Tensor empty_reusing_blocks(at::IntArrayRef sizes, at::ScalarType dtype);

// Smaller buffers go to torch's allocator: malloc already reuses them.
constexpr size_t kCachedBlockMinBytes = size_t{4} << 20;

struct CpuBlockCacheInfo {
  int64_t limit_bytes;   // most bytes kept while no tensor uses them
  int64_t cached_bytes;  // bytes kept now
  int64_t cached_blocks;
  int64_t reused;     // requests served from a kept block
  int64_t allocated;  // requests that mapped fresh memory
};

CpuBlockCacheInfo cpu_block_cache_info();
// Frees every kept block (blocks in use are kept on release while the limit allows).
void empty_cpu_block_cache();
// Sets the limit (0 keeps nothing) and frees the oldest kept blocks beyond it.
void set_cpu_block_cache_limit(int64_t limit_bytes);

}  // namespace stable_dfl
