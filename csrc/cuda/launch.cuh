// Launch geometry shared by the CUDA launchers (csrc/cuda/*.cu): grid-stride loops on kThreads-thread blocks.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dbprop {
namespace cuda {

constexpr int kThreads = 256;  // a power of two (the block tree reductions rely on it)

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535)));
}

}  // namespace cuda
}  // namespace dbprop

#define GRID_STRIDE(i, n)                                                                    \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
