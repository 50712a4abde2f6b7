// A training step's DFL gradient is tens of MB on the CPU (34 MB for 537,600 fp32
// rows); it dies when the step ends and the next step asks for the same size again.
// glibc maps a block that large fresh on every request (it is above malloc's mmap
// threshold, which never exceeds 32 MiB) and unmaps it on free, so each step pays the
// page faults and the kernel's zeroing of every page, which costs more than computing
// the gradient. This allocator keeps the blocks its tensors release, up to a byte
// limit, and hands one to the next request of about the same size: what torch's
// caching allocator does on CUDA, for these buffers only.
#include "cpu_block_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdlib>
#include <deque>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace stable_dfl {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kHugePageBytes = 2 * kMiB;
constexpr int64_t kDefaultLimitMiB = 512;
constexpr const char* kLimitVariable = "STABLE_DFL_CPU_CACHE_MB";

// Fresh memory is first touched by a kernel, page by page; asking for transparent huge
// pages (where the system grants them on request) cuts those faults by 512x. The same as
// torch's opt-in THP_MEM_ALLOC_ENABLE, for these blocks.
void advise_huge_pages(void* data, size_t bytes) {
#ifdef __linux__
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t aligned_begin = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t aligned_end = (begin + bytes) & ~(kHugePageBytes - 1);
  if (aligned_end > aligned_begin) {
    // Advice only: any failure leaves ordinary pages, which are correct too.
    (void)madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin,
                  MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

int64_t limit_from_environment() {
  const char* text = std::getenv(kLimitVariable);
  if (text == nullptr || *text == '\0') return kDefaultLimitMiB * static_cast<int64_t>(kMiB);
  char* end = nullptr;
  errno = 0;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(errno == 0 && *end == '\0' && mib >= 0 &&
                        mib <= std::numeric_limits<int64_t>::max() / static_cast<int64_t>(kMiB),
                    kLimitVariable, " must be a whole number of MiB >= 0, got '", text, "'");
  return static_cast<int64_t>(mib) * static_cast<int64_t>(kMiB);
}

struct Block {
  void* data;
  size_t bytes;
};

class BlockCache {
 public:
  // Never destroyed: a tensor that outlives static destruction still releases into it.
  static BlockCache& instance() {
    static auto* cache = new BlockCache(limit_from_environment());
    return *cache;
  }

  // A child forked while another thread held the lock would wait for it forever: fork waits
  // for the lock instead, and both sides release it after.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

  Block* acquire(size_t requested_bytes) {
    // Whole huge pages, so that requests a little apart in size share blocks.
    const size_t bytes = (requested_bytes + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Block* best = nullptr;
      size_t best_index = 0;
      for (size_t i = 0; i < kept_.size(); ++i) {
        Block* candidate = kept_[i];
        // A block at most a quarter larger than asked for: no request pins a far larger one.
        const bool fits = candidate->bytes >= bytes && candidate->bytes <= bytes + bytes / 4;
        if (fits && (best == nullptr || candidate->bytes < best->bytes)) {
          best = candidate;
          best_index = i;
        }
      }
      if (best != nullptr) {
        kept_.erase(kept_.begin() + static_cast<std::ptrdiff_t>(best_index));
        kept_bytes_ -= best->bytes;
        ++reused_;
        in_use_bytes_ += best->bytes;
        report(best, static_cast<int64_t>(best->bytes));
        return best;
      }
    }
    void* data = nullptr;
    try {
      data = c10::alloc_cpu(bytes);
    } catch (const c10::Error&) {
      // Out of memory: what is kept is worth less than this request.
      empty();
      data = c10::alloc_cpu(bytes);
    }
    advise_huge_pages(data, bytes);
    auto* block = new Block{data, bytes};
    std::lock_guard<std::mutex> lock(mutex_);
    ++allocated_;
    in_use_bytes_ += bytes;
    report(block, static_cast<int64_t>(bytes));
    return block;
  }

  void release(Block* block) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ -= block->bytes;
      report(block, -static_cast<int64_t>(block->bytes));
      if (static_cast<int64_t>(block->bytes) > limit_bytes_) {
        evicted.push_back(block);
      } else {
        kept_.push_back(block);
        kept_bytes_ += block->bytes;
        trim_to_limit(evicted);
      }
    }
    free_blocks(evicted);
  }

  void empty() {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted.assign(kept_.begin(), kept_.end());
      kept_.clear();
      kept_bytes_ = 0;
    }
    free_blocks(evicted);
  }

  void set_limit(int64_t limit_bytes) {
    TORCH_CHECK_VALUE(limit_bytes >= 0, "limit_bytes must be >= 0, got ", limit_bytes);
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_bytes_ = limit_bytes;
      trim_to_limit(evicted);
    }
    free_blocks(evicted);
  }

  CpuBlockCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_bytes_, static_cast<int64_t>(kept_bytes_), static_cast<int64_t>(kept_.size()),
            reused_, allocated_};
  }

 private:
  explicit BlockCache(int64_t limit_bytes) : limit_bytes_(limit_bytes) {
#ifdef __linux__
    pthread_atfork([] { instance().lock_for_fork(); }, [] { instance().unlock_after_fork(); },
                   [] { instance().unlock_after_fork(); });
#endif
  }

  // Oldest first; the caller frees them once the lock is released.
  void trim_to_limit(std::vector<Block*>& evicted) {
    while (!kept_.empty() && static_cast<int64_t>(kept_bytes_) > limit_bytes_) {
      evicted.push_back(kept_.front());
      kept_bytes_ -= kept_.front()->bytes;
      kept_.pop_front();
    }
  }

  static void free_blocks(const std::vector<Block*>& blocks) {
    for (Block* block : blocks) {
      c10::free_cpu(block->data);
      delete block;
    }
  }

  // torch.profiler(profile_memory=True) sees these tensors as it sees torch's own.
  void report(const Block* block, int64_t delta) const {
    c10::reportMemoryUsageToProfiler(block->data, delta, in_use_bytes_, in_use_bytes_ + kept_bytes_,
                                     c10::Device(c10::kCPU));
  }

  std::mutex mutex_;
  std::deque<Block*> kept_;
  size_t kept_bytes_ = 0;
  size_t in_use_bytes_ = 0;
  int64_t limit_bytes_;
  int64_t reused_ = 0;
  int64_t allocated_ = 0;
};

void release_block(void* context) { BlockCache::instance().release(static_cast<Block*>(context)); }

class ReusingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kCachedBlockMinBytes) return c10::GetCPUAllocator()->allocate(bytes);
    Block* block = BlockCache::instance().acquire(bytes);
    return {block->data, block, &release_block, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_reusing_blocks(at::IntArrayRef sizes, at::ScalarType dtype) {
  // Never destroyed, like the cache: storages keep a pointer to it for resize_.
  static auto* allocator = new ReusingAllocator();
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, c10::nullopt);
}

CpuBlockCacheInfo cpu_block_cache_info() { return BlockCache::instance().info(); }

void empty_cpu_block_cache() { BlockCache::instance().empty(); }

void set_cpu_block_cache_limit(int64_t limit_bytes) {
  BlockCache::instance().set_limit(limit_bytes);
}

}  // namespace stable_dfl
