// CUDA launchers of the element bodies (csrc/kernels/elementwise.h): grid-stride __global__ kernels on the
// current ATen stream. Reductions accumulate in the op-math type (float for half / bfloat16) with atomics, except
// the activation source term, which has one thread per output element (deterministic); under
// torch.use_deterministic_algorithms(True) the bias gradient takes a deterministic path (mask_multiply_bias_grad).
#include "../ops.h"
#include "launch.cuh"
#include "../kernels/activations.h"
#include "../kernels/elementwise.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace dbprop {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void forward_epilogue_kernel(const scalar_t* z, const scalar_t* bias, scalar_t* x, int64_t n,
                                        int64_t channels, int64_t inner, acc_t slope) {
  GRID_STRIDE(e, n) {
    const acc_t b = bias ? static_cast<acc_t>(bias[(e / inner) % channels]) : acc_t(0);
    kernels::forward_epilogue_element<scalar_t, acc_t>(z, x, b, slope, e);
  }
}

template <typename scalar_t>
__global__ void pack_positive_kernel(const scalar_t* x, uint8_t* bits, int64_t n, int64_t bytes) {
  GRID_STRIDE(byte, bytes) { kernels::pack_positive_byte<scalar_t>(x, bits, n, byte); }
}

template <typename scalar_t, typename acc_t>
__global__ void mask_multiply_kernel(const scalar_t* c, const uint8_t* bits, scalar_t* out, int64_t n,
                                     int64_t mask_numel, acc_t slope) {
  GRID_STRIDE(e, n) { out[e] = kernels::mask_multiply<scalar_t, acc_t>(c, bits, mask_numel, slope, e); }
}

template <typename scalar_t, typename acc_t>
__global__ void mask_multiply_bias_grad_kernel(const scalar_t* c, const uint8_t* bits, scalar_t* out, acc_t* db,
                                               int64_t n, int64_t mask_numel, acc_t slope, int64_t channels,
                                               int64_t inner) {
  GRID_STRIDE(e, n) {
    const scalar_t v = kernels::mask_multiply<scalar_t, acc_t>(c, bits, mask_numel, slope, e);
    out[e] = v;
    atomicAdd(db + (e / inner) % channels, static_cast<acc_t>(v));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void softmax_cotangent_kernel(const scalar_t* x, const scalar_t* v, scalar_t* zeta, int64_t rows,
                                         int64_t B, int64_t C) {
  GRID_STRIDE(r, rows) { kernels::softmax_cotangent<scalar_t, acc_t>(x + (r % B) * C, v + r * C, zeta + r * C, C); }
}

template <typename scalar_t, typename acc_t>
__global__ void softmax_eta_kernel(const scalar_t* x, const scalar_t* v, const scalar_t* h, acc_t* eta, int64_t k,
                                   int64_t B, int64_t C) {
  GRID_STRIDE(b, B) {  // one sample per thread: no write conflicts on eta
    for (int64_t i = 0; i < k; ++i)
      kernels::softmax_eta_accumulate<scalar_t, acc_t>(x + b * C, v + (i * B + b) * C, h + (i * B + b) * C,
                                                       eta + b * C, C);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void penalty_head_kernel(int kind, acc_t p1, acc_t p2, const scalar_t* xi, const scalar_t* x, scalar_t* q0,
                                    acc_t* gx, const acc_t* w, acc_t* value, int64_t k, int64_t B, int64_t n) {
  GRID_STRIDE(b, B) {  // one sample per thread: value[b] and gx[b] have one writer
    for (int64_t i = 0; i < k; ++i) {
      const int64_t row = (i * B + b) * n;
      value[b] += kernels::penalty_head_row<scalar_t, acc_t>(kind, p1, p2, xi + row, x ? x + b * n : nullptr,
                                                             q0 ? q0 + row : nullptr, gx ? gx + b * n : nullptr, n,
                                                             w[b]);
    }
  }
}

template <typename Act, typename scalar_t, typename acc_t>
__global__ void activation_derivative_multiply_kernel(const scalar_t* c, const scalar_t* z, scalar_t* out,
                                                      int64_t n, int64_t copies, acc_t p1, acc_t p2) {
  GRID_STRIDE(m, n) {  // one thread per element of z: g'(z_m) once, applied to the k copies (coalesced)
    kernels::activation_derivative_multiply<Act, scalar_t, acc_t>(c, z, out, n, copies, p1, p2, m);
  }
}

template <typename Act, typename scalar_t, typename acc_t>
__global__ void activation_source_kernel(const scalar_t* xi, const scalar_t* q, const scalar_t* z, scalar_t* out,
                                         int64_t n, int64_t copies, acc_t p1, acc_t p2) {
  GRID_STRIDE(m, n) {  // one thread per element of z looping over the copies: no atomics, deterministic
    out[m] = kernels::activation_source<Act, scalar_t, acc_t>(xi, q, z, n, copies, p1, p2, m);
  }
}

// One host launcher per activation struct (instantiated by the switch over the table below).
template <typename Act>
void launch_activation_derivative_multiply(const at::Tensor& c, const at::Tensor& z, at::Tensor& out, double p1,
                                           double p2, cudaStream_t stream) {
  const int64_t n = z.numel(), copies = c.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, c.scalar_type(),
                                  "activation_derivative_multiply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    activation_derivative_multiply_kernel<Act, scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        c.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, copies,
        static_cast<acc_t>(p1), static_cast<acc_t>(p2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename Act>
void launch_activation_source(const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z, at::Tensor& out,
                              double p1, double p2, cudaStream_t stream) {
  const int64_t n = z.numel(), copies = xi.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, z.scalar_type(),
                                  "activation_source", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    activation_source_kernel<Act, scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        xi.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
        copies, static_cast<acc_t>(p1), static_cast<acc_t>(p2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

#define DBPROP_FLOATING_TYPES(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, t, name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> forward_epilogue(const at::Tensor& z, const at::Tensor& bias, int64_t channels,
                                                    int64_t inner, double slope) {
  c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.numel();
  at::Tensor x = at::empty_like(z);
  at::Tensor bits = at::empty({kernels::packed_bytes(n)}, z.options().dtype(at::kByte));
  at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  auto stream = at::cuda::getCurrentCUDAStream();
  DBPROP_FLOATING_TYPES(z.scalar_type(), "forward_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_epilogue_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, x.data_ptr<scalar_t>(), n, channels,
        inner, static_cast<acc_t>(slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pack_positive_kernel<scalar_t><<<blocks_for(bits.numel()), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), bits.data_ptr<uint8_t>(), n, bits.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x, bits};
}

at::Tensor pack_positive(const at::Tensor& t) {
  c10::cuda::CUDAGuard guard(t.device());
  at::Tensor bits = at::empty({kernels::packed_bytes(t.numel())}, t.options());
  pack_positive_kernel<uint8_t><<<blocks_for(bits.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      t.data_ptr<uint8_t>(), bits.data_ptr<uint8_t>(), t.numel(), bits.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

at::Tensor mask_multiply(const at::Tensor& c, const at::Tensor& bits, int64_t mask_numel, double slope) {
  c10::cuda::CUDAGuard guard(c.device());
  at::Tensor out = at::empty_like(c);
  auto stream = at::cuda::getCurrentCUDAStream();
  DBPROP_FLOATING_TYPES(c.scalar_type(), "mask_multiply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mask_multiply_kernel<scalar_t, acc_t><<<blocks_for(c.numel()), kThreads, 0, stream>>>(
        c.data_ptr<scalar_t>(), bits.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), c.numel(), mask_numel,
        static_cast<acc_t>(slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_multiply_bias_grad(const at::Tensor& c, const at::Tensor& bits,
                                                           int64_t mask_numel, double slope, int64_t channels,
                                                           int64_t inner) {
  if (at::globalContext().deterministicAlgorithms()) {
    // torch.use_deterministic_algorithms(True): the fused kernel below sums with atomics; instead the masked
    // product, then ATen's deterministic tree reduction over batch and positions
    at::Tensor out = mask_multiply(c, bits, mask_numel, slope);
    at::Tensor db = out.view({-1, channels, inner}).sum({0, 2}, false, at::toOpMathType(c.scalar_type()));
    return {out, db.to(c.scalar_type())};
  }
  c10::cuda::CUDAGuard guard(c.device());
  at::Tensor out = at::empty_like(c);
  at::Tensor db = at::zeros({channels}, c.options().dtype(at::toOpMathType(c.scalar_type())));
  auto stream = at::cuda::getCurrentCUDAStream();
  DBPROP_FLOATING_TYPES(c.scalar_type(), "mask_multiply_bias_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mask_multiply_bias_grad_kernel<scalar_t, acc_t><<<blocks_for(c.numel()), kThreads, 0, stream>>>(
        c.data_ptr<scalar_t>(), bits.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), db.data_ptr<acc_t>(), c.numel(),
        mask_numel, static_cast<acc_t>(slope), channels, inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, db.to(c.scalar_type())};
}

at::Tensor softmax_cotangent(const at::Tensor& x, const at::Tensor& v) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor zeta = at::empty_like(v);
  const int64_t rows = v.size(0) * v.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  DBPROP_FLOATING_TYPES(x.scalar_type(), "softmax_cotangent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    softmax_cotangent_kernel<scalar_t, acc_t><<<blocks_for(rows), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), zeta.data_ptr<scalar_t>(), rows, x.size(0), x.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return zeta;
}

void softmax_eta_accumulate(const at::Tensor& x, const at::Tensor& v, const at::Tensor& h, at::Tensor& eta) {
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  DBPROP_FLOATING_TYPES(x.scalar_type(), "softmax_eta_accumulate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    softmax_eta_kernel<scalar_t, acc_t><<<blocks_for(x.size(0)), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), eta.data_ptr<acc_t>(), v.size(0),
        x.size(0), x.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> penalty_head(const at::Tensor& xi, const at::Tensor& x, int64_t kind, double p1,
                                                double p2, const at::Tensor& weight, at::Tensor& value, bool want_q0,
                                                bool want_input_grad) {
  c10::cuda::CUDAGuard guard(xi.device());
  const int64_t k = xi.size(0), B = xi.size(1), n = xi.size(2);
  at::Tensor q0 = want_q0 ? at::empty_like(xi) : at::Tensor();
  const auto acc = at::toOpMathType(xi.scalar_type());
  at::Tensor gx = want_input_grad ? at::zeros({B, n}, xi.options().dtype(acc)) : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  DBPROP_FLOATING_TYPES(xi.scalar_type(), "penalty_head", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor w = weight.to(acc).contiguous();
    penalty_head_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, stream>>>(
        static_cast<int>(kind), static_cast<acc_t>(p1), static_cast<acc_t>(p2), xi.data_ptr<scalar_t>(),
        x.defined() ? x.data_ptr<scalar_t>() : nullptr, want_q0 ? q0.data_ptr<scalar_t>() : nullptr,
        want_input_grad ? gx.data_ptr<acc_t>() : nullptr, w.data_ptr<acc_t>(), value.data_ptr<acc_t>(), k, B, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q0, want_input_grad ? gx.to(xi.scalar_type()) : gx};
}

at::Tensor activation_derivative_multiply(const at::Tensor& c, const at::Tensor& z, int64_t kind, double p1,
                                          double p2) {
  c10::cuda::CUDAGuard guard(c.device());
  at::Tensor out = at::empty_like(c);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool known = kernels::visit_activation(kind, [&](auto act) {  // kind was checked by csrc/ops.h
    launch_activation_derivative_multiply<decltype(act)>(c, z, out, p1, p2, stream);
  });
  TORCH_CHECK(known, "unknown activation kind ", kind);
  return out;
}

at::Tensor activation_source(const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z, int64_t kind, double p1,
                             double p2) {
  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty_like(z);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool known = kernels::visit_activation(kind, [&](auto act) {
    launch_activation_source<decltype(act)>(xi, q, z, out, p1, p2, stream);
  });
  TORCH_CHECK(known, "unknown activation kind ", kind);
  return out;
}

// The elementwise and activation families on CUDA: this file's launchers behind their operators' checks
// (csrc/ops.h, Kernels).
namespace {
#define DBPROP_CUDA_LAUNCHER(name, schema, doc) static constexpr auto name = &cuda::name;
struct Launchers {
  DBPROP_ELEMENTWISE_OPS(DBPROP_CUDA_LAUNCHER)
  DBPROP_ACTIVATION_OPS(DBPROP_CUDA_LAUNCHER)
};
#undef DBPROP_CUDA_LAUNCHER
}  // namespace

TORCH_LIBRARY_IMPL(dbprop, CUDA, m) {
  DBPROP_ELEMENTWISE_OPS(DBPROP_REGISTER_KERNEL)
  DBPROP_ACTIVATION_OPS(DBPROP_REGISTER_KERNEL)
}

}  // namespace cuda
}  // namespace dbprop
