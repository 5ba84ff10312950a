// Caching host allocator for the passes (csrc/workspace.h). Requests of kMinBytes and more are rounded up to a
// size class (eight per power of two: at most 12.5% waste) and served by an idle block of exactly that class;
// so a call that repeats an earlier one finds every block it needs (no misses after the first call of a
// shape). Smaller requests go to the allocator that was installed before (glibc's heap serves them without
// faults). A block freed after its
// scope closed (a gradient that outlives the call) still returns to the cache, so the cache must outlive
// every tensor: the allocator is a process-lifetime singleton that is never destroyed.
#include "workspace.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <map>
#include <mutex>
#include <unordered_map>

namespace dbprop::workspace {
namespace {

constexpr size_t kMinBytes = size_t(16) << 10;
constexpr size_t kPage = size_t(4) << 10;

size_t size_class(size_t n) {
  size_t step = kPage;  // 1/8 of the power of two below n, at least a page
  while (step * 16 <= n) step *= 2;
  return (n + step - 1) / step * step;
}

class CachingHostAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return previous_->allocate(n);
    void* p = take(size_class(n));
    return {p, p, &CachingHostAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &CachingHostAllocator::release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static CachingHostAllocator& instance() {
    static auto* a = new CachingHostAllocator();  // never destroyed: tensors may die at interpreter exit
    return *a;
  }

  void enter() {
    std::lock_guard<std::mutex> g(mu_);
    if (depth_++ > 0 || !enabled_) return;
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current == this) return;
    previous_ = current;
    c10::SetCPUAllocator(this, /*priority=*/0);
    installed_ = c10::GetCPUAllocator() == this;  // another allocator registered with a higher priority wins
  }

  void exit() {
    std::lock_guard<std::mutex> g(mu_);
    TORCH_CHECK(depth_ > 0, "dbprop workspace: exit() without enter()");
    if (--depth_ > 0 || !installed_) return;
    c10::SetCPUAllocator(previous_, /*priority=*/0);
    installed_ = false;
  }

  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {cached_, in_use_, hits_, misses_, depth_, enabled_};
  }

  void release_cached() {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [size, p] : free_) {
      size_of_.erase(p);
      c10::free_cpu(p);
    }
    free_.clear();
    cached_ = 0;
  }

  void set_enabled(bool on) {
    std::lock_guard<std::mutex> g(mu_);
    enabled_ = on;
  }

 private:
  CachingHostAllocator() : previous_(c10::GetCPUAllocator()) {}

  void* take(size_t size) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        void* p = it->second;
        cached_ -= int64_t(it->first);
        in_use_ += int64_t(it->first);
        free_.erase(it);
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = c10::alloc_cpu(size);  // outside the lock: may fault in pages
    std::lock_guard<std::mutex> g(mu_);
    size_of_[p] = size;
    in_use_ += int64_t(size);
    return p;
  }

  static void release(void* p) {
    auto& a = instance();
    std::lock_guard<std::mutex> g(a.mu_);
    auto it = a.size_of_.find(p);
    if (it == a.size_of_.end()) {  // a small block of the previous allocator (raw_deallocate path)
      c10::free_cpu(p);
      return;
    }
    a.free_.emplace(it->second, p);
    a.in_use_ -= int64_t(it->second);
    a.cached_ += int64_t(it->second);
  }

  std::mutex mu_;
  c10::Allocator* previous_;
  std::multimap<size_t, void*> free_;          // idle blocks by size
  std::unordered_map<void*, size_t> size_of_;  // every block this allocator owns
  int64_t cached_ = 0, in_use_ = 0, hits_ = 0, misses_ = 0, depth_ = 0;
  bool enabled_ = true, installed_ = false;
};

}  // namespace

void enter() { CachingHostAllocator::instance().enter(); }
void exit() { CachingHostAllocator::instance().exit(); }
Stats stats() { return CachingHostAllocator::instance().stats(); }
void release_cached() { CachingHostAllocator::instance().release_cached(); }
void set_enabled(bool on) { CachingHostAllocator::instance().set_enabled(on); }

}  // namespace dbprop::workspace
