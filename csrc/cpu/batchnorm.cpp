// CPU launchers of the train-mode BatchNorm bodies (csrc/kernels/batchnorm.h, docs/maths.md §4.9):
// one reduction pass per (copy, channel) task, accumulated in at::acc_type<scalar_t, false> (double for float),
// then one elementwise pass per output; at::parallel_for (OpenMP) over tasks, deterministic (no atomics).
#include "../ops.h"
#include "../kernels/batchnorm.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace dbprop {
namespace cpu {
namespace {

constexpr int64_t kGrain = 2048;
constexpr int kLanes = 4;  // independent partial sums per slot in the reduction (breaks the add latency chain)

// The moments (m_q, w[, m_ξ, cov, u]) of every (copy, channel) in one pass over q (and ξ), into `mom`
// (k·C records of kernels::kBnSlots).
template <bool kWithXi, typename scalar_t, typename acc_t>
void moments_pass(const scalar_t* xi, const scalar_t* q, const scalar_t* xh, acc_t* mom, const BnDims& d) {
  const int64_t n = d.B * d.S;
  at::parallel_for(0, d.k * d.C, std::max<int64_t>(1, kGrain / n), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t kk = t / d.C, c = t % d.C;
      acc_t part[kLanes][kernels::kBnSlots] = {};
      for (int64_t b = 0; b < d.B; ++b) {
        const int64_t e0 = kernels::bn_copy_offset(kk, b, c, 0, d.B, d.C, d.S);
        const int64_t h0 = kernels::bn_xhat_offset(b, c, 0, d.C, d.S);
        int64_t s = 0;
        for (; s + kLanes <= d.S; s += kLanes)
          for (int l = 0; l < kLanes; ++l)
            kernels::batchnorm_accumulate<kWithXi, scalar_t, acc_t>(xi, q, xh, e0 + s + l, h0 + s + l, part[l]);
        for (; s < d.S; ++s)
          kernels::batchnorm_accumulate<kWithXi, scalar_t, acc_t>(xi, q, xh, e0 + s, h0 + s, part[s % kLanes]);
      }
      acc_t* r = mom + t * kernels::kBnSlots;
      for (int j = 0; j < kernels::kBnSlots; ++j) r[j] = (part[0][j] + part[1][j]) + (part[2][j] + part[3][j]);
      kernels::batchnorm_finish_moments<kWithXi, acc_t>(r, n);
    }
  });
}

// out = A q (4.3), the channel factor γ/σ being factor(a, b, c) = (a ? a[c] : 1)(b ? b[c] : 1).
template <typename scalar_t, typename acc_t>
void tangent_pass(const scalar_t* q, const scalar_t* xh, const acc_t* mom, const scalar_t* fa, const scalar_t* fb,
                  scalar_t* out, const BnDims& d) {
  at::parallel_for(0, d.k * d.B * d.C, std::max<int64_t>(1, kGrain / d.S), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {  // one (copy, sample, channel) row of S entries per step
      const int64_t c = t % d.C, b = (t / d.C) % d.B, kk = t / (d.B * d.C);
      const acc_t* m = mom + (kk * d.C + c) * kernels::kBnSlots;
      const acc_t scale = kernels::batchnorm_channel_factor<scalar_t, acc_t>(fa, fb, c);
      const scalar_t* qr = q + t * d.S;
      const scalar_t* hr = xh + kernels::bn_xhat_offset(b, c, 0, d.C, d.S);
      scalar_t* o = out + t * d.S;
      for (int64_t s = 0; s < d.S; ++s) o[s] = kernels::batchnorm_tangent<scalar_t, acc_t>(qr[s], hr[s], m, scale);
    }
  });
}

// ŝ (4.6) summed over the copies, one writer per x̂ row; the copies are added in order as in
// kernels::batchnorm_source (the CUDA body), row-wise here so that the inner loop runs over contiguous entries.
template <typename scalar_t, typename acc_t>
void source_pass(const scalar_t* xi, const scalar_t* q, const scalar_t* xh, const acc_t* mom, const scalar_t* gamma,
                 const scalar_t* invstd, scalar_t* out, const BnDims& d) {
  at::parallel_for(0, d.B * d.C, std::max<int64_t>(1, kGrain / (d.S * d.k)), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> acc(d.S);
    for (int64_t r = lo; r < hi; ++r) {  // x̂ row (b, c)
      const int64_t b = r / d.C, c = r % d.C;
      const scalar_t* hr = xh + r * d.S;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t kk = 0; kk < d.k; ++kk) {
        const acc_t* m = mom + (kk * d.C + c) * kernels::kBnSlots;
        const int64_t e0 = kernels::bn_copy_offset(kk, b, c, 0, d.B, d.C, d.S);
        for (int64_t s = 0; s < d.S; ++s)
          acc[s] += kernels::batchnorm_source_term<scalar_t, acc_t>(xi[e0 + s], q[e0 + s], hr[s], m);
      }
      const acc_t coef = kernels::batchnorm_source_factor<scalar_t, acc_t>(gamma, invstd, c);
      scalar_t* o = out + r * d.S;
      for (int64_t s = 0; s < d.S; ++s) o[s] = static_cast<scalar_t>(coef * acc[s]);
    }
  });
}

}  // namespace

#define DBPROP_FLOATING_TYPES(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, t, name, __VA_ARGS__)

at::Tensor batchnorm_train_linear(const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& scale) {
  const BnDims d = bn_dims(q, xhat);
  at::Tensor out = at::empty_like(q);
  DBPROP_FLOATING_TYPES(q.scalar_type(), "batchnorm_train_linear", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    std::vector<acc_t> mom(d.k * d.C * kernels::kBnSlots);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* hp = xhat.data_ptr<scalar_t>();
    moments_pass<false, scalar_t, acc_t>(nullptr, qp, hp, mom.data(), d);
    tangent_pass<scalar_t, acc_t>(qp, hp, mom.data(), scale.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(),
                                  d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_train_bbp(const at::Tensor& xi, const at::Tensor& q,
                                                                   const at::Tensor& xhat, const at::Tensor& invstd,
                                                                   const at::Tensor& gamma, bool need_tangent,
                                                                   bool want_source, bool want_mixed) {
  const BnDims d = bn_dims(q, xhat);
  at::Tensor tangent = need_tangent ? at::empty_like(q) : at::Tensor();
  at::Tensor source = want_source ? at::empty_like(xhat) : at::Tensor();
  at::Tensor dgamma = want_mixed ? at::empty({d.C}, xhat.options()) : at::Tensor();
  DBPROP_FLOATING_TYPES(q.scalar_type(), "batchnorm_train_bbp", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    std::vector<acc_t> mom(d.k * d.C * kernels::kBnSlots);
    const scalar_t* xp = xi.defined() ? xi.data_ptr<scalar_t>() : nullptr;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* hp = xhat.data_ptr<scalar_t>();
    const scalar_t* ip = invstd.data_ptr<scalar_t>();
    const scalar_t* gp = gamma.defined() ? gamma.data_ptr<scalar_t>() : nullptr;
    if (xp)
      moments_pass<true, scalar_t, acc_t>(xp, qp, hp, mom.data(), d);
    else
      moments_pass<false, scalar_t, acc_t>(nullptr, qp, hp, mom.data(), d);
    if (need_tangent) tangent_pass<scalar_t, acc_t>(qp, hp, mom.data(), gp, ip, tangent.data_ptr<scalar_t>(), d);
    if (want_source) source_pass<scalar_t, acc_t>(xp, qp, hp, mom.data(), gp, ip, source.data_ptr<scalar_t>(), d);
    if (want_mixed) {
      scalar_t* dg = dgamma.data_ptr<scalar_t>();
      for (int64_t c = 0; c < d.C; ++c)
        dg[c] = static_cast<scalar_t>(
            kernels::batchnorm_dgamma<acc_t>(mom.data(), d.k, d.C, c, d.B * d.S, static_cast<acc_t>(ip[c])));
    }
  });
  return {tangent, source, dgamma};
}

// The batchnorm families on CPU: this file's launchers behind their operators' checks
// (csrc/ops.h, Kernels).
namespace {
#define DBPROP_CPU_LAUNCHER(name, schema, doc) static constexpr auto name = &cpu::name;
struct Launchers {
  DBPROP_BATCHNORM_OPS(DBPROP_CPU_LAUNCHER)
};
#undef DBPROP_CPU_LAUNCHER
}  // namespace

TORCH_LIBRARY_IMPL(dbprop, CPU, m) {
  DBPROP_BATCHNORM_OPS(DBPROP_REGISTER_KERNEL)
}

}  // namespace cpu
}  // namespace dbprop
