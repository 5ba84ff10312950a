// Argument checks (TORCH_CHECK, naming the argument) and device dispatch of the element kernels.
#include "elementwise.h"

#include "kernels/activations.h"

#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

namespace dbprop {
namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_bits(const at::Tensor& bits, const at::Tensor& c, int64_t mask_numel) {
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.is_contiguous(), "bits must be a contiguous uint8 tensor");
  TORCH_CHECK(bits.device() == c.device(), "bits is on ", bits.device(), " but the cotangent is on ", c.device());
  TORCH_CHECK(mask_numel > 0, "mask_numel must be positive (empty batches are rejected), got ", mask_numel);
  TORCH_CHECK(bits.numel() == (mask_numel + 7) / 8, "bits holds ", bits.numel(), " bytes but mask_numel=",
              mask_numel, " needs ", (mask_numel + 7) / 8);
  TORCH_CHECK(c.numel() % mask_numel == 0, "cotangent of ", c.numel(),
              " elements is not a whole number of copies of the mask (", mask_numel, " elements)");
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), na, " is ", a.scalar_type(), " but ", nb, " is ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), na, " is on ", a.device(), " but ", nb, " is on ", b.device());
}

// z and a tensor t of k >= 1 stacked copies of z (the activation kernels).
void check_copies(const at::Tensor& t, const at::Tensor& z, const char* name) {
  check_float(t, name);
  check_same(t, z, name, "z");
  TORCH_CHECK(t.numel() > 0 && t.numel() % z.numel() == 0, name, " of ", t.numel(),
              " elements is not a whole positive number of copies of z (", z.numel(), " elements)");
}

void check_activation(const at::Tensor& z, int64_t kind) {
  check_float(z, "z");
  TORCH_CHECK(z.numel() > 0, "z is empty (empty batches are rejected)");
  TORCH_CHECK(kind >= 0 && kind < kernels::kNumActivations, "unknown activation kind ", kind, " (0 to ",
              kernels::kNumActivations - 1, ")");
}

// x̂ (B, C, ...) and t (k·B, C, ...): k >= 1 stacked copies of x̂'s batch (the train-mode BatchNorm kernels).
void check_bn_copies(const at::Tensor& t, const at::Tensor& xhat, const char* name) {
  check_float(t, name);
  check_same(t, xhat, name, "xhat");
  bool ok = t.dim() == xhat.dim() && t.size(0) > 0 && t.size(0) % xhat.size(0) == 0;
  for (int64_t d = 1; ok && d < t.dim(); ++d) ok = t.size(d) == xhat.size(d);
  TORCH_CHECK(ok, name, " must have shape (k·B, C, ...): k >= 1 stacked copies of xhat's shape ", xhat.sizes(),
              "; got ", t.sizes());
}

void check_bn_xhat(const at::Tensor& xhat) {
  check_float(xhat, "xhat");
  TORCH_CHECK(xhat.dim() >= 2 && xhat.numel() > 0, "xhat must be a non-empty (B, C, ...) tensor, got shape ",
              xhat.sizes());
}

// A per-channel (C,) vector of x̂'s dtype and device.
void check_bn_channel(const at::Tensor& v, const at::Tensor& xhat, const char* name) {
  check_float(v, name);
  check_same(v, xhat, name, "xhat");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == xhat.size(1), name, " must have shape (", xhat.size(1),
              ",) (one value per channel), got ", v.sizes());
}

}  // namespace

#ifdef WITH_CUDA
#define DBPROP_DISPATCH(t, fn, ...) return (t).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__)
#else
#define DBPROP_DISPATCH(t, fn, ...)                                                       \
  TORCH_CHECK(!(t).is_cuda(), "dbprop._C was built without CUDA; got a CUDA tensor"); \
  return cpu::fn(__VA_ARGS__)
#endif

std::tuple<at::Tensor, at::Tensor> forward_epilogue(const at::Tensor& z, const at::Tensor& bias, int64_t channels,
                                                    int64_t inner, double slope) {
  check_float(z, "z");
  TORCH_CHECK(z.numel() > 0, "z is empty (empty batches are rejected)");
  if (bias.defined()) {
    check_float(bias, "bias");
    check_same(z, bias, "z", "bias");
    TORCH_CHECK(bias.numel() == channels, "bias has ", bias.numel(), " elements, expected ", channels);
  }
  TORCH_CHECK(channels > 0 && inner > 0 && z.numel() % (channels * inner) == 0,
              "z of ", z.numel(), " elements does not split into channels=", channels, " x inner=", inner);
  auto result = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    DBPROP_DISPATCH(z, forward_epilogue, z, bias, channels, inner, slope);
  }();
  if (slope < 0) {  // x > 0 does not identify z > 0 for a negative slope: pack the sign of z + b itself
    at::Tensor v = bias.defined() ? z.view({-1, channels, inner}) + bias.view({1, channels, 1}) : z;
    std::get<1>(result) = pack_positive(v.gt(0).to(at::kByte).contiguous().view({-1}));
  }
  return result;
}

at::Tensor pack_positive(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kByte && t.is_contiguous() && t.numel() > 0,
              "pack_positive needs a non-empty contiguous uint8 tensor");
  DBPROP_DISPATCH(t, pack_positive, t);
}

at::Tensor mask_multiply(const at::Tensor& c, const at::Tensor& bits, int64_t mask_numel, double slope) {
  check_float(c, "cotangent");
  check_bits(bits, c, mask_numel);
  DBPROP_DISPATCH(c, mask_multiply, c, bits, mask_numel, slope);
}

std::tuple<at::Tensor, at::Tensor> mask_multiply_bias_grad(const at::Tensor& c, const at::Tensor& bits,
                                                           int64_t mask_numel, double slope, int64_t channels,
                                                           int64_t inner) {
  check_float(c, "cotangent");
  check_bits(bits, c, mask_numel);
  TORCH_CHECK(channels > 0 && inner > 0 && c.numel() % (channels * inner) == 0,
              "cotangent does not split into channels=", channels, " x inner=", inner);
  if (c.is_cuda() && at::globalContext().deterministicAlgorithms()) {
    // torch.use_deterministic_algorithms(True): the fused CUDA kernel sums with atomics; instead the masked
    // product, then ATen's deterministic tree reduction over batch and positions
    at::Tensor out = mask_multiply(c, bits, mask_numel, slope);
    at::Tensor db = out.view({-1, channels, inner}).sum({0, 2}, false, at::toOpMathType(c.scalar_type()));
    return {out, db.to(c.scalar_type())};
  }
  DBPROP_DISPATCH(c, mask_multiply_bias_grad, c, bits, mask_numel, slope, channels, inner);
}

at::Tensor softmax_cotangent(const at::Tensor& x, const at::Tensor& v) {
  check_float(x, "probs");
  check_float(v, "directions");
  check_same(x, v, "probs", "directions");
  TORCH_CHECK(x.dim() == 2 && v.dim() == 3 && v.size(1) == x.size(0) && v.size(2) == x.size(1),
              "directions must have shape (k, B, C) matching probs (B, C); got ", v.sizes(), " and ", x.sizes());
  DBPROP_DISPATCH(x, softmax_cotangent, x, v);
}

void softmax_eta_accumulate(const at::Tensor& x, const at::Tensor& v, const at::Tensor& h, at::Tensor& eta) {
  check_float(x, "probs");
  check_float(v, "directions");
  check_float(h, "h_L");
  check_float(eta, "eta");
  check_same(x, v, "probs", "directions");
  check_same(x, h, "probs", "h_L");
  TORCH_CHECK(v.sizes() == h.sizes(), "directions ", v.sizes(), " and h_L ", h.sizes(), " differ in shape");
  TORCH_CHECK(eta.sizes() == x.sizes(), "eta must have the shape of probs ", x.sizes(), ", got ", eta.sizes());
  TORCH_CHECK(eta.scalar_type() == at::toOpMathType(x.scalar_type()), "eta must be ",
              at::toOpMathType(x.scalar_type()), ", got ", eta.scalar_type());
  DBPROP_DISPATCH(x, softmax_eta_accumulate, x, v, h, eta);
}

std::tuple<at::Tensor, at::Tensor> penalty_head(const at::Tensor& xi, const at::Tensor& x, int64_t kind, double p1,
                                                double p2, const at::Tensor& weight, at::Tensor& value, bool want_q0,
                                                bool want_input_grad) {
  check_float(xi, "xi");
  TORCH_CHECK(xi.dim() == 3 && xi.size(0) > 0 && xi.size(1) > 0, "xi must have shape (k, B, N), got ", xi.sizes());
  TORCH_CHECK(kind >= kernels::kSquaredNorm && kind <= kernels::kRelevance, "unknown penalty head kind ", kind);
  const bool reads_x = kind == kernels::kAlignment || kind == kernels::kRelevance;
  if (reads_x || want_input_grad) {
    check_float(x, "x");
    check_same(xi, x, "xi", "x");
    TORCH_CHECK(x.dim() == 2 && x.size(0) == xi.size(1) && x.size(1) == xi.size(2), "x must have shape (",
                xi.size(1), ", ", xi.size(2), "), got ", x.sizes());
  }
  check_float(weight, "sample_weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == xi.size(1) && weight.device() == xi.device(),
              "sample_weight must have shape (", xi.size(1), ",) on ", xi.device(), ", got ", weight.sizes());
  TORCH_CHECK(value.scalar_type() == at::toOpMathType(xi.scalar_type()) && value.dim() == 1 &&
                  value.size(0) == xi.size(1) && value.is_contiguous() && value.device() == xi.device(),
              "value must be a contiguous (", xi.size(1), ",) tensor of ", at::toOpMathType(xi.scalar_type()));
  DBPROP_DISPATCH(xi, penalty_head, xi, x, kind, p1, p2, weight, value, want_q0, want_input_grad);
}

int64_t head_kind(const std::string& name) {
#define DBPROP_HEAD_CASE(id, str) \
  if (name == str) return kernels::id;
  DBPROP_PENALTY_HEADS(DBPROP_HEAD_CASE)
#undef DBPROP_HEAD_CASE
#define DBPROP_HEAD_NAME(id, str) str " "
  TORCH_CHECK(false, "unknown penalty head '", name, "'; known: " DBPROP_PENALTY_HEADS(DBPROP_HEAD_NAME));
#undef DBPROP_HEAD_NAME
  return -1;
}

int64_t activation_kind(const std::string& name) {
  const std::vector<std::string> names = activation_names();
  std::string known;
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<int64_t>(i);
    known += (i ? ", " : "") + names[i];
  }
  TORCH_CHECK(false, "unknown activation '", name, "'; known smooth activations: ", known);
  return -1;
}

std::vector<std::string> activation_names() {
#define DBPROP_ACTIVATION_NAME(id, name, Act) name,
  return {DBPROP_SMOOTH_ACTIVATIONS(DBPROP_ACTIVATION_NAME)};
#undef DBPROP_ACTIVATION_NAME
}

at::Tensor activation_derivative_multiply(const at::Tensor& c, const at::Tensor& z, int64_t kind, double p1,
                                          double p2) {
  check_activation(z, kind);
  check_copies(c, z, "cotangent");
  DBPROP_DISPATCH(c, activation_derivative_multiply, c, z, kind, p1, p2);
}

at::Tensor activation_source(const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z, int64_t kind, double p1,
                             double p2) {
  check_activation(z, kind);
  check_copies(xi, z, "xi");
  check_copies(q, z, "q");
  TORCH_CHECK(xi.numel() == q.numel(), "xi has ", xi.numel(), " elements but q has ", q.numel());
  DBPROP_DISPATCH(z, activation_source, xi, q, z, kind, p1, p2);
}

at::Tensor batchnorm_train_linear(const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& scale) {
  check_bn_xhat(xhat);
  check_bn_copies(q, xhat, "q");
  check_bn_channel(scale, xhat, "scale");
  DBPROP_DISPATCH(q, batchnorm_train_linear, q, xhat, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_train_bbp(const at::Tensor& xi, const at::Tensor& q,
                                                                   const at::Tensor& xhat, const at::Tensor& invstd,
                                                                   const at::Tensor& gamma, bool need_tangent,
                                                                   bool want_source, bool want_mixed) {
  check_bn_xhat(xhat);
  check_bn_copies(q, xhat, "q");
  TORCH_CHECK(xi.defined() || !(want_source || want_mixed),
              "xi is required for the source (want_source) and the mixed term (want_mixed)");
  if (xi.defined()) {
    check_bn_copies(xi, xhat, "xi");
    TORCH_CHECK(xi.sizes() == q.sizes(), "xi ", xi.sizes(), " and q ", q.sizes(), " differ in shape");
  }
  check_bn_channel(invstd, xhat, "invstd");
  if (gamma.defined()) check_bn_channel(gamma, xhat, "gamma");
  if (!(need_tangent || want_source || want_mixed)) return {at::Tensor(), at::Tensor(), at::Tensor()};
  DBPROP_DISPATCH(q, batchnorm_train_bbp, xi, q, xhat, invstd, gamma, need_tangent, want_source, want_mixed);
}

}  // namespace dbprop
