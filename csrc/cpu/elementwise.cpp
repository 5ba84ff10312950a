// CPU launchers of the element bodies: at::parallel_for over bytes, elements, channels or rows.
#include "../ops.h"
#include "../kernels/activations.h"
#include "../kernels/elementwise.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace dbprop {
namespace cpu {
namespace {
constexpr int64_t kGrain = 2048;
}

#define DBPROP_FLOATING_TYPES(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, t, name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> forward_epilogue(const at::Tensor& z, const at::Tensor& bias, int64_t channels,
                                                    int64_t inner, double slope) {
  const int64_t n = z.numel(), blocks = n / inner;
  at::Tensor x = at::empty_like(z);
  at::Tensor bits = at::empty({kernels::packed_bytes(n)}, z.options().dtype(at::kByte));
  at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  DBPROP_FLOATING_TYPES(z.scalar_type(), "forward_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* bitsp = bits.data_ptr<uint8_t>();
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / inner), [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {  // one bias value per (row, channel) block
        const acc_t bias_value = bp ? static_cast<acc_t>(bp[blk % channels]) : acc_t(0);
        for (int64_t e = blk * inner; e < (blk + 1) * inner; ++e)
          kernels::forward_epilogue_element<scalar_t, acc_t>(zp, xp, bias_value, static_cast<acc_t>(slope), e);
      }
    });
    at::parallel_for(0, bits.numel(), kGrain / 8, [&](int64_t lo, int64_t hi) {
      for (int64_t byte = lo; byte < hi; ++byte) kernels::pack_positive_byte<scalar_t>(xp, bitsp, n, byte);
    });
  });
  return {x, bits};
}

at::Tensor pack_positive(const at::Tensor& t) {
  const int64_t n = t.numel();
  at::Tensor bits = at::empty({kernels::packed_bytes(n)}, t.options());
  const uint8_t* tp = t.data_ptr<uint8_t>();
  uint8_t* bp = bits.data_ptr<uint8_t>();
  at::parallel_for(0, bits.numel(), kGrain / 8, [&](int64_t lo, int64_t hi) {
    for (int64_t byte = lo; byte < hi; ++byte) kernels::pack_positive_byte<uint8_t>(tp, bp, n, byte);
  });
  return bits;
}

at::Tensor mask_multiply(const at::Tensor& c, const at::Tensor& bits, int64_t mask_numel, double slope) {
  at::Tensor out = at::empty_like(c);
  DBPROP_FLOATING_TYPES(c.scalar_type(), "mask_multiply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const uint8_t* bp = bits.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t bytes = bits.numel(), copies = c.numel() / mask_numel;
    at::parallel_for(0, copies * bytes, kGrain / 8, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        kernels::mask_multiply_byte<scalar_t, acc_t>(cp, bp, op, mask_numel, static_cast<acc_t>(slope), i / bytes,
                                                     i % bytes);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_multiply_bias_grad(const at::Tensor& c, const at::Tensor& bits,
                                                           int64_t mask_numel, double slope, int64_t channels,
                                                           int64_t inner) {
  at::Tensor out = at::empty_like(c);
  at::Tensor db = at::empty({channels}, c.options());
  const int64_t rows = c.numel() / (channels * inner);
  DBPROP_FLOATING_TYPES(c.scalar_type(), "mask_multiply_bias_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const uint8_t* bp = bits.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* dbp = db.data_ptr<scalar_t>();
    at::parallel_for(0, channels, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t ch = lo; ch < hi; ++ch) {  // one channel per task: rows × inner elements, no races
        acc_t total = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t base = (r * channels + ch) * inner;  // a run of `inner` elements inside one copy
          total += kernels::mask_multiply_run<scalar_t, acc_t>(cp, bp, op, static_cast<acc_t>(slope), base,
                                                               base % mask_numel, inner);
        }
        dbp[ch] = static_cast<scalar_t>(total);
      }
    });
  });
  return {out, db};
}

at::Tensor softmax_cotangent(const at::Tensor& x, const at::Tensor& v) {
  const int64_t rows = v.size(0) * v.size(1), B = x.size(0), C = x.size(1);
  at::Tensor zeta = at::empty_like(v);
  DBPROP_FLOATING_TYPES(x.scalar_type(), "softmax_cotangent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* zp = zeta.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r)
        kernels::softmax_cotangent<scalar_t, acc_t>(xp + (r % B) * C, vp + r * C, zp + r * C, C);
    });
  });
  return zeta;
}

void softmax_eta_accumulate(const at::Tensor& x, const at::Tensor& v, const at::Tensor& h, at::Tensor& eta) {
  const int64_t k = v.size(0), B = x.size(0), C = x.size(1);
  DBPROP_FLOATING_TYPES(x.scalar_type(), "softmax_eta_accumulate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    acc_t* ep = eta.data_ptr<acc_t>();
    at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b)
        for (int64_t i = 0; i < k; ++i)  // one sample per task: no write conflicts on eta
          kernels::softmax_eta_accumulate<scalar_t, acc_t>(xp + b * C, vp + (i * B + b) * C, hp + (i * B + b) * C,
                                                           ep + b * C, C);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> penalty_head(const at::Tensor& xi, const at::Tensor& x, int64_t kind, double p1,
                                                double p2, const at::Tensor& weight, at::Tensor& value, bool want_q0,
                                                bool want_input_grad) {
  const int64_t k = xi.size(0), B = xi.size(1), n = xi.size(2);
  at::Tensor q0 = want_q0 ? at::empty_like(xi) : at::Tensor();
  const auto acc = at::toOpMathType(xi.scalar_type());
  at::Tensor gx = want_input_grad ? at::zeros({B, n}, xi.options().dtype(acc)) : at::Tensor();
  DBPROP_FLOATING_TYPES(xi.scalar_type(), "penalty_head", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor w = weight.to(acc).contiguous();
    const acc_t* wp = w.data_ptr<acc_t>();
    const scalar_t* xip = xi.data_ptr<scalar_t>();
    const scalar_t* xp = x.defined() ? x.data_ptr<scalar_t>() : nullptr;
    scalar_t* qp = want_q0 ? q0.data_ptr<scalar_t>() : nullptr;
    acc_t* gp = want_input_grad ? gx.data_ptr<acc_t>() : nullptr;
    acc_t* vp = value.data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b)  // one sample per task: value[b] and gx[b] have one writer
        for (int64_t i = 0; i < k; ++i) {
          const int64_t row = (i * B + b) * n;
          vp[b] += kernels::penalty_head_row<scalar_t, acc_t>(
              static_cast<int>(kind), static_cast<acc_t>(p1), static_cast<acc_t>(p2), xip + row,
              xp ? xp + b * n : nullptr, qp ? qp + row : nullptr, gp ? gp + b * n : nullptr, n, wp[b]);
        }
    });
  });
  return {q0, want_input_grad ? gx.to(xi.scalar_type()) : gx};
}

at::Tensor activation_derivative_multiply(const at::Tensor& c, const at::Tensor& z, int64_t kind, double p1,
                                          double p2) {
  at::Tensor out = at::empty_like(c);
  const int64_t n = z.numel(), copies = c.numel() / n;
  DBPROP_FLOATING_TYPES(c.scalar_type(), "activation_derivative_multiply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t a1 = static_cast<acc_t>(p1), a2 = static_cast<acc_t>(p2);
    kernels::visit_activation(kind, [&](auto act) {
      using Act = decltype(act);
      at::parallel_for(0, n, std::max<int64_t>(1, kGrain / copies), [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m)  // g'(z_m) once, applied to the k copies
          kernels::activation_derivative_multiply<Act, scalar_t, acc_t>(cp, zp, op, n, copies, a1, a2, m);
      });
    });
  });
  return out;
}

at::Tensor activation_source(const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z, int64_t kind, double p1,
                             double p2) {
  at::Tensor out = at::empty_like(z);
  const int64_t n = z.numel(), copies = xi.numel() / n;
  DBPROP_FLOATING_TYPES(z.scalar_type(), "activation_source", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xi.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t a1 = static_cast<acc_t>(p1), a2 = static_cast<acc_t>(p2);
    kernels::visit_activation(kind, [&](auto act) {
      using Act = decltype(act);
      at::parallel_for(0, n, std::max<int64_t>(1, kGrain / copies), [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m)  // one writer per element of z, copies summed in order
          op[m] = kernels::activation_source<Act, scalar_t, acc_t>(xp, qp, zp, n, copies, a1, a2, m);
      });
    });
  });
  return out;
}

// The elementwise and activation families on CPU: this file's launchers behind their operators' checks
// (csrc/ops.h, Kernels).
namespace {
#define DBPROP_CPU_LAUNCHER(name, schema, doc) static constexpr auto name = &cpu::name;
struct Launchers {
  DBPROP_ELEMENTWISE_OPS(DBPROP_CPU_LAUNCHER)
  DBPROP_ACTIVATION_OPS(DBPROP_CPU_LAUNCHER)
};
#undef DBPROP_CPU_LAUNCHER
}  // namespace

TORCH_LIBRARY_IMPL(dbprop, CPU, m) {
  DBPROP_ELEMENTWISE_OPS(DBPROP_REGISTER_KERNEL)
  DBPROP_ACTIVATION_OPS(DBPROP_REGISTER_KERNEL)
}

}  // namespace cpu
}  // namespace dbprop
