// CUDA launchers of the train-mode BatchNorm bodies (csrc/kernels/batchnorm.h, docs/maths.md §4.9) on the
// current ATen stream: one block per (copy, channel) for the moments (shared-memory tree reduction in
// at::acc_type<scalar_t, true>: float for float / half / bfloat16, double for double), then grid-stride
// elementwise kernels; the source sums the copies in one thread per x̂ entry (no atomics, deterministic).
#include "../ops.h"
#include "launch.cuh"
#include "../kernels/batchnorm.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace dbprop {
namespace cuda {
namespace {

// Block t = kk·C + c reduces the N = B·S entries of (copy kk, channel c) and writes its moment record.
template <bool kWithXi, typename scalar_t, typename acc_t>
__global__ void batchnorm_moments_kernel(const scalar_t* xi, const scalar_t* q, const scalar_t* xh, acc_t* mom,
                                         BnDims d) {
  __shared__ acc_t shared[kernels::kBnSlots][kThreads];
  const int64_t t = blockIdx.x, kk = t / d.C, c = t % d.C, n = d.B * d.S;
  acc_t sums[kernels::kBnSlots];
  for (int j = 0; j < kernels::kBnSlots; ++j) sums[j] = acc_t(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t b = i / d.S, s = i % d.S;
    kernels::batchnorm_accumulate<kWithXi, scalar_t, acc_t>(xi, q, xh, kernels::bn_copy_offset(kk, b, c, s, d.B, d.C, d.S),
                                                            kernels::bn_xhat_offset(b, c, s, d.C, d.S), sums);
  }
  for (int j = 0; j < kernels::kBnSlots; ++j) shared[j][threadIdx.x] = sums[j];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride)
      for (int j = 0; j < kernels::kBnSlots; ++j) shared[j][threadIdx.x] += shared[j][threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    acc_t* r = mom + t * kernels::kBnSlots;
    for (int j = 0; j < kernels::kBnSlots; ++j) r[j] = shared[j][0];
    kernels::batchnorm_finish_moments<kWithXi, acc_t>(r, n);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void batchnorm_tangent_kernel(const scalar_t* q, const scalar_t* xh, const acc_t* mom, const scalar_t* fa,
                                         const scalar_t* fb, scalar_t* out, BnDims d) {
  GRID_STRIDE(e, d.k * d.B * d.C * d.S) {
    const int64_t s = e % d.S, row = e / d.S, c = row % d.C, b = (row / d.C) % d.B, kk = row / (d.B * d.C);
    out[e] = kernels::batchnorm_tangent<scalar_t, acc_t>(q[e], xh[kernels::bn_xhat_offset(b, c, s, d.C, d.S)],
                                                         mom + (kk * d.C + c) * kernels::kBnSlots,
                                                         kernels::batchnorm_channel_factor<scalar_t, acc_t>(fa, fb, c));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void batchnorm_source_kernel(const scalar_t* xi, const scalar_t* q, const scalar_t* xh, const acc_t* mom,
                                        const scalar_t* gamma, const scalar_t* invstd, scalar_t* out, BnDims d) {
  GRID_STRIDE(m, d.B * d.C * d.S) {  // one thread per x̂ entry, the copies summed in order
    const int64_t s = m % d.S, c = (m / d.S) % d.C, b = m / (d.C * d.S);
    out[m] = kernels::batchnorm_source<scalar_t, acc_t>(xi, q, xh, mom, d.k, d.B, d.C, d.S, b, c, s,
                                                        kernels::batchnorm_source_factor<scalar_t, acc_t>(gamma, invstd, c));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void batchnorm_dgamma_kernel(const acc_t* mom, const scalar_t* invstd, scalar_t* dgamma, BnDims d) {
  GRID_STRIDE(c, d.C) {
    dgamma[c] = static_cast<scalar_t>(
        kernels::batchnorm_dgamma<acc_t>(mom, d.k, d.C, c, d.B * d.S, static_cast<acc_t>(invstd[c])));
  }
}

template <typename scalar_t, typename acc_t>
void launch_moments(const scalar_t* xi, const scalar_t* q, const scalar_t* xh, acc_t* mom, const BnDims& d,
                    cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(d.k * d.C);
  if (xi)
    batchnorm_moments_kernel<true, scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(xi, q, xh, mom, d);
  else
    batchnorm_moments_kernel<false, scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(nullptr, q, xh, mom, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

#define DBPROP_FLOATING_TYPES(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, t, name, __VA_ARGS__)

at::Tensor batchnorm_train_linear(const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& scale) {
  c10::cuda::CUDAGuard guard(q.device());
  const BnDims d = bn_dims(q, xhat);
  TORCH_CHECK(d.k * d.C <= 0x7fffffff, "too many (copy, channel) pairs for one launch: ", d.k * d.C);
  at::Tensor out = at::empty_like(q);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DBPROP_FLOATING_TYPES(q.scalar_type(), "batchnorm_train_linear", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    at::Tensor mom = at::empty({d.k * d.C * kernels::kBnSlots}, q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* hp = xhat.data_ptr<scalar_t>();
    launch_moments<scalar_t, acc_t>(nullptr, qp, hp, mom.data_ptr<acc_t>(), d, stream);
    batchnorm_tangent_kernel<scalar_t, acc_t><<<blocks_for(q.numel()), kThreads, 0, stream>>>(
        qp, hp, mom.data_ptr<acc_t>(), scale.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_train_bbp(const at::Tensor& xi, const at::Tensor& q,
                                                                   const at::Tensor& xhat, const at::Tensor& invstd,
                                                                   const at::Tensor& gamma, bool need_tangent,
                                                                   bool want_source, bool want_mixed) {
  c10::cuda::CUDAGuard guard(q.device());
  const BnDims d = bn_dims(q, xhat);
  TORCH_CHECK(d.k * d.C <= 0x7fffffff, "too many (copy, channel) pairs for one launch: ", d.k * d.C);
  at::Tensor tangent = need_tangent ? at::empty_like(q) : at::Tensor();
  at::Tensor source = want_source ? at::empty_like(xhat) : at::Tensor();
  at::Tensor dgamma = want_mixed ? at::empty({d.C}, xhat.options()) : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DBPROP_FLOATING_TYPES(q.scalar_type(), "batchnorm_train_bbp", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    at::Tensor mom = at::empty({d.k * d.C * kernels::kBnSlots}, q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* mp = mom.data_ptr<acc_t>();
    const scalar_t* xp = xi.defined() ? xi.data_ptr<scalar_t>() : nullptr;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* hp = xhat.data_ptr<scalar_t>();
    const scalar_t* ip = invstd.data_ptr<scalar_t>();
    const scalar_t* gp = gamma.defined() ? gamma.data_ptr<scalar_t>() : nullptr;
    launch_moments<scalar_t, acc_t>(xp, qp, hp, mp, d, stream);
    if (need_tangent) {
      batchnorm_tangent_kernel<scalar_t, acc_t><<<blocks_for(q.numel()), kThreads, 0, stream>>>(
          qp, hp, mp, gp, ip, tangent.data_ptr<scalar_t>(), d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (want_source) {
      batchnorm_source_kernel<scalar_t, acc_t><<<blocks_for(xhat.numel()), kThreads, 0, stream>>>(
          xp, qp, hp, mp, gp, ip, source.data_ptr<scalar_t>(), d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (want_mixed) {
      batchnorm_dgamma_kernel<scalar_t, acc_t><<<blocks_for(d.C), kThreads, 0, stream>>>(
          mp, ip, dgamma.data_ptr<scalar_t>(), d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {tangent, source, dgamma};
}

// The batchnorm families on CUDA: this file's launchers behind their operators' checks
// (csrc/ops.h, Kernels).
namespace {
#define DBPROP_CUDA_LAUNCHER(name, schema, doc) static constexpr auto name = &cuda::name;
struct Launchers {
  DBPROP_BATCHNORM_OPS(DBPROP_CUDA_LAUNCHER)
};
#undef DBPROP_CUDA_LAUNCHER
}  // namespace

TORCH_LIBRARY_IMPL(dbprop, CUDA, m) {
  DBPROP_BATCHNORM_OPS(DBPROP_REGISTER_KERNEL)
}

}  // namespace cuda
}  // namespace dbprop
