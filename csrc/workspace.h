// The passes' host workspace (README "Memory and speed"): a caching CPU allocator installed while a penalty
// runs, so that the per-chunk work tensors of one call and of the next reuse the same blocks instead of being
// mapped, zero-filled by the kernel and unmapped again by glibc (the "page-fault storm" of large tensors).
#pragma once

#include <cstdint>

namespace dbprop::workspace {

struct Stats {
  int64_t cached_bytes;  // blocks owned by the workspace and free for reuse
  int64_t in_use_bytes;  // blocks owned by the workspace and held by live tensors
  int64_t hits;          // requests served from the cache
  int64_t misses;        // requests that had to allocate
  int64_t depth;         // nested scopes currently open (0: the default CPU allocator is installed)
  bool enabled;
};

// Opens a scope: from the first open scope to the last close, large host allocations (every tensor of
// kMinBytes or more, from any thread) come from the workspace. No-op when disabled or when another allocator
// with a higher priority is installed.
void enter();
void exit();
Stats stats();
void release_cached();       // frees the idle blocks (dbprop.empty_cache())
void set_enabled(bool on);   // dbprop.set_workspace_enabled(); takes effect at the next outermost scope

}  // namespace dbprop::workspace
