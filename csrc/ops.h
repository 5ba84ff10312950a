// dbprop's element kernels as dispatcher operators torch.ops.dbprop.*. An operator is one row of its family's
// table below (name, schema, what it computes), one device-generic kernel in Kernels (its argument checks, then the
// device's launcher), one launcher per device (csrc/cpu, csrc/cuda; each device file registers its families'
// kernels) and one fake kernel (dbprop/native_ops.py). From the rows: TORCH_LIBRARY's schemas, the Autograd and
// no-CUDA kernels (csrc/ops.cpp), the C++ entry points (end of this file), _C.element_operators() and with it the
// Python wrappers. The element math lives once, in csrc/kernels/elementwise.h, activations.h and batchnorm.h.
#pragma once

#include "kernels/activations.h"
#include "kernels/elementwise.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace dbprop {

// ---- the operator tables: X(name, schema, doc), one row per operator ----------------------------------------------
// Schema types in C++ (Kernels' signatures): Tensor -> const at::Tensor&, Tensor? -> const std::optional<at::Tensor>&,
// Tensor(a!) -> at::Tensor& (written, not returned: torch.compile functionalizes custom operators only without
// aliased outputs), int -> int64_t, float -> double, str -> c10::string_view. Every output is a tensor: an output not
// asked for is empty (0 elements); the Python wrapper turns output `r` into None when argument want_r / need_r is
// false.

// ReLU-family masks (one bit per element), the softmax output layer and the penalty heads (kernels/elementwise.h).
#define DBPROP_ELEMENTWISE_OPS(X)                                                                                    \
  X(forward_epilogue, "(Tensor z, Tensor? bias, int channels, int inner, float slope) -> (Tensor, Tensor)",        \
    "x = g(z + b) and the packed bits of a = [z + b > 0] for the (leaky) ReLU of slope `slope`; `bias` per "         \
    "channel, element e takes bias channel (e / inner) % channels; z contiguous.")                                  \
  X(pack_positive, "(Tensor t) -> Tensor", "The packed bits of [t > 0] for a contiguous uint8 tensor t.")            \
  X(mask_multiply, "(Tensor c, Tensor bits, int mask_numel, float slope) -> Tensor",                                \
    "a ⊙ c for the packed mask `bits` of mask_numel elements, c holding k stacked copies of its batch.")            \
  X(mask_multiply_bias_grad,                                                                                         \
    "(Tensor c, Tensor bits, int mask_numel, float slope, int channels, int inner) -> (Tensor, Tensor)",            \
    "(a ⊙ c, Σ_{rows, inner} a ⊙ c per channel): η_j and ∇b_j in one pass.")                                        \
  X(softmax_cotangent, "(Tensor probs, Tensor directions) -> Tensor",                                                \
    "ζ_L = S v for k directions (k, B, C) at the probabilities (B, C).")                                            \
  X(softmax_eta_accumulate, "(Tensor probs, Tensor directions, Tensor h, Tensor(a!) eta) -> ()",                     \
    "eta (B, C, accumulation dtype) += Σ_k (3.15)(probs, v_k, h_k) in place.")                                      \
  X(penalty_head,                                                                                                    \
    "(Tensor xi, Tensor? x, str head, float p1, float p2, Tensor weight, Tensor(a!) value, bool want_q0,"            \
    " bool want_input_grad) -> (Tensor q0, Tensor input_grad)",                                                      \
    "Penalty head `head` (kernels/elementwise.h table; parameters p1, p2) for xi (k, B, N), x (B, N; may be "        \
    "absent for heads that do not read it), weights (B,): value (B,, accumulation dtype) += Σ_k p(ξ_k) in place; "   \
    "returns q_0 = w ∇p (k, B, N) and Σ_k w ∂p/∂x (B, N).")

// Smooth activations (kernels/activations.h), by name; c, xi, q hold k stacked copies of z.
#define DBPROP_ACTIVATION_OPS(X)                                                                                     \
  X(activation_derivative_multiply, "(Tensor c, Tensor z, str activation, float p1, float p2) -> Tensor",           \
    "g'(z) ⊙ c for the smooth activation `activation` (parameters p1, p2); element e of c uses z[e % z.numel()].")  \
  X(activation_source, "(Tensor xi, Tensor q, Tensor z, str activation, float p1, float p2) -> Tensor",             \
    "Σ over the k stacked copies of g''(z) ⊙ ξ ⊙ q, summed in the op-math type without atomics; shape of z.")

// Train-mode BatchNorm (kernels/batchnorm.h, docs/maths.md §4.9): xhat is the saved x̂ (B, C, ...), q and xi hold
// k >= 1 stacked copies of its batch (k·B, C, ...), scale, invstd, gamma are (C,); one floating dtype and device.
#define DBPROP_BATCHNORM_OPS(X)                                                                                      \
  X(batchnorm_train_linear, "(Tensor q, Tensor xhat, Tensor scale) -> Tensor",                                       \
    "A q = scale (q − m(q) − x̂ m(x̂ q)) per copy and channel (docs/maths.md (4.3); A is self-adjoint).")           \
  X(batchnorm_train_bbp,                                                                                             \
    "(Tensor? xi, Tensor q, Tensor xhat, Tensor invstd, Tensor? gamma, bool need_tangent, bool want_source,"         \
    " bool want_mixed) -> (Tensor tangent, Tensor source, Tensor mixed)",                                            \
    "One reduction pass for the moments, then (A q with scale γ/σ, ŝ (4.6) summed over the copies, θ̂_γ (4.5) "     \
    "summed over the copies (C,)); gamma absent: γ = 1; xi needed for the source and mixed terms.")

#define DBPROP_ELEMENT_OPS(X) DBPROP_ELEMENTWISE_OPS(X) DBPROP_ACTIVATION_OPS(X) DBPROP_BATCHNORM_OPS(X)

// ---- undefined <-> absent ------------------------------------------------------------------------------------------
// Schemas say Tensor? (std::optional); the launchers and the chain drivers use an undefined tensor for "absent".

inline at::Tensor undefined_if_absent(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}
inline std::optional<at::Tensor> absent_if_undefined(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
inline std::vector<at::Tensor> undefined_if_absent(const std::vector<std::optional<at::Tensor>>& v) {
  std::vector<at::Tensor> out;
  for (const auto& t : v) out.push_back(undefined_if_absent(t));
  return out;
}
inline std::vector<std::optional<at::Tensor>> absent_if_undefined(const std::vector<at::Tensor>& v) {
  std::vector<std::optional<at::Tensor>> out;
  for (const auto& t : v) out.push_back(absent_if_undefined(t));
  return out;
}

// ---- names and shapes ----------------------------------------------------------------------------------------------

// The element operators' table: (name, schema, doc) per row of DBPROP_ELEMENT_OPS.
std::vector<std::tuple<std::string, std::string, std::string>> element_operators();

// The kernels::HeadKind of a penalty head's name (csrc/kernels/elementwise.h table; TORCH_CHECK on unknown names)
// and all names in table order.
int64_t head_kind(const std::string& name);
std::vector<std::string> penalty_head_names();
// The head table's rows: (name, reads x).
std::vector<std::tuple<std::string, bool>> penalty_heads();

// Smooth activations (csrc/kernels/activations.h): the kind number of a name (TORCH_CHECK on unknown names)
// and all names in table order (kind i is activation_names()[i]).
int64_t activation_kind(const std::string& name);
std::vector<std::string> activation_names();

// Train-mode BatchNorm shapes (csrc/kernels/batchnorm.h): k copies of a (B, C, S) batch.
struct BnDims {
  int64_t k, B, C, S;
};

inline BnDims bn_dims(const at::Tensor& q, const at::Tensor& xhat) {
  const int64_t B = xhat.size(0), C = xhat.size(1);
  return {q.numel() / xhat.numel(), B, C, xhat.numel() / (B * C)};
}

// ---- argument checks (TORCH_CHECK, naming the argument; csrc/ops.cpp) ----------------------------------------------
namespace checks {
// Defined, floating point, contiguous.
void check_float(const at::Tensor& t, const char* name);
// Packed bits of mask_numel elements on c's device, c holding whole copies of the mask.
void check_bits(const at::Tensor& bits, const at::Tensor& c, int64_t mask_numel);
// Same dtype and device.
void check_same(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb);
// z and a tensor t of k >= 1 stacked copies of z (the activation kernels).
void check_copies(const at::Tensor& t, const at::Tensor& z, const char* name);
void check_activation(const at::Tensor& z, int64_t kind);
// x̂ (B, C, ...) and t (k·B, C, ...): k >= 1 stacked copies of x̂'s batch (the train-mode BatchNorm kernels).
void check_bn_copies(const at::Tensor& t, const at::Tensor& xhat, const char* name);
void check_bn_xhat(const at::Tensor& xhat);
// A per-channel (C,) vector of x̂'s dtype and device.
void check_bn_channel(const at::Tensor& v, const at::Tensor& xhat, const char* name);
// Every schema output is a tensor: an output not asked for is empty (0 elements).
inline at::Tensor empty_if_undefined(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}
}  // namespace checks

// ---- the operators' kernels --------------------------------------------------------------------------------------
// One static function per operator, in the schema's argument types (the only place its C++ signature is written):
// the checks, then the device's launcher `Launch::<name>` (a device file's struct of launchers: arguments already
// checked; penalty heads and activations by kind number; absent tensors undefined; outputs not asked for may be
// undefined). A family's functions are instantiated by the device files that register it.
template <class Launch>
struct Kernels {
  using OptTensor = std::optional<at::Tensor>;

  static std::tuple<at::Tensor, at::Tensor> forward_epilogue(const at::Tensor& z, const OptTensor& bias_opt,
                                                             int64_t channels, int64_t inner, double slope) {
    const at::Tensor bias = undefined_if_absent(bias_opt);
    checks::check_float(z, "z");
    TORCH_CHECK(z.numel() > 0, "z is empty (empty batches are rejected)");
    if (bias.defined()) {
      checks::check_float(bias, "bias");
      checks::check_same(z, bias, "z", "bias");
      TORCH_CHECK(bias.numel() == channels, "bias has ", bias.numel(), " elements, expected ", channels);
    }
    TORCH_CHECK(channels > 0 && inner > 0 && z.numel() % (channels * inner) == 0,
                "z of ", z.numel(), " elements does not split into channels=", channels, " x inner=", inner);
    auto result = Launch::forward_epilogue(z, bias, channels, inner, slope);
    if (slope < 0) {  // x > 0 does not identify z > 0 for a negative slope: pack the sign of z + b itself
      at::Tensor v = bias.defined() ? z.view({-1, channels, inner}) + bias.view({1, channels, 1}) : z;
      std::get<1>(result) = Launch::pack_positive(v.gt(0).to(at::kByte).contiguous().view({-1}));
    }
    return result;
  }

  static at::Tensor pack_positive(const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kByte && t.is_contiguous() && t.numel() > 0,
                "pack_positive needs a non-empty contiguous uint8 tensor");
    return Launch::pack_positive(t);
  }

  static at::Tensor mask_multiply(const at::Tensor& c, const at::Tensor& bits, int64_t mask_numel, double slope) {
    checks::check_float(c, "cotangent");
    checks::check_bits(bits, c, mask_numel);
    return Launch::mask_multiply(c, bits, mask_numel, slope);
  }

  static std::tuple<at::Tensor, at::Tensor> mask_multiply_bias_grad(const at::Tensor& c, const at::Tensor& bits,
                                                                    int64_t mask_numel, double slope,
                                                                    int64_t channels, int64_t inner) {
    checks::check_float(c, "cotangent");
    checks::check_bits(bits, c, mask_numel);
    TORCH_CHECK(channels > 0 && inner > 0 && c.numel() % (channels * inner) == 0,
                "cotangent does not split into channels=", channels, " x inner=", inner);
    return Launch::mask_multiply_bias_grad(c, bits, mask_numel, slope, channels, inner);
  }

  static at::Tensor softmax_cotangent(const at::Tensor& x, const at::Tensor& v) {
    checks::check_float(x, "probs");
    checks::check_float(v, "directions");
    checks::check_same(x, v, "probs", "directions");
    TORCH_CHECK(x.dim() == 2 && v.dim() == 3 && v.size(1) == x.size(0) && v.size(2) == x.size(1),
                "directions must have shape (k, B, C) matching probs (B, C); got ", v.sizes(), " and ", x.sizes());
    return Launch::softmax_cotangent(x, v);
  }

  static void softmax_eta_accumulate(const at::Tensor& x, const at::Tensor& v, const at::Tensor& h, at::Tensor& eta) {
    checks::check_float(x, "probs");
    checks::check_float(v, "directions");
    checks::check_float(h, "h_L");
    checks::check_float(eta, "eta");
    checks::check_same(x, v, "probs", "directions");
    checks::check_same(x, h, "probs", "h_L");
    TORCH_CHECK(eta.device() == x.device(), "eta is on ", eta.device(), " but probs is on ", x.device());
    TORCH_CHECK(v.sizes() == h.sizes(), "directions ", v.sizes(), " and h_L ", h.sizes(), " differ in shape");
    TORCH_CHECK(eta.sizes() == x.sizes(), "eta must have the shape of probs ", x.sizes(), ", got ", eta.sizes());
    TORCH_CHECK(eta.scalar_type() == at::toOpMathType(x.scalar_type()), "eta must be ",
                at::toOpMathType(x.scalar_type()), ", got ", eta.scalar_type());
    Launch::softmax_eta_accumulate(x, v, h, eta);
  }

  static std::tuple<at::Tensor, at::Tensor> penalty_head(const at::Tensor& xi, const OptTensor& x_opt,
                                                         c10::string_view head, double p1, double p2,
                                                         const at::Tensor& weight, at::Tensor& value, bool want_q0,
                                                         bool want_input_grad) {
    const at::Tensor x = undefined_if_absent(x_opt);
    const int64_t kind = head_kind(std::string(head));
    checks::check_float(xi, "xi");
    TORCH_CHECK(xi.dim() == 3 && xi.size(0) > 0 && xi.size(1) > 0, "xi must have shape (k, B, N), got ",
                xi.sizes());
    TORCH_CHECK(x.defined() || !(kernels::head_reads_x(kind) || want_input_grad),
                "x is required by the '", head, "' head and for the input gradient (want_input_grad)");
    if (x.defined()) {  // read whenever given
      checks::check_float(x, "x");
      checks::check_same(xi, x, "xi", "x");
      TORCH_CHECK(x.dim() == 2 && x.size(0) == xi.size(1) && x.size(1) == xi.size(2), "x must have shape (",
                  xi.size(1), ", ", xi.size(2), "), got ", x.sizes());
    }
    checks::check_float(weight, "sample_weight");
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == xi.size(1) && weight.device() == xi.device(),
                "sample_weight must have shape (", xi.size(1), ",) on ", xi.device(), ", got ", weight.sizes());
    TORCH_CHECK(value.scalar_type() == at::toOpMathType(xi.scalar_type()) && value.dim() == 1 &&
                    value.size(0) == xi.size(1) && value.is_contiguous() && value.device() == xi.device(),
                "value must be a contiguous (", xi.size(1), ",) tensor of ", at::toOpMathType(xi.scalar_type()),
                " on ", xi.device());
    auto [q0, gx] = Launch::penalty_head(xi, x, kind, p1, p2, weight, value, want_q0, want_input_grad);
    return {checks::empty_if_undefined(q0, xi), checks::empty_if_undefined(gx, xi)};
  }

  static at::Tensor activation_derivative_multiply(const at::Tensor& c, const at::Tensor& z,
                                                   c10::string_view activation, double p1, double p2) {
    const int64_t kind = activation_kind(std::string(activation));
    checks::check_activation(z, kind);
    checks::check_copies(c, z, "cotangent");
    return Launch::activation_derivative_multiply(c, z, kind, p1, p2);
  }

  static at::Tensor activation_source(const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z,
                                      c10::string_view activation, double p1, double p2) {
    const int64_t kind = activation_kind(std::string(activation));
    checks::check_activation(z, kind);
    checks::check_copies(xi, z, "xi");
    checks::check_copies(q, z, "q");
    TORCH_CHECK(xi.numel() == q.numel(), "xi has ", xi.numel(), " elements but q has ", q.numel());
    return Launch::activation_source(xi, q, z, kind, p1, p2);
  }

  static at::Tensor batchnorm_train_linear(const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& scale) {
    checks::check_bn_xhat(xhat);
    checks::check_bn_copies(q, xhat, "q");
    checks::check_bn_channel(scale, xhat, "scale");
    return Launch::batchnorm_train_linear(q, xhat, scale);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_train_bbp(
      const OptTensor& xi_opt, const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& invstd,
      const OptTensor& gamma_opt, bool need_tangent, bool want_source, bool want_mixed) {
    const at::Tensor xi = undefined_if_absent(xi_opt), gamma = undefined_if_absent(gamma_opt);
    checks::check_bn_xhat(xhat);
    checks::check_bn_copies(q, xhat, "q");
    TORCH_CHECK(xi.defined() || !(want_source || want_mixed),
                "xi is required for the source (want_source) and the mixed term (want_mixed)");
    if (xi.defined()) {
      checks::check_bn_copies(xi, xhat, "xi");
      TORCH_CHECK(xi.sizes() == q.sizes(), "xi ", xi.sizes(), " and q ", q.sizes(), " differ in shape");
    }
    checks::check_bn_channel(invstd, xhat, "invstd");
    if (gamma.defined()) checks::check_bn_channel(gamma, xhat, "gamma");
    at::Tensor tangent, source, dgamma;
    if (need_tangent || want_source || want_mixed)
      std::tie(tangent, source, dgamma) =
          Launch::batchnorm_train_bbp(xi, q, xhat, invstd, gamma, need_tangent, want_source, want_mixed);
    return {checks::empty_if_undefined(tangent, q), checks::empty_if_undefined(source, q),
            checks::empty_if_undefined(dgamma, q)};
  }
};

// The registration of a family's kernels in a device file, after its `Launchers` struct (one static constexpr
// pointer per launcher): TORCH_LIBRARY_IMPL(dbprop, CPU, m) { DBPROP_BATCHNORM_OPS(DBPROP_REGISTER_KERNEL) }.
#define DBPROP_REGISTER_KERNEL(name, schema, doc) m.impl(#name, TORCH_FN(::dbprop::Kernels<Launchers>::name));

// ---- the C++ entry points: dbprop::<name>(args...) calls the operator through the dispatcher ------------------------
// Arguments convert to the schema's C++ types (Tensor?: pass std::nullopt for absent; str: a std::string or literal).
namespace detail {
struct NoLaunchers;  // Kernels<NoLaunchers> is never defined beyond its signatures
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace detail

#define DBPROP_ENTRY_POINT(name, schema, doc)                                                    \
  template <class... Args>                                                                        \
  decltype(auto) name(Args&&... args) {                                                           \
    using Signature = decltype(Kernels<detail::NoLaunchers>::name);                               \
    static const auto op = detail::typed_op<Signature>("dbprop::" #name);                        \
    return op.call(std::forward<Args>(args)...);                                                  \
  }
DBPROP_ELEMENT_OPS(DBPROP_ENTRY_POINT)
#undef DBPROP_ENTRY_POINT

}  // namespace dbprop
